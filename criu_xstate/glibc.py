"""What glibc decided at start-up, read from a checkpoint: the save-area sizes its trampolines reserve
and the CPU features it found usable (from which every ifunc was resolved once, for the life of the
process).

glibc's loader caches both in ``struct cpu_features`` (in ``_rtld_global_ro``, read-only after
relocation: its pages were written at start-up, so CRIU dumps them). Nothing here depends on a table
of glibc versions; the loader's own code names each field (docs/glibc-state.md):

- ``_dl_x86_get_cpu_features`` (exported by ld.so, GLIBC_PRIVATE) is ``lea cpu_features(%rip), %rax;
  ret``: it names the structure;
- every lazy-binding or TLS-descriptor trampoline that saves vector state reserves its area with
  ``sub size(%rip), %rsp``: each such instruction names a size field, and the ``mov $mask, %eax`` and
  ``xsave``/``xsavec`` after it say which components it saves and in which format;
- the structure opens with ``basic`` (kind, max_cpuid, family, model, stepping) and then, per CPUID
  leaf, 16 bytes of raw CPUID and 16 bytes of "active" bits (glibc 2.33 and later), leaf 1 first and
  leaf 7 second: the family and model must agree with leaf 1's signature, and the number of leaves
  follows from where the size field sits (checked, not assumed).

The code comes from the ELF file the process mapped, found under ``root`` by the path CRIU recorded
and checked against the size (and build-id, when recorded) in ``files.img``.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping
from pathlib import Path

from criu_xstate import records
from criu_xstate.elf import Elf, ElfError, open_elf, read_binding
from criu_xstate.errors import ImageError, MemoryUnreadable
from criu_xstate.images.addrspace import VMA_FILE_PRIVATE, VMA_FILE_SHARED
from criu_xstate.images.files import RegFile, read_reg_files
from criu_xstate.model import Process
from criu_xstate.records import record

LEGACY_AND_HEADER = 576  # XSAVE legacy area + header: where extended components start
REGISTER_AREA = 64  # the trampolines' integer-register area below the XSAVE image (STATE_SAVE_OFFSET)
TLSDESC_SLACK = 24  # three registers TLS-descriptor trampolines keep in the red zone (glibc 2.40+)
SCAN_AHEAD = 256  # bytes after a `sub size(%rip), %rsp` searched for its xsave/xsavec
BASIC_SIZE = 20
LEAF_SIZE = 32  # 16 bytes of CPUID, 16 of active bits
MAX_LEAVES = 32

EAX, EBX, ECX, EDX = range(4)


@record
class Feature:
    """A CPU feature glibc's ifunc resolvers select on: its slot in cpu_features and its cpuinfo flag."""

    name: str  # glibc's name, as GLIBC_TUNABLES=glibc.cpu.hwcaps=-NAME spells it
    leaf: int  # index in cpu_features.features: 0 = CPUID 1, 1 = CPUID 7.0, 2 = CPUID 0x80000001
    reg: int
    bit: int
    flag: str  # /proc/cpuinfo


# The instruction-set features the x86-64 string, memory and math ifuncs of glibc 2.33-2.41 choose on
# (sysdeps/x86_64/multiarch/ifunc-*.h): a process whose glibc found one usable may run code that needs
# it; each can be masked with GLIBC_TUNABLES=glibc.cpu.hwcaps=-NAME (sysdeps/x86/cpu-tunables.c). Left out
# on purpose: ERMS and FSRM choose between variants that run on any CPU; F16C and AVX512_VBMI choose
# no ifunc (and the tunable cannot mask them: measured, tests/test_qemu_glibc.py).
IFUNC_FEATURES: tuple[Feature, ...] = (
    Feature("SSSE3", 0, ECX, 9, "ssse3"),
    Feature("FMA", 0, ECX, 12, "fma"),
    Feature("SSE4_1", 0, ECX, 19, "sse4_1"),
    Feature("SSE4_2", 0, ECX, 20, "sse4_2"),
    Feature("MOVBE", 0, ECX, 22, "movbe"),
    Feature("POPCNT", 0, ECX, 23, "popcnt"),
    Feature("AVX", 0, ECX, 28, "avx"),
    Feature("BMI1", 1, EBX, 3, "bmi1"),
    Feature("AVX2", 1, EBX, 5, "avx2"),
    Feature("BMI2", 1, EBX, 8, "bmi2"),
    Feature("RTM", 1, EBX, 11, "rtm"),
    Feature("AVX512F", 1, EBX, 16, "avx512f"),
    Feature("AVX512DQ", 1, EBX, 17, "avx512dq"),
    Feature("AVX512CD", 1, EBX, 28, "avx512cd"),
    Feature("AVX512BW", 1, EBX, 30, "avx512bw"),
    Feature("AVX512VL", 1, EBX, 31, "avx512vl"),
    Feature("LZCNT", 2, ECX, 5, "abm"),
    Feature("FMA4", 2, ECX, 16, "fma4"),
)
XSAVEC_SLOT = (3, EAX, 1)  # CPUID 0xD.1 EAX bit 1: glibc sets it active when it chose XSAVEC


@record
class SaveArea:
    """One save-area size field and how the trampolines that reserve it use it."""

    vaddr: int  # in the process
    value: int
    formats: frozenset[str]  # "xsave" and/or "xsavec": the trampolines that read this field
    mask: int  # components those trampolines save (edx:eax of their xsave/xsavec)
    in_cpu_features: bool  # xsave_state_size; otherwise a separate variable (TLS descriptors, 2.40+)

    @property
    def name(self) -> str:
        return "xsave_state_size" if self.in_cpu_features else "tlsdesc state size"


@record
class GlibcState:
    """What a process's glibc chose for the CPU it started on: trampoline, ifuncs, save-area sizes."""

    pid: int
    loader: str  # the file that holds cpu_features: ld.so, or a static executable
    version: str | None
    trampoline: str  # "xsavec", "xsave" or "fxsave": what the process's trampolines save with
    active: frozenset[str]  # IFUNC_FEATURES glibc found usable
    areas: tuple[SaveArea, ...]
    static: bool
    lazy: tuple[str, ...] | None = None  # objects whose PLT binds at first call; None: not known
    tunables: str | None = None  # GLIBC_TUNABLES in the process's environment at start-up

    @property
    def bound_at_start(self) -> bool:
        """No object binds lazily (BIND_NOW, or LD_BIND_NOW): the resolve trampoline never runs."""
        return self.lazy == ()


@record
class GlibcUnread:
    """A process whose glibc state could not be read, and why."""

    pid: int
    loader: str | None
    why: str


@record
class _Code:
    """What the loader's code says: where cpu_features is, and each size field's trampolines."""

    features: int  # link-time address of cpu_features
    fields: Mapping[int, tuple[frozenset[str], int]]  # link-time address -> (formats, mask)
    version: str | None


def _rip_target(elf: Elf, at: int, length: int) -> int:
    disp: int = struct.unpack_from("<i", elf.read(at + length - 4, 4))[0]
    return at + length + disp


def _mask_before(code: bytes, start: int, end: int) -> int | None:
    """The last `mov $imm32, %eax` (b8) between start and end, with `xor %edx,%edx` or `mov $0, %edx`."""
    found = None
    pos = code.find(b"\xb8", start, end)
    while pos >= 0 and pos + 5 <= end:
        found = struct.unpack_from("<I", code, pos + 1)[0]
        pos = code.find(b"\xb8", pos + 1, end)
    return found


def _trampolines(elf: Elf) -> dict[int, tuple[frozenset[str], int]]:
    """Each `sub disp32(%rip), %rsp` (48 2b 25) followed by an xsave/xsavec of the stack (0f ae /4 or
    0f c7 /4 with an rsp base): field address -> (formats, mask)."""
    fields: dict[int, tuple[set[str], int]] = {}
    for seg in elf.executable_segments():
        code = elf.data[seg.offset : seg.offset + seg.filesz]
        pos = code.find(b"\x48\x2b\x25")
        while pos >= 0:
            if pos + 7 <= len(code):
                field = seg.vaddr + pos + 7 + struct.unpack_from("<i", code, pos + 3)[0]
                window_end = min(len(code), pos + 7 + SCAN_AHEAD)
                m = re.compile(rb"\x0f(\xae|\xc7)\x64\x24").search(code, pos + 7, window_end)
                if m is not None:
                    fmt = "xsave" if m.group(1) == b"\xae" else "xsavec"
                    mask = _mask_before(code, pos + 7, m.start())
                    formats, old = fields.get(field, (set(), 0))
                    formats.add(fmt)
                    fields[field] = (formats, old | (mask if mask is not None else ~0 & 0xFFFFFFFF))
            pos = code.find(b"\x48\x2b\x25", pos + 1)
    return {k: (frozenset(f), m) for k, (f, m) in fields.items()}


def _version(elf: Elf) -> str | None:
    m = re.search(rb"release version (\d+\.\d+)", elf.data)
    return m.group(1).decode() if m else None


# The two ways glibc's start-up code names cpu_features (read_code).
CPU_FEATURES_SYMBOLS = ("_dl_x86_get_cpu_features", "_dl_x86_cpu_features")


def read_code(elf: Elf) -> _Code:
    """Where cpu_features is: named by ld.so's ``_dl_x86_get_cpu_features`` (lea ...(%rip), %rax), or
    in a static executable by its own symbol ``_dl_x86_cpu_features`` (.symtab: not when stripped)."""
    syms = elf.find_symbols(CPU_FEATURES_SYMBOLS)
    getter = syms.get("_dl_x86_get_cpu_features")
    if getter is not None:
        head = elf.read(getter.value, 7)
        if head[:3] != b"\x48\x8d\x05":
            raise ElfError(elf.path, f"_dl_x86_get_cpu_features is not lea (%rip), %rax: {head.hex()}")
        features = _rip_target(elf, getter.value, 7)
    elif (var := syms.get("_dl_x86_cpu_features")) is not None:
        features = var.value
    else:
        raise ElfError(elf.path, "neither _dl_x86_get_cpu_features nor _dl_x86_cpu_features (stripped?)")
    return _Code(features, _trampolines(elf), _version(elf))


def _leaf1_agrees(basic: tuple[int, ...], leaf1_eax: int) -> bool:
    """basic.family/model as glibc derives them from leaf 1 (the extended model is added for families
    6 and 15 only, and not by every vendor's path: either is accepted)."""
    kind, _, family, model, _ = basic
    fam = leaf1_eax >> 8 & 0xF
    mod = leaf1_eax >> 4 & 0xF
    if fam == 0xF:
        fam += leaf1_eax >> 20 & 0xFF
    return 1 <= kind <= 4 and family == fam and model in (mod, mod + ((leaf1_eax >> 16 & 0xF) << 4))


def _loader_vmas(proc: Process, files: Mapping[int, RegFile]) -> dict[int, list[tuple[int, int]]]:
    """File id -> [(start, pgoff)] of the process's file-backed mappings."""
    out: dict[int, list[tuple[int, int]]] = {}
    for v in proc.checkpoint.mm(proc.pid).vmas:
        if int(v.status) & (VMA_FILE_PRIVATE | VMA_FILE_SHARED) and int(v.shmid) in files:
            out.setdefault(int(v.shmid), []).append((int(v.start), int(v.pgoff)))
    return out


def _candidate(proc: Process, files: Mapping[int, RegFile]) -> tuple[RegFile, int, bool] | None:
    """The file holding cpu_features and its lowest mapping: ld.so for a dynamic process, else the
    executable (static glibc)."""
    mapped = _loader_vmas(proc, files)
    for fid, vmas in mapped.items():
        if Path(files[fid].name).name.startswith("ld-linux-x86-64.so"):
            return files[fid], min(vmas)[0] - min(vmas)[1], False
    exe = int(proc.checkpoint.mm(proc.pid).exe_file_id)
    if exe in mapped:
        vmas = mapped[exe]
        return files[exe], min(vmas)[0] - min(vmas)[1], True
    return None


class _ElfCache:
    def __init__(self) -> None:
        self._items: dict[Path, Elf | ElfError] = {}

    def get(self, path: Path) -> Elf:
        if path not in self._items:
            try:
                self._items[path] = open_elf(path)
            except ElfError as exc:
                self._items[path] = exc
        item = self._items[path]
        if isinstance(item, ElfError):
            raise item
        return item


def _file_matches(elf: Elf, reg: RegFile) -> str | None:
    if reg.size is not None and reg.size != len(elf.data):
        return f"{elf.path} here has {len(elf.data)} bytes, the process mapped {reg.size}"
    if reg.build_id and elf.build_id() not in (None, reg.build_id):
        return f"{elf.path} here has another build-id than the file the process mapped"
    return None


def _read_u32s(proc: Process, vaddr: int, count: int) -> tuple[int, ...]:
    return struct.unpack(f"<{count}I", proc.address_space.read(vaddr, 4 * count))


def read_glibc(
    proc: Process, root: Path, cache: _ElfCache, files: Mapping[int, RegFile]
) -> GlibcState | GlibcUnread | None:
    found = _candidate(proc, files)
    if found is None:
        return None
    reg, start_minus_pgoff, static = found
    if "\0" in reg.name or ".." in Path(reg.name).parts:
        return GlibcUnread(proc.pid, None, "the recorded path of the mapped loader is not a plain path")
    path = root / reg.name.lstrip("/")
    try:
        elf = cache.get(path)
        if (bad := _file_matches(elf, reg)) is not None:
            return GlibcUnread(proc.pid, reg.name, bad)
        if static and not elf.find_symbols(CPU_FEATURES_SYMBOLS):
            return None  # a static executable without glibc's x86 start-up (or stripped): nothing to say
        code = read_code(elf)
    except ElfError as exc:
        return GlibcUnread(proc.pid, reg.name, exc.why if exc.path == path else str(exc))
    first = min((s for s in elf.segments if s.offset == 0), key=lambda s: s.vaddr, default=None)
    bias = start_minus_pgoff - ((first.vaddr & ~0xFFF) if first is not None else 0)
    try:
        env = _environment(proc)
        state = _read_state(proc, reg.name, code, bias, static)
        lazy = () if env.get("LD_BIND_NOW") else _lazy_objects(proc, files, root, reg.id)
        return records.replace(state, lazy=lazy, tunables=env.get("GLIBC_TUNABLES"))
    except MemoryUnreadable as exc:
        return GlibcUnread(proc.pid, reg.name, f"cpu_features unreadable: {exc.reason}")
    except ValueError as exc:
        return GlibcUnread(proc.pid, reg.name, str(exc))


MAX_ENVIRONMENT = 1 << 20


def _environment(proc: Process) -> dict[str, str]:
    """The process's environment as the kernel keeps it (mm_env_start..mm_env_end, on its stack)."""
    mm = proc.checkpoint.mm(proc.pid)
    start, end = int(mm.mm_env_start), int(mm.mm_env_end)
    if not 0 < end - start <= MAX_ENVIRONMENT:
        return {}
    try:
        raw = proc.address_space.read(start, end - start)
    except MemoryUnreadable:
        return {}
    out: dict[str, str] = {}
    for item in raw.split(b"\0"):
        key, sep, value = item.partition(b"=")
        if sep:
            out.setdefault(key.decode("utf-8", "replace"), value.decode("utf-8", "replace"))
    return out


def _lazy_objects(
    proc: Process, files: Mapping[int, RegFile], root: Path, loader: int
) -> tuple[str, ...] | None:
    """The mapped ELF objects (mapped from offset 0) whose PLT binds at first call; None when one of
    them cannot be read here."""
    mapped = _loader_vmas(proc, files)
    lazy = []
    for fid, vmas in sorted(mapped.items()):
        if fid == loader or not any(pgoff == 0 for _, pgoff in vmas):
            continue
        name = files[fid].name
        if "\0" in name or ".." in Path(name).parts:
            return None
        try:
            if read_binding(root / name.lstrip("/")).lazy_plt:
                lazy.append(name)
        except ElfError:
            if name.endswith(".so") or ".so." in name or fid == int(proc.checkpoint.mm(proc.pid).exe_file_id):
                return None
    return tuple(lazy)


def _read_state(proc: Process, loader: str, code: _Code, bias: int, static: bool) -> GlibcState:
    base = bias + code.features
    basic = _read_u32s(proc, base, 5)
    inside = [f for f in code.fields if 0 <= f - code.features < BASIC_SIZE + MAX_LEAVES * LEAF_SIZE + 16]
    if len(inside) != 1:
        raise ValueError(f"{len(inside)} save-area fields inside cpu_features, expected 1: unknown layout")
    # features[N], preferred[1], isa_1, then xsave_state_size (8-byte aligned)
    leaves, slack = divmod(inside[0] - code.features - BASIC_SIZE - 8, LEAF_SIZE)
    if not 3 <= leaves <= MAX_LEAVES or slack > 4:
        raise ValueError(f"xsave_state_size at +{inside[0] - code.features}: not the glibc 2.33+ layout")
    words = _read_u32s(proc, base + BASIC_SIZE, leaves * 8)
    if not _leaf1_agrees(basic, words[EAX]):
        raise ValueError("cpu_features does not hold a CPUID leaf 1 matching its family and model")

    def active(leaf: int, reg: int, bit: int) -> bool:
        return bool(words[leaf * 8 + 4 + reg] >> bit & 1)

    areas = []
    for field, (formats, mask) in sorted(code.fields.items()):
        (value,) = struct.unpack("<Q", proc.address_space.read(bias + field, 8))
        areas.append(SaveArea(bias + field, value, formats, mask, field in inside))
    size = next(a.value for a in areas if a.in_cpu_features)
    trampoline = "fxsave" if size == 0 else ("xsavec" if active(*XSAVEC_SLOT) else "xsave")
    names = frozenset(f.name for f in IFUNC_FEATURES if f.leaf < leaves and active(f.leaf, f.reg, f.bit))
    return GlibcState(proc.pid, loader, code.version, trampoline, names, tuple(areas), static)


def read_all(processes: list[Process], root: Path) -> list[GlibcState | GlibcUnread]:
    """What glibc cached in each process of a checkpoint (processes without glibc are left out)."""
    if not processes:
        return []
    try:
        files = read_reg_files(processes[0].checkpoint)
    except ImageError as exc:
        return [GlibcUnread(p.pid, None, f"files.img unreadable: {exc}") for p in processes]
    cache = _ElfCache()
    out = []
    for p in processes:
        r = read_glibc(p, root, cache, files)
        if r is not None:
            out.append(r)
    return out


# --- what a destination needs ------------------------------------------------------------------------


def save_extent(fmt: str, mask: int, xcr0: int, components: Mapping[int, tuple[int, int]]) -> int:
    """Bytes an xsave (standard format) or xsavec (compacted) of ``mask`` writes on a CPU with ``xcr0``
    and these component (offset, size) pairs; compacted offsets are taken 64-byte aligned (an upper
    bound where CPUID would not align them)."""
    rfbm = mask & xcr0
    extended = sorted(n for n in components if n >= 2 and rfbm >> n & 1)
    if fmt == "xsave":
        return max([LEGACY_AND_HEADER, *(components[n][0] + components[n][1] for n in extended)])
    end = LEGACY_AND_HEADER
    for n in extended:
        end = (end + 63) // 64 * 64 + components[n][1]
    return end


def needed(area: SaveArea, trampoline: str, xcr0: int, components: Mapping[int, tuple[int, int]]) -> int:
    """What the trampoline the process uses writes below its stack pointer on the destination."""
    return REGISTER_AREA + save_extent(trampoline, area.mask, xcr0, components)


def rewritten(area: SaveArea, need: int) -> int:
    """The size to cache instead: glibc's own rounding, with room for the TLS-descriptor red zone."""
    return max(area.value, (need + TLSDESC_SLACK + 63) // 64 * 64)
