"""elf.Elf.find_symbols: the entries naming the wanted symbols, found by searching the table for their
name offsets, are those that unpacking every entry finds (the plain loop below is the oracle)."""

from __future__ import annotations

import functools
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from criu_xstate.elf import SHT_DYNSYM, SHT_SYMTAB, Elf, ElfError, Symbol, open_elf
from criu_xstate.glibc import CPU_FEATURES_SYMBOLS


def _interpreter(exe: Path) -> Path:
    """The loader an executable names (PT_INTERP): the glibc loader of this machine, wherever it is."""
    data = exe.read_bytes()
    phoff, phentsize, phnum = struct.unpack_from("<Q", data, 32)[0], *struct.unpack_from("<HH", data, 54)
    for i in range(phnum):
        p_type, _, off, _, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize)
        if p_type == 3:  # PT_INTERP
            return Path(data[off : off + filesz].rstrip(b"\0").decode()).resolve()
    raise AssertionError(f"{exe} names no loader: a dynamic Python is expected")


LOADER = _interpreter(Path(sys.executable).resolve())
LIBC = LOADER.parent / "libc.so.6"
WORKLOADS = Path(__file__).parent / "workloads"
NAMES = (*CPU_FEATURES_SYMBOLS, "malloc", "free", "_dl_catch_exception", "__libc_start_main", "_start")


def every_entry(elf: Elf, names: tuple[str, ...]) -> dict[str, Symbol]:
    """The oracle: every entry of every symbol table unpacked, and the first definition whose name (the
    string at its st_name, which may be the tail of a longer one) is wanted."""
    out: dict[str, Symbol] = {}
    wanted = {n.encode() for n in names}
    for sh_type, off, size, link, _ in elf._sections:
        if sh_type not in (SHT_SYMTAB, SHT_DYNSYM):
            continue
        _, str_off, str_size, _, _ = elf._sections[link]
        strtab = elf.data[str_off : str_off + str_size]
        entries = struct.iter_unpack("<IBBHQQ", elf.data[off : off + size])
        for name_off, _, _, shndx, value, sym_size in entries:
            end = strtab.find(b"\0", name_off)
            if shndx != 0 and end >= 0 and (name := strtab[name_off:end]) in wanted:
                out.setdefault(name.decode(), Symbol(name.decode(), value, sym_size))
    return out


@functools.cache
def _static_workload(tmp: Path) -> Path | None:
    if shutil.which("gcc") is None:
        return None
    out = tmp / "static"
    src = WORKLOADS / "glibc_features.c"
    r = subprocess.run(["gcc", "-O2", "-static", "-o", str(out), str(src)], capture_output=True)
    return out if r.returncode == 0 else None


def _binaries(tmp: Path) -> list[Path]:
    found = [p for p in (LOADER, LIBC, Path(sys.executable).resolve()) if p.is_file()]
    static = _static_workload(tmp)
    return found + ([static] if static else [])


def test_the_symbols_found_are_those_every_entry_names(tmp_path_factory: pytest.TempPathFactory) -> None:
    binaries = _binaries(tmp_path_factory.mktemp("elf"))
    assert any(p.name == "static" for p in binaries) or shutil.which("gcc") is None
    checked = 0
    for path in binaries:
        elf = open_elf(path.resolve())
        got = elf.find_symbols(NAMES)
        assert got == every_entry(elf, NAMES), path
        checked += len(got)
    assert checked >= 3  # the loader's getter at least, and libc's malloc and free


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.integers(0, 1 << 22), st.binary(min_size=1, max_size=8)), min_size=1, max_size=8
    ),
    names=st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True),
)
def test_on_damaged_tables_both_agree_or_the_file_is_refused(
    edits: list[tuple[int, bytes]], names: list[str]
) -> None:
    data = bytearray(_loader_bytes())
    tables = [
        (off, size)
        for t, off, size, _, _ in Elf(LOADER, bytes(data))._sections
        if t in (SHT_SYMTAB, SHT_DYNSYM)
    ]
    for pos, new in edits:  # into the symbol tables, where the search and the loop could part
        off, size = tables[pos % len(tables)]
        at = off + pos % size
        data[at : at + len(new)] = new
    try:
        elf = Elf(LOADER, bytes(data))
        got = elf.find_symbols(names)
    except ElfError:
        return
    assert got == every_entry(elf, tuple(names))


@functools.cache
def _loader_bytes() -> bytes:
    return LOADER.read_bytes()


def _elf_with_symbols(strtab: bytes, entries: list[tuple[int, int, int, int]]) -> Elf:
    """A minimal ELF64 file: a string table and one symbol table of (st_name, shndx, value, size)."""
    symtab = b"".join(struct.pack("<IBBHQQ", n, 0, 0, shndx, v, sz) for n, shndx, v, sz in entries)
    str_off = 64
    sym_off = str_off + len(strtab)
    sh_off = sym_off + len(symtab)
    sections = [
        struct.pack("<IIQQQQIIQQ", 0, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        struct.pack("<IIQQQQIIQQ", 0, 3, 0, 0, str_off, len(strtab), 0, 0, 1, 0),
        struct.pack("<IIQQQQIIQQ", 0, SHT_SYMTAB, 0, 0, sym_off, len(symtab), 1, 0, 8, 24),
    ]
    # ELF64 little-endian; ET_EXEC for x86-64, no program headers, 3 section headers of 64 bytes
    head = (
        b"\x7fELF\x02\x01\x01"
        + bytes(9)
        + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0, 0, sh_off, 0, 64, 56, 0, 64, 3, 0)
    )
    return Elf(Path("synthetic"), head + strtab + symtab + b"".join(sections))


STRTAB = b"\0cfree\0malloc\0_dl_x86_cpu_features\0free\0"
# cfree, free as its tail, malloc, the features, free on its own, the last NUL (""), beyond the table
NAME_OFFSETS = [1, 2, 7, 14, STRTAB.rfind(b"free"), len(STRTAB) - 1, 99]


@settings(max_examples=300, deadline=None)
@given(
    entries=st.lists(
        st.tuples(
            st.sampled_from(NAME_OFFSETS),
            st.sampled_from([0, 1]),  # undefined or defined
            st.one_of(st.sampled_from(NAME_OFFSETS), st.integers(0, (1 << 64) - 1)),  # offsets as values
            st.one_of(st.sampled_from(NAME_OFFSETS), st.integers(0, (1 << 64) - 1)),
        ),
        max_size=12,
    )
)
def test_on_any_symbol_table_the_first_definition_of_each_name_is_found(
    entries: list[tuple[int, int, int, int]],
) -> None:
    """Names that are tails of others (cfree/free), several definitions of one name under different
    offsets, and name offsets that also stand in the value and size fields of other entries."""
    elf = _elf_with_symbols(STRTAB, entries)
    names = ("free", "malloc", "_dl_x86_cpu_features", "cfree")
    assert elf.find_symbols(names) == every_entry(elf, names)
