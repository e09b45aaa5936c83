"""Just enough of an x86-64 ELF file to read a loader's code: its loadable segments (virtual address to
file offset), its symbols by name, and its build-id.

The file is hostile input like any image (it comes from a checkpoint's root, maybe a container's): every
offset and count is checked against the file before it is used, reads are bounded, and anything that
does not fit raises :class:`ElfError` with what was wrong.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from pathlib import Path

from criu_xstate.records import record

MAX_ELF = 256 << 20  # a loader or a static executable; anything bigger is refused, not read
MAX_SYMBOLS = 1 << 20
PT_LOAD = 1
PT_NOTE = 4
SHT_SYMTAB = 2
SHT_DYNSYM = 11
NT_GNU_BUILD_ID = 3


class ElfError(Exception):
    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


@record
class Segment:
    """One PT_LOAD program header."""

    vaddr: int
    offset: int
    filesz: int
    memsz: int
    flags: int  # PF_X 1, PF_W 2, PF_R 4


@record
class Symbol:
    """One symbol-table entry: its name, value (an address in the object) and size."""

    name: str
    value: int
    size: int


class Elf:
    """A read-only ELF64 little-endian x86-64 file, loaded whole (bounded by MAX_ELF)."""

    def __init__(self, path: Path, data: bytes) -> None:
        self.path = path
        self.data = data
        if len(data) < 64 or data[:4] != b"\x7fELF":
            raise ElfError(path, "not an ELF file")
        if data[4] != 2 or data[5] != 1:
            raise ElfError(path, "not a 64-bit little-endian ELF file")
        (self.type, machine) = struct.unpack_from("<HH", data, 16)
        if machine != 62:
            raise ElfError(path, f"machine {machine}, not x86-64")
        phoff, shoff = struct.unpack_from("<QQ", data, 32)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, 54)
        self.segments = self._segments(phoff, phentsize, phnum)
        self._sections = self._section_headers(shoff, shentsize, shnum)

    # --- structure ------------------------------------------------------------------------------------

    def _span(self, offset: int, size: int, what: str) -> None:
        if offset < 0 or size < 0 or offset + size > len(self.data):
            raise ElfError(
                self.path, f"{what} [{offset}, +{size}) lies outside the file ({len(self.data)} bytes)"
            )

    def _segments(self, phoff: int, entsize: int, num: int) -> tuple[Segment, ...]:
        if entsize != 56:
            raise ElfError(self.path, f"program header size {entsize}, expected 56")
        self._span(phoff, entsize * num, "program headers")
        out = []
        for i in range(num):
            p_type, p_flags, off, vaddr, _, filesz, memsz, _ = struct.unpack_from(
                "<IIQQQQQQ", self.data, phoff + i * 56
            )
            if p_type == PT_LOAD:
                self._span(off, filesz, f"segment {i}")
                out.append(Segment(vaddr, off, filesz, memsz, p_flags))
        return tuple(out)

    def _section_headers(self, shoff: int, entsize: int, num: int) -> list[tuple[int, int, int, int, int]]:
        """(type, offset, size, link, entsize) of each section; none when the file has no table."""
        if shoff == 0 or num == 0:
            return []
        if entsize != 64:
            raise ElfError(self.path, f"section header size {entsize}, expected 64")
        self._span(shoff, entsize * num, "section headers")
        out = []
        for i in range(num):
            _, sh_type, _, _, off, size, link, _, _, ent = struct.unpack_from(
                "<IIQQQQIIQQ", self.data, shoff + i * 64
            )
            out.append((sh_type, off, size, link, ent))
        return out

    # --- reading --------------------------------------------------------------------------------------

    def read(self, vaddr: int, size: int) -> bytes:
        """Bytes of the file image at a link-time virtual address (inside one segment's file part)."""
        for s in self.segments:
            if s.vaddr <= vaddr and vaddr + size <= s.vaddr + s.filesz:
                off = s.offset + vaddr - s.vaddr
                return self.data[off : off + size]
        raise ElfError(self.path, f"0x{vaddr:x} (+{size}) is not in a loaded part of the file")

    def executable_segments(self) -> tuple[Segment, ...]:
        return tuple(s for s in self.segments if s.flags & 1)

    def find_symbols(self, names: Iterable[str]) -> dict[str, Symbol]:
        """The defined symbols of .dynsym and .symtab with these names, the first definition of each.

        The string tables are searched for the names and only the entries that point at one are kept:
        a static glibc has thousands of symbols and a plan needs two of them. A name is found wherever
        it ends a string (linkers share tails: ``st_name`` may point into a longer name)."""
        wanted = [n.encode("ascii") + b"\0" for n in names]
        out: dict[str, Symbol] = {}
        for sh_type, off, size, link, ent in self._sections:
            if sh_type not in (SHT_SYMTAB, SHT_DYNSYM):
                continue
            if ent != 24 or size % 24 or size // 24 > MAX_SYMBOLS or not 0 <= link < len(self._sections):
                raise ElfError(self.path, "malformed symbol table")
            self._span(off, size, "symbol table")
            _, str_off, str_size, _, _ = self._sections[link]
            self._span(str_off, str_size, "string table")
            strtab = self.data[str_off : str_off + str_size]
            at: dict[int, str] = {}
            for needle in wanted:
                pos = strtab.find(needle)
                while pos >= 0:
                    at[pos] = needle[:-1].decode("ascii")
                    pos = strtab.find(needle, pos + 1)
            for index, name in self._entries_naming(off, size, at):
                _, _, _, shndx, value, sym_size = struct.unpack_from("<IBBHQQ", self.data, off + 24 * index)
                if shndx != 0:
                    out.setdefault(name, Symbol(name, value, sym_size))
        return out

    def _entries_naming(self, off: int, size: int, at: dict[int, str]) -> list[tuple[int, str]]:
        """(index, name) of the symbol entries whose st_name is a key of ``at``, in table order: each
        offset's four bytes searched for in the table at entry boundaries (st_name opens an entry),
        not every entry unpacked (a static glibc's .symtab has ~2000: ~2 ms of each hook)."""
        found = []
        for name_off, name in at.items():
            key = struct.pack("<I", name_off)
            pos = self.data.find(key, off, off + size)
            while pos >= 0:
                if (pos - off) % 24 == 0:
                    found.append(((pos - off) // 24, name))
                pos = self.data.find(key, pos + 1, off + size)
        return sorted(found)

    def build_id(self) -> bytes | None:
        phoff = struct.unpack_from("<Q", self.data, 32)[0]
        phnum = struct.unpack_from("<H", self.data, 56)[0]
        self._span(phoff, 56 * phnum, "program headers")
        for i in range(phnum):
            p_type, _, off, _, _, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", self.data, phoff + i * 56)
            if p_type != PT_NOTE:
                continue
            self._span(off, filesz, "note segment")
            pos, end = off, off + filesz
            while pos + 12 <= end:
                namesz, descsz, ntype = struct.unpack_from("<III", self.data, pos)
                name_end = pos + 12 + (namesz + 3) // 4 * 4
                desc_end = name_end + (descsz + 3) // 4 * 4
                if desc_end > end:
                    break
                if ntype == NT_GNU_BUILD_ID and self.data[pos + 12 : pos + 12 + namesz] == b"GNU\0":
                    return self.data[name_end : name_end + descsz]
                pos = desc_end
        return None


def open_elf(path: Path) -> Elf:
    """Read a regular file (no symlink is followed at the last component, no FIFO or device opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise ElfError(path, getattr(exc, "strerror", None) or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not (st.st_mode & 0o170000) == 0o100000:
            raise ElfError(path, "not a regular file")
        if st.st_size > MAX_ELF:
            raise ElfError(path, f"{st.st_size} bytes: larger than {MAX_ELF} bytes, not read")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(MAX_ELF + 1)
    finally:
        os.close(fd)
    return Elf(path, data)


PT_DYNAMIC = 2
DT_NULL, DT_JMPREL, DT_BIND_NOW, DT_FLAGS, DT_FLAGS_1 = 0, 23, 24, 30, 0x6FFFFFFB
DF_BIND_NOW, DF_1_NOW = 0x8, 0x1
MAX_DYNAMIC = 1 << 16


@record
class Binding:
    """How an object binds its PLT entries."""

    lazy_plt: bool  # has PLT relocations bound at first call (DT_JMPREL without BIND_NOW)


def read_binding(path: Path) -> Binding:
    """Whether an object binds its PLT lazily, from its dynamic section alone (a few preads, not the
    whole file: a process may map many large libraries)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except (OSError, ValueError) as exc:
        raise ElfError(path, getattr(exc, "strerror", None) or str(exc)) from None
    try:
        if (os.fstat(fd).st_mode & 0o170000) != 0o100000:
            raise ElfError(path, "not a regular file")
        head = os.pread(fd, 64, 0)
        if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2 or head[5] != 1:
            raise ElfError(path, "not a 64-bit little-endian ELF file")
        phoff = struct.unpack_from("<Q", head, 32)[0]
        phentsize, phnum = struct.unpack_from("<HH", head, 54)
        if phentsize != 56 or phnum > 4096:
            raise ElfError(path, "malformed program headers")
        table = os.pread(fd, 56 * phnum, phoff)
        if len(table) != 56 * phnum:
            raise ElfError(path, "program headers lie outside the file")
        dyn = next(
            (
                struct.unpack_from("<IIQQQQQQ", table, i * 56)
                for i in range(phnum)
                if struct.unpack_from("<I", table, i * 56)[0] == PT_DYNAMIC
            ),
            None,
        )
        if dyn is None:
            return Binding(False)  # static: no PLT the dynamic loader binds
        data = os.pread(fd, min(dyn[5], MAX_DYNAMIC), dyn[2])
    finally:
        os.close(fd)
    jmprel = now = False
    for pos in range(0, len(data) - 15, 16):
        tag, val = struct.unpack_from("<qQ", data, pos)
        if tag == DT_NULL:
            break
        jmprel |= tag == DT_JMPREL
        now |= tag == DT_BIND_NOW or (tag == DT_FLAGS and bool(val & DF_BIND_NOW))
        now |= tag == DT_FLAGS_1 and bool(val & DF_1_NOW)
    return Binding(jmprel and not now)
