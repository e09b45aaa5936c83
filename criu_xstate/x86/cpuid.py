"""Raw facts about the local CPU and kernel: CPUID, XCR0, FXSAVE's MXCSR_MASK, arch_prctl, auxv.

Everything is gathered into a :class:`RawFacts` record, the same record that ``probe --from-dump``
builds from the text a tiny static program prints (contrib/probe-dump), so a host without Python is
described by exactly the same code.

CPUID is read through ``/dev/cpu/0/cpuid`` where readable (``pread`` at ``leaf | subleaf << 32``), else
through a few bytes of machine code mapped executable and called with ctypes; XGETBV and FXSAVE have
no kernel interface and always use such a stub.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from pathlib import Path

from criu_xstate.errors import ProbeError
from criu_xstate.records import field, record

ARCH_GET_XCOMP_SUPP = 0x1021
SYS_ARCH_PRCTL = 158
AT_MINSIGSTKSZ = 51
MAX_XSAVE_COMPONENT = 19

# push rbx; mov r8,rdx; mov eax,edi; mov ecx,esi; cpuid; mov [r8],eax; mov [r8+4],ebx; mov [r8+8],ecx;
# mov [r8+12],edx; pop rbx; ret
_CPUID_CODE = bytes.fromhex(
    "53 4989d0 89f8 89f1 0fa2 418900 41895804 41894808 4189500c 5b c3".replace(" ", "")
)
# mov ecx,edi; xgetbv; shl rdx,32; or rax,rdx; ret
_XGETBV_CODE = bytes.fromhex("89f9 0f01d0 48c1e220 4809d0 c3".replace(" ", ""))
# fxsave [rdi]; ret
_FXSAVE_CODE = bytes.fromhex("0fae07c3")


@record(frozen=False)
class RawFacts:
    """What a probe reads, before interpretation. Keys of ``cpuid`` are ``(leaf, subleaf)``."""

    cpuid: dict[tuple[int, int], tuple[int, int, int, int]] = field(default_factory=dict)
    xcr0: int | None = None
    xcomp_supp: int | None = None
    mxcsr_mask: int | None = None
    minsigstksz: int | None = None
    release: str | None = None
    flags: list[str] = field(default_factory=list)
    model_name: str | None = None
    sources: dict[str, str] = field(default_factory=dict)
    sigreturn: str | None = None  # the self-test's outcome (sigreturn_probe.OUTCOMES), None: not run
    sigreturn_detail: str = ""


class _Stubs:
    """Machine-code stubs in one executable page."""

    def __init__(self) -> None:
        try:
            self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        except (OSError, PermissionError) as exc:
            raise ProbeError(f"cannot map an executable page for CPUID/XGETBV stubs: {exc}") from exc
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        self._page[0 : len(_CPUID_CODE)] = _CPUID_CODE
        self._page[64 : 64 + len(_XGETBV_CODE)] = _XGETBV_CODE
        self._page[128 : 128 + len(_FXSAVE_CODE)] = _FXSAVE_CODE
        self._cpuid = ctypes.CFUNCTYPE(None, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_void_p)(self._base)
        self._xgetbv = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_uint32)(self._base + 64)
        self._fxsave = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(self._base + 128)

    def cpuid(self, leaf: int, sub: int) -> tuple[int, int, int, int]:
        out = (ctypes.c_uint32 * 4)()
        self._cpuid(leaf, sub, ctypes.addressof(out))
        return out[0], out[1], out[2], out[3]

    def xgetbv(self, index: int) -> int:
        return int(self._xgetbv(index))

    def mxcsr_mask(self) -> int:
        buf = ctypes.create_string_buffer(512 + 64)
        addr = (ctypes.addressof(buf) + 63) & ~63
        self._fxsave(addr)
        (mask,) = struct.unpack_from("<I", ctypes.string_at(addr + 28, 4))
        return int(mask) or 0xFFBF  # FXSAVE stores 0 when the CPU uses the default mask


def _dev_cpuid(leaf: int, sub: int) -> tuple[int, int, int, int] | None:
    try:
        fd = os.open("/dev/cpu/0/cpuid", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.pread(fd, 16, leaf | (sub << 32))
    except OSError:
        return None
    finally:
        os.close(fd)
    if len(data) != 16:
        return None
    a, b, c, d = struct.unpack("<IIII", data)
    return a, b, c, d


def wanted_leaves(max_leaf: int, max_ext: int) -> list[tuple[int, int]]:
    leaves = [(0, 0), (1, 0)]
    if max_leaf >= 7:
        leaves.append((7, 0))
    if max_leaf >= 0xD:
        leaves += [(0xD, i) for i in range(MAX_XSAVE_COMPONENT + 1)]
    if max_ext >= 0x80000001:
        leaves.append((0x80000001, 0))
    return leaves


def _arch_xcomp_supp() -> int | None:
    libc = ctypes.CDLL(None, use_errno=True)
    value = ctypes.c_uint64(0)
    rc = libc.syscall(SYS_ARCH_PRCTL, ARCH_GET_XCOMP_SUPP, ctypes.byref(value))
    return int(value.value) if rc == 0 else None


def _auxv(kind: int) -> int | None:
    try:
        data = Path("/proc/self/auxv").read_bytes()
    except OSError:
        return None
    for i in range(0, len(data) - 15, 16):
        k, v = struct.unpack_from("<QQ", data, i)
        if k == kind:
            return int(v)
    return None


def _cpuinfo_text() -> tuple[list[str], str | None]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return [], None
    flags: list[str] = []
    name = None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "flags" and not flags:
            flags = value.split()
        elif key == "model name" and name is None:
            name = value.strip()
    return flags, name


def probe_raw(*, skip_self_test: str | None = None) -> RawFacts:
    """Read this machine. Raises :class:`ProbeError` when CPUID cannot be read at all.

    ``skip_self_test``: why the sigreturn self-test (a forked child, ~3 ms) is not run; the rule is
    then guessed from the release, with that reason (hosts.sigreturn_of)."""
    if os.uname().machine not in ("x86_64", "i686", "i386"):
        raise ProbeError(f"not an x86 machine ({os.uname().machine})")
    facts = RawFacts()
    stubs: _Stubs | None
    try:
        stubs = _Stubs()
    except ProbeError as exc:
        stubs = None
        facts.sources["stub"] = str(exc)
    first = _dev_cpuid(0, 0)
    use_dev = first is not None
    facts.sources["cpuid"] = "/dev/cpu/0/cpuid" if use_dev else "cpuid instruction (ctypes stub)"

    def cpuid(leaf: int, sub: int) -> tuple[int, int, int, int]:
        if use_dev:
            got = _dev_cpuid(leaf, sub)
            if got is not None:
                return got
        if stubs is None:
            raise ProbeError("CPUID unreadable: no /dev/cpu/0/cpuid and no executable stub")
        return stubs.cpuid(leaf, sub)

    max_leaf = cpuid(0, 0)[0]
    max_ext = cpuid(0x80000000, 0)[0]
    for leaf, sub in wanted_leaves(max_leaf, max_ext):
        facts.cpuid[(leaf, sub)] = cpuid(leaf, sub)
    if stubs is not None:
        if facts.cpuid.get((1, 0), (0, 0, 0, 0))[2] >> 27 & 1:  # OSXSAVE: XGETBV faults without it
            facts.xcr0 = stubs.xgetbv(0)
        facts.mxcsr_mask = stubs.mxcsr_mask()
        if use_dev:  # cross-check: the two CPUID paths must agree
            for key in ((0xD, 0), (0xD, 2)):
                if key in facts.cpuid and stubs.cpuid(*key) != facts.cpuid[key]:
                    facts.sources["disagreement"] = (
                        f"CPUID {key} differs between /dev/cpu and the instruction"
                    )
    facts.xcomp_supp = _arch_xcomp_supp()
    facts.minsigstksz = _auxv(AT_MINSIGSTKSZ)
    facts.release = os.uname().release
    facts.flags, facts.model_name = _cpuinfo_text()
    if skip_self_test is None:
        _measure_sigreturn(facts, stubs is not None)
    else:
        facts.sigreturn, facts.sigreturn_detail = "unknown", f"self-test not run: {skip_self_test}"
    return facts


def _measure_sigreturn(facts: RawFacts, can_map_code: bool) -> None:
    from criu_xstate.x86 import sigreturn_probe  # with select and the child's code: only when run

    if not can_map_code:
        facts.sigreturn, facts.sigreturn_detail = "unknown", "no executable page for the self-test"
        return
    has_xsave = bool(facts.cpuid.get((1, 0), (0, 0, 0, 0))[2] >> 27 & 1)  # OSXSAVE
    eax, ebx, _, _ = facts.cpuid.get((0xD, 2), (0, 0, 0, 0))
    size = facts.cpuid.get((0xD, 0), (0, 576, 0, 0))[1]
    m = sigreturn_probe.measure(has_xsave=has_xsave, xcr0=facts.xcr0, avx_end=eax + ebx, user_size=size)
    facts.sigreturn, facts.sigreturn_detail = m.outcome, m.detail


def parse_dump(text: str, source: str) -> RawFacts:
    """Parse the line format of contrib/probe-dump (``key value...``; see its README)."""
    from criu_xstate.x86.sigreturn_probe import OUTCOMES

    facts = RawFacts(sources={"cpuid": f"dump {source}"})

    def num(s: str) -> int:
        return int(s, 0)

    for lineno, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0].startswith("#"):
            continue
        key, args = parts[0], parts[1:]
        try:
            if key == "cpuid" and len(args) == 6:
                leaf, sub, a, b, c, d = (num(x) for x in args)
                facts.cpuid[(leaf, sub)] = (a, b, c, d)
            elif key == "xcr0" and len(args) == 1:
                facts.xcr0 = num(args[0])
            elif key == "xcomp_supp" and len(args) == 1:
                facts.xcomp_supp = num(args[0]) if args[0] != "-" else None
            elif key == "mxcsr_mask" and len(args) == 1:
                facts.mxcsr_mask = num(args[0])
            elif key == "minsigstksz" and len(args) == 1:
                facts.minsigstksz = num(args[0]) or None
            elif key == "release" and len(args) == 1:
                facts.release = args[0]
            elif key == "flags":
                facts.flags = args
            elif key == "model_name":
                facts.model_name = " ".join(args)
            elif key == "sigreturn" and args and args[0] in OUTCOMES:
                facts.sigreturn, facts.sigreturn_detail = args[0], " ".join(args[1:])
            else:
                raise ValueError(f"unknown line {key!r}")
        except ValueError as exc:
            raise ProbeError(f"{source}:{lineno}: {exc}") from None
    if (0, 0) not in facts.cpuid:
        raise ProbeError(f"{source}: no 'cpuid 0x0 0x0 ...' line: not a probe-dump output")
    return facts


def format_dump(facts: RawFacts) -> str:
    """The dump text for ``facts`` (what contrib/probe-dump prints)."""
    lines = ["# criu-xstate probe-dump v1"]
    for (leaf, sub), (a, b, c, d) in sorted(facts.cpuid.items()):
        lines.append(f"cpuid 0x{leaf:x} 0x{sub:x} 0x{a:x} 0x{b:x} 0x{c:x} 0x{d:x}")
    if facts.xcr0 is not None:
        lines.append(f"xcr0 0x{facts.xcr0:x}")
    lines.append(f"xcomp_supp {'-' if facts.xcomp_supp is None else hex(facts.xcomp_supp)}")
    if facts.mxcsr_mask is not None:
        lines.append(f"mxcsr_mask 0x{facts.mxcsr_mask:x}")
    if facts.minsigstksz is not None:
        lines.append(f"minsigstksz {facts.minsigstksz}")
    if facts.release:
        lines.append(f"release {facts.release}")
    if facts.model_name:
        lines.append(f"model_name {facts.model_name}")
    if facts.flags:
        lines.append("flags " + " ".join(facts.flags))
    if facts.sigreturn:
        lines.append(f"sigreturn {facts.sigreturn} {facts.sigreturn_detail}".rstrip())
    return "\n".join(lines) + "\n"
