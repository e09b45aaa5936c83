"""Live signal-frame discovery on a thread's stacks.

A thread checkpointed inside a signal handler has a kernel-built ``rt_sigframe`` on its stack (or on
its sigaltstack), with a raw XSAVE image that the *destination* kernel will judge at ``rt_sigreturn``.
This module finds those frames and only those (research/kernel.md §1.3, §1.6):

* the search starts at the thread's SP and reads only the bytes between SP and the top of the stack
  VMA (or of the sigaltstack) that holds it: its cost grows with stack bytes in use, never with the
  checkpoint's memory size;
* a *candidate* is an address ``F`` with ``F % 16 == 8`` whose first 8 bytes equal the restorer of one
  of the process's sigactions; the checks of :data:`CHECKS_64` (:data:`CHECKS_IA32`) are run on it,
  each a small function that records its evidence;
* the innermost candidate above SP that passes every check is the innermost live frame; older frames
  of nested signals are found by following the interrupted SP (``uc_mcontext.sp``) outwards, on the
  same stack or across from the sigaltstack to the normal stack;
* candidates below SP are stale (a handler that already returned) and candidates off the live chain
  are reported with their evidence but never as live, up to :data:`MAX_RECORDED` per thread (the
  rest are counted): each anchor is examined once from the stack bytes already read, so a stack full
  of restorer addresses costs work linear in its bytes and bounded memory.

Details and measurements: docs/frame-discovery.md.

Everything here is pure: memory comes in through the :class:`Memory` protocol.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Mapping, Sequence
from enum import StrEnum
from functools import cached_property
from typing import Any, Protocol

from criu_xstate.errors import MemoryUnreadable
from criu_xstate.records import field, record, replace
from criu_xstate.x86.sigframe import (
    IA32_FSAVE_HEADER,
    IA32_KERNEL_FPSTATE_OFFSET,
    IA32_RT_KERNEL_FPSTATE_OFFSET,
    RT_KERNEL_FPSTATE_OFFSET,
    RT_SIGFRAME_64,
    RT_SIGFRAME_IA32,
    SA_SIGINFO,
    SIGFRAME_IA32,
    UC_KNOWN_FLAGS,
    USER_CS_32,
    USER_CS_64,
)
from criu_xstate.x86.xfeatures import LEGACY
from criu_xstate.x86.xsave import (
    FP_XSTATE_MAGIC2,
    LEGACY_AREA_SIZE,
    MAGIC2_SIZE,
    XSAVE_ALIGN,
    SwBytes,
    XsaveImage,
    magic2_at,
)

RT_SIGFRAME_SIZE = RT_SIGFRAME_64.size
RT_SC_FPSTATE = RT_SIGFRAME_64.offset("fpstate")
SCAN_CHUNK = 1 << 16
MAX_SCAN_BYTES = 64 << 20  # a stack deeper than this is refused as hostile
# A real stack holds one restorer address per frame (live or stale); a stack with more candidates than
# this is hostile or corrupt: examining each would cost time and memory without bound (a 7 KB archive
# whose stack is full of restorer addresses took 220 s and 8.8 GB). It is reported as unreadable.
MAX_CANDIDATES_PER_STACK = 4096
STALE_WINDOW = 64 << 10  # how far below SP stale frames are looked for (reported, never rewritten)
MAX_RECORDED = 32  # frames off the live chain kept per thread with their evidence; the rest are counted
MAX_CHAIN = 64  # nested signal frames followed outwards from SP before the chain is called hostile
IMAGE_READ_BUDGET = 64 << 20  # per thread: bytes of XSAVE images read from outside the stacks
PROBE_CACHE = 1024  # sw-bytes probes remembered per thread (a hostile stack repeats one pointer)


class Memory(Protocol):
    """The address space of one process, as much of it as the checkpoint holds."""

    def read(self, vaddr: int, size: int) -> bytes:
        """Bytes at ``vaddr``; raises :class:`MemoryUnreadable` for memory not in the checkpoint."""
        ...

    def region_of(self, vaddr: int) -> tuple[int, int] | None:
        """The ``[start, end)`` of the mapping that holds ``vaddr``, or None if unmapped."""
        ...


class Abi(StrEnum):
    X86_64 = "x86_64"
    IA32_RT = "ia32-rt"
    IA32 = "ia32"


class StackKind(StrEnum):
    STACK = "stack"
    SIGALTSTACK = "sigaltstack"


class Liveness(StrEnum):
    LIVE = "live"  # on the chain from the thread's SP: sigreturn will consume it
    STALE = "stale"  # below SP: a handler that already returned
    CANDIDATE = "candidate"  # looks like a frame but is not on the live chain (e.g. a suspended context)
    INVALID = "invalid"  # anchored by a restorer value but fails a check


@record
class Sigaction:
    """A handler as CRIU recorded it: what a candidate frame's restorer is checked against."""

    signo: int
    handler: int
    flags: int
    restorer: int


@record
class ThreadStacks:
    """What frame discovery needs to know about a thread."""

    tid: int
    sp: int
    compat: bool = False
    altstack: tuple[int, int] | None = None  # (ss_sp, ss_size) when a sigaltstack is configured
    blocked: int = 0


@record
class Check:
    """One named test a candidate frame passed or failed, with what it saw."""

    name: str
    ok: bool
    detail: str


@record
class SignalFrame:
    """One ``rt_sigframe`` (or ia32 frame) found on a thread's stacks, with the evidence for it."""

    tid: int
    abi: Abi
    address: int
    stack: StackKind
    liveness: Liveness
    depth: int | None  # 0 = innermost live frame, 1 = the one it interrupted, ... None if not live
    checks: tuple[Check, ...]
    signo: int | None = None
    uc_flags: int = 0
    sigmask: int = 0
    interrupted_ip: int = 0
    interrupted_sp: int = 0
    fpstate: int | None = None  # address of the XSAVE image as the frame's fpstate pointer says
    xsave_address: int | None = None  # where the FXSAVE/XSAVE image starts (fpstate + 112 for ia32)
    kernel_layout: bool = False  # fpstate at the offset the kernel uses
    sw: SwBytes | None = None
    image: bytes = field(default=b"", repr=False)  # the XSAVE image: xstate_size bytes + magic2

    @property
    def live(self) -> bool:
        return self.liveness is Liveness.LIVE

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    @property
    def size(self) -> int:
        return {Abi.X86_64: RT_SIGFRAME_64, Abi.IA32_RT: RT_SIGFRAME_IA32, Abi.IA32: SIGFRAME_IA32}[
            self.abi
        ].size

    @property
    def end(self) -> int:
        """First byte above the frame and its XSAVE image (magic2 included)."""
        if self.xsave_address is not None and self.sw is not None:
            return max(self.address + self.size, self.xsave_address + self.sw.frame_bytes)
        return self.address + self.size

    @property
    def fxsave_only(self) -> bool:
        """The image is FXSAVE's 512 bytes (a source CPU without XSAVE): no header, no magic2."""
        return self.sw is not None and self.sw.fxsave_only

    # The image's header fields, read once (the plan's rules and its report each ask for them).

    @cached_property
    def xstate_bv(self) -> int | None:
        if self.fxsave_only:
            return LEGACY  # what FXRSTOR restores from such an image: x87 and SSE, always
        return XsaveImage(self.image).xstate_bv

    @cached_property
    def xcomp_bv(self) -> int | None:
        return XsaveImage(self.image).xcomp_bv

    @cached_property
    def mxcsr(self) -> int | None:
        return XsaveImage(self.image).mxcsr


@record
class UnreadableStack:
    """A stack range the checkpoint does not hold (lazy pages): the thread's frames cannot be known."""

    tid: int
    stack: StackKind
    error: MemoryUnreadable


@record
class ThreadFrames:
    """The signal frames found on one thread's stacks, and the stacks that could not be read."""

    tid: int
    frames: tuple[SignalFrame, ...]  # live ones first (innermost first), then others by address
    unreadable: tuple[UnreadableStack, ...] = ()
    examined: int = 0  # anchored candidates examined
    omitted: int = 0  # candidates off the live chain beyond MAX_RECORDED: counted, not listed

    @property
    def live(self) -> list[SignalFrame]:
        return [f for f in self.frames if f.live]


# ------------------------------------------------------------------------------------------------------


@record
class _Stack:
    """One range frames are searched in: the stack mapping that holds SP, or the sigaltstack."""

    kind: StackKind
    start: int
    end: int

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.start <= addr < self.end


def _stacks_of(thread: ThreadStacks, memory: Memory) -> list[_Stack]:
    stacks: list[_Stack] = []
    alt: _Stack | None = None
    if thread.altstack is not None and thread.altstack[1] > 0:
        alt = _Stack(StackKind.SIGALTSTACK, thread.altstack[0], thread.altstack[0] + thread.altstack[1])
    if alt is None or thread.sp not in alt:
        region = memory.region_of(thread.sp)
        if region is not None:
            stacks.append(_Stack(StackKind.STACK, region[0], region[1]))
    if alt is not None:
        stacks.append(alt)
    return stacks


class _Scanner:
    """Reads one stack once (in bounded chunks) and finds restorer anchors in it."""

    def __init__(self, memory: Memory, stack: _Stack, low: int) -> None:
        self.memory = memory
        self.stack = stack
        self.low = max(low, stack.start) & ~0xF
        if stack.end - self.low > MAX_SCAN_BYTES:
            self.low = stack.end - MAX_SCAN_BYTES
        self.buf: bytes | None = None

    def bytes(self) -> bytes:
        if self.buf is None:
            parts = []
            pos = self.low
            while pos < self.stack.end:
                n = min(SCAN_CHUNK, self.stack.end - pos)
                parts.append(self.memory.read(pos, n))
                pos += n
            self.buf = b"".join(parts)
        return self.buf

    def holds(self, vaddr: int, size: int) -> bool:
        return self.buf is not None and self.low <= vaddr and vaddr + size <= self.stack.end

    def anchors(self, restorers: Iterable[int], width: int, align_mod: int) -> list[int]:
        """Addresses ``== align_mod (mod 16)`` holding a restorer. Only those slots are searched: one
        byte of each (the restorer's lowest non-zero byte) is sliced out of the buffer and searched
        with memchr, and each hit is compared whole. Searching the whole buffer for the 8-byte needle
        hit bytes.find's slow path on zeroed stack pages (the needle ends in zeros): 194 us per 64 KiB
        of a real stack instead of 5 (tests/test_perf_invariants.py compares the two)."""
        buf = self.bytes()
        found: set[int] = set()
        first = (align_mod - self.low) % 16  # buf index of the first slot
        for r in restorers:
            needle = r.to_bytes(width, "little")
            j = next((k for k, b in enumerate(needle) if b), 0)
            column = buf[first + j :: 16]  # byte j of every slot
            k = column.find(needle[j : j + 1])
            while k >= 0:
                at = first + 16 * k
                if buf[at : at + width] == needle:
                    found.add(self.low + at)
                k = column.find(needle[j : j + 1], k + 1)
        return sorted(found)


class _Reader:
    """Memory as examination sees it: stack bytes already scanned come from the scan buffers (each stack
    is read once); sw-bytes probes are remembered; whole images from outside the stacks count against
    :data:`IMAGE_READ_BUDGET`. This is what keeps a stack full of anchors linear in its bytes."""

    def __init__(self, memory: Memory) -> None:
        self.memory = memory
        self.scanners: list[_Scanner] = []
        self.probes: dict[int, SwBytes | str] = {}
        self.budget = IMAGE_READ_BUDGET

    def read(self, vaddr: int, size: int) -> bytes:
        for s in self.scanners:
            if s.holds(vaddr, size):
                assert s.buf is not None
                return s.buf[vaddr - s.low : vaddr - s.low + size]
        return self.memory.read(vaddr, size)

    def region_of(self, vaddr: int) -> tuple[int, int] | None:
        return self.memory.region_of(vaddr)

    def probe(self, xsave: int) -> SwBytes | str:
        """The image's sw bytes if magic1, sizes, magic2 and readability hold, else the failed check."""
        if xsave not in self.probes:
            if len(self.probes) >= PROBE_CACHE:
                self.probes.clear()
            self.probes[xsave] = self._probe(xsave)
        return self.probes[xsave]

    def _probe(self, xsave: int) -> SwBytes | str:
        try:
            sw = SwBytes.parse(self.read(xsave, LEGACY_AREA_SIZE))
        except MemoryUnreadable as exc:
            return f"fpstate unreadable: {exc.reason}"
        problem = sw.problem()
        if problem is not None:
            return problem
        try:
            self._check_readable(xsave, sw.frame_bytes)
            if sw.fxsave_only:
                return sw  # no magic2 after an FXSAVE image; the frame's other checks must hold alone
            word = self.read(xsave + sw.xstate_size, MAGIC2_SIZE)
        except MemoryUnreadable as exc:
            return f"XSAVE image unreadable: {exc.reason}"
        magic2 = magic2_at(word, 0)
        if magic2 != FP_XSTATE_MAGIC2:
            return f"magic2 at fpstate+{sw.xstate_size} is 0x{magic2:08x}, not 0x{FP_XSTATE_MAGIC2:08x}"
        return sw

    def _check_readable(self, vaddr: int, size: int) -> None:
        if any(s.holds(vaddr, size) for s in self.scanners):
            return
        if size > self.budget:
            raise MemoryUnreadable("", vaddr, size, "per-thread image read budget spent (hostile stack)")
        self.budget -= size
        self.memory.read(vaddr, size)


# --- one candidate and the checks on it -----------------------------------------------------------------


class _Candidate:
    """A frame's fields as read at ``address``; the XSAVE image its fpstate names is probed on first use
    (a candidate whose header already fails costs no image read). Built once per anchor: the survey's
    quick pass and the examination with evidence share it, and so its fields, its probe and its region."""

    __slots__ = (
        "_probe",
        "_probed",
        "_region",
        "_region_known",
        "abi",
        "address",
        "fields",
        "reader",
        "restorers",
        "xsave",
    )

    def __init__(
        self, abi: Abi, address: int, fields: Mapping[str, int], restorers: frozenset[int], reader: _Reader
    ) -> None:
        self.abi, self.address, self.fields = abi, address, fields
        self.restorers, self.reader = restorers, reader
        fpstate = fields["fpstate"]
        # Where the FXSAVE/XSAVE image starts (None: fpstate NULL, no FPU context).
        self.xsave = None if not fpstate else fpstate if abi is Abi.X86_64 else fpstate + IA32_FSAVE_HEADER
        self._probe: SwBytes | str | None = None
        self._probed = False
        self._region: tuple[int, int] | None = None
        self._region_known = False

    @property
    def fpstate(self) -> int:
        return self.fields["fpstate"]

    def probe(self) -> SwBytes | str | None:
        """The image's sw bytes, or why it fails; None when there is no aligned image to probe."""
        if not self._probed:
            xsave = self.xsave
            self._probe = None if xsave is None or xsave % XSAVE_ALIGN else self.reader.probe(xsave)
            self._probed = True
        return self._probe

    @property
    def sw(self) -> SwBytes | None:
        """The image's sw bytes when they hold (probed on first use, like ``probe``)."""
        probe = self.probe()
        return probe if isinstance(probe, SwBytes) else None

    def same_region(self, addr: int) -> bool:
        """Is ``addr`` on the mapping that holds the frame?"""
        if not self._region_known:
            self._region, self._region_known = self.reader.region_of(self.address), True
        region = self._region
        return region is not None and region[0] <= addr < region[1]


@record
class CheckRow:
    """One check of a candidate: ``test`` says whether it holds (None: it does not apply), ``evidence``
    what was seen. The survey's quick pass runs the tests alone; a reported frame records both. (A
    record, not a NamedTuple: typing.NamedTuple cost ~1.2 ms of each hook's start-up.)"""

    name: str
    test: Callable[[_Candidate], bool | None]
    evidence: Callable[[_Candidate], str]


def _aligned_64(c: _Candidate) -> bool:
    return c.address % 16 == 8


def _alignment_64(c: _Candidate) -> str:
    return f"frame 0x{c.address:x} % 16 == {c.address % 16}"


def _aligned_ia32(c: _Candidate) -> bool:
    return (c.address + 4) % 16 == 0


def _alignment_ia32(c: _Candidate) -> str:
    return f"(frame+4) % 16 == {(c.address + 4) % 16}"


def _pretcode_ok(c: _Candidate) -> bool:
    return c.fields["pretcode"] in c.restorers


def _pretcode(c: _Candidate) -> str:
    return f"pretcode 0x{c.fields['pretcode']:x}"


def _uc_flags_ok(c: _Candidate) -> bool:
    return c.fields["uc_flags"] & ~UC_KNOWN_FLAGS == 0 and c.fields["uc_link"] == 0


def _uc_flags(c: _Candidate) -> str:
    return f"uc_flags 0x{c.fields['uc_flags']:x}, uc_link 0x{c.fields['uc_link']:x}"


def _cs_64_ok(c: _Candidate) -> bool:
    return c.fields["cs"] in (USER_CS_64, USER_CS_32)


def _cs_64(c: _Candidate) -> str:
    return f"cs 0x{c.fields['cs']:x}"


def _cs_ia32_ok(c: _Candidate) -> bool:
    return c.fields["cs"] & 0xFFFF == USER_CS_32


def _cs_ia32(c: _Candidate) -> str:
    return f"cs 0x{c.fields['cs'] & 0xFFFF:x}"


def _sigmask_ok(c: _Candidate) -> bool:
    return c.fields["oldmask"] == c.fields["sigmask"] & 0xFFFFFFFFFFFFFFFF


def _sigmask(c: _Candidate) -> str:
    return f"oldmask 0x{c.fields['oldmask']:x}, uc_sigmask 0x{c.fields['sigmask']:x}"


def _fpstate_64_ok(c: _Candidate) -> bool:
    fpstate = c.fields["fpstate"]
    if fpstate == 0:
        return True
    if fpstate % XSAVE_ALIGN:
        return False
    return c.sw is not None


def _fpstate_64(c: _Candidate) -> str:
    if c.fpstate == 0:
        return "no FPU context (fpstate NULL): nothing to translate"
    if c.fpstate % XSAVE_ALIGN:
        return f"fpstate 0x{c.fpstate:x} is not 64-byte aligned"
    sw = c.sw
    if sw is None:
        return str(c.probe())
    if sw.fxsave_only:
        return f"fpstate 0x{c.fpstate:x}: magic1, FXSAVE image (512 bytes, no magic2)"
    return f"fpstate 0x{c.fpstate:x}: magic1, xstate_size {sw.xstate_size}, magic2 ok"


def _fpstate_ia32_ok(c: _Candidate) -> bool | None:
    if c.xsave is None:
        return None  # no FPU context: nothing to check
    if c.xsave % XSAVE_ALIGN:
        return False
    return c.sw is not None


def _fpstate_ia32(c: _Candidate) -> str:
    if c.xsave is not None and c.xsave % XSAVE_ALIGN:
        return f"XSAVE image 0x{c.xsave:x} is not 64-byte aligned"
    sw = c.sw
    if sw is None:
        return str(c.probe())
    return f"fpstate 0x{c.fpstate:x}, xstate_size {sw.xstate_size}"


def _frame_end(c: _Candidate) -> int:
    """Where the frame and, when it lies between the frame and the interrupted SP, its image end."""
    isp, end = c.fields["sp"], c.address + RT_SIGFRAME_SIZE
    fpstate = c.fields["fpstate"]
    if fpstate and c.address < fpstate < isp:
        sw = c.sw
        end = max(end, fpstate + (sw.frame_bytes if sw else 0))
    return end


def _interrupted_sp_ok(c: _Candidate) -> bool:
    """The interrupted SP lies above the frame and its image when it is on the same stack (kernel.md
    §1.3); from an altstack it points to the other stack, and a relocated image may be anywhere."""
    isp = c.fields["sp"]
    if c.same_region(isp):
        return isp >= _frame_end(c)
    return isp != 0


def _interrupted_sp(c: _Candidate) -> str:
    isp, end = c.fields["sp"], _frame_end(c)
    if c.same_region(isp):
        return f"interrupted sp 0x{isp:x} vs frame end 0x{end:x}"
    return f"interrupted sp 0x{isp:x} vs frame end 0x{end:x} (other stack)"


# The checks every candidate goes through, in order; each records a Check with its evidence.
CHECKS_64: tuple[CheckRow, ...] = (
    CheckRow("alignment", _aligned_64, _alignment_64),
    CheckRow("pretcode", _pretcode_ok, _pretcode),
    CheckRow("uc_flags", _uc_flags_ok, _uc_flags),
    CheckRow("cs", _cs_64_ok, _cs_64),
    CheckRow("sigmask", _sigmask_ok, _sigmask),
    CheckRow("fpstate", _fpstate_64_ok, _fpstate_64),
    CheckRow("interrupted_sp", _interrupted_sp_ok, _interrupted_sp),
)
CHECKS_IA32: tuple[CheckRow, ...] = (
    CheckRow("alignment", _aligned_ia32, _alignment_ia32),
    CheckRow("pretcode", _pretcode_ok, _pretcode),
    CheckRow("cs", _cs_ia32_ok, _cs_ia32),
    CheckRow("fpstate", _fpstate_ia32_ok, _fpstate_ia32),
)


def _table(c: _Candidate) -> tuple[CheckRow, ...]:
    return CHECKS_64 if c.abi is Abi.X86_64 else CHECKS_IA32


def _run_checks(c: _Candidate) -> tuple[Check, ...]:
    """Every check of the candidate's ABI, each with its evidence."""
    return tuple(Check(row.name, ok, row.evidence(c)) for row in _table(c) if (ok := row.test(c)) is not None)


def _passes(c: _Candidate) -> bool:
    """Whether every check holds, stopping at the first that fails (no evidence kept)."""
    return all(row.test(c) is not False for row in _table(c))


# --- examining a candidate ---------------------------------------------------------------------------

_LAYOUTS = {Abi.X86_64: RT_SIGFRAME_64, Abi.IA32_RT: RT_SIGFRAME_IA32, Abi.IA32: SIGFRAME_IA32}
_KERNEL_FPSTATE = {
    Abi.X86_64: RT_KERNEL_FPSTATE_OFFSET,
    Abi.IA32_RT: IA32_RT_KERNEL_FPSTATE_OFFSET,
    Abi.IA32: IA32_KERNEL_FPSTATE_OFFSET,
}


def _restorers(sigactions: Sequence[Sigaction], abi: Abi) -> frozenset[int]:
    width = 0xFFFFFFFFFFFFFFFF if abi is Abi.X86_64 else 0xFFFFFFFF
    return frozenset(sa.restorer & width for sa in sigactions if sa.restorer)


def _candidate(reader: _Reader, abi: Abi, address: int, restorers: frozenset[int]) -> _Candidate:
    fields = _LAYOUTS[abi].parse(reader.read(address, _LAYOUTS[abi].size))
    return _Candidate(abi, address, fields, restorers, reader)


def _frame_of(
    c: _Candidate,
    checks: tuple[Check, ...],
    stack: StackKind,
    tid: int,
    sigactions: Sequence[Sigaction],
    *,
    liveness: Liveness = Liveness.INVALID,
    depth: int | None = None,
    mask_during: int | None = None,
    with_image: bool = False,
) -> SignalFrame:
    """The frame the candidate is. A live one is built once, as reported: ``mask_during`` (the mask
    while its handler runs) names its signal when siginfo does not, and ``with_image`` reads its image
    (see :func:`_with_image`)."""
    f = c.fields
    if c.abi is Abi.X86_64:
        signo = _signo_for(f["si_signo"], f["pretcode"], sigactions)
        uc_flags, sigmask = f["uc_flags"], f["sigmask"]
    else:
        signo, uc_flags, sigmask = f["sig"] or None, 0, 0
    if signo is None and mask_during is not None:
        signo = _signo_from_masks(sigmask, mask_during, sigactions)
    sw, xsave = c.sw, c.xsave
    image = b""
    if with_image and sw is not None and xsave is not None:
        image = c.reader.read(xsave, sw.frame_bytes)
    return SignalFrame(
        tid,
        c.abi,
        c.address,
        stack,
        liveness,
        depth,
        checks,
        signo,
        uc_flags,
        sigmask,
        f["ip"],
        f["sp"],
        f["fpstate"] or None,
        xsave,
        f["fpstate"] == c.address + _KERNEL_FPSTATE[c.abi],
        sw,
        image,
    )


def _with_image(frame: SignalFrame, reader: _Reader, **changes: Any) -> SignalFrame:
    """The frame as reported: with its XSAVE image (through magic2) read and ``changes`` made (one copy
    of the frame, not one per change)."""
    if frame.sw is not None and frame.xsave_address is not None:
        changes["image"] = reader.read(frame.xsave_address, frame.sw.frame_bytes)
    return replace(frame, **changes) if changes else frame


def _examine(
    reader: _Reader, abi: Abi, address: int, stack: StackKind, sigactions: Sequence[Sigaction], tid: int
) -> SignalFrame:
    """Every check on a candidate, without reading its whole image (see :func:`_with_image`)."""
    try:
        c = _candidate(reader, abi, address, _restorers(sigactions, abi))
    except MemoryUnreadable as exc:
        return _unreadable_frame(exc, abi, address, stack, tid)
    return _frame_of(c, _run_checks(c), stack, tid, sigactions)


def _unreadable_frame(
    exc: MemoryUnreadable, abi: Abi, address: int, stack: StackKind, tid: int
) -> SignalFrame:
    unreadable = Check("readable", False, f"frame bytes unreadable: {exc.reason}")
    return SignalFrame(tid, abi, address, stack, Liveness.INVALID, None, (unreadable,))


def examine_frame_64(
    memory: Memory, address: int, stack: StackKind, sigactions: Sequence[Sigaction], tid: int
) -> SignalFrame:
    """Run every check on a 64-bit candidate frame at ``address``; liveness is decided by the caller."""
    reader = _Reader(memory)
    return _with_image(_examine(reader, Abi.X86_64, address, stack, sigactions, tid), reader)


def examine_frame_ia32(
    memory: Memory, address: int, stack: StackKind, sigactions: Sequence[Sigaction], tid: int, rt: bool
) -> SignalFrame:
    """Run the checks on an ia32 candidate (``rt_sigframe_ia32`` or ``sigframe_ia32``)."""
    reader = _Reader(memory)
    abi = Abi.IA32_RT if rt else Abi.IA32
    return _with_image(_examine(reader, abi, address, stack, sigactions, tid), reader)


def _signo_for(info_signo: int | None, pretcode: int, sigactions: Sequence[Sigaction]) -> int | None:
    owners = [sa for sa in sigactions if sa.restorer == pretcode]
    if info_signo is not None:
        for sa in owners:
            if sa.signo == info_signo and sa.flags & SA_SIGINFO:
                return sa.signo
    if len(owners) == 1:
        return owners[0].signo
    return None


def _signo_from_masks(sigmask: int, mask_during: int, sigactions: Sequence[Sigaction]) -> int | None:
    """Without siginfo: the handled signal is blocked while its handler runs (unless SA_NODEFER) and was
    not blocked before it (the frame's uc_sigmask, ``sigmask``). One candidate left names the signal."""
    fresh = mask_during & ~sigmask
    owners = [sa.signo for sa in sigactions if sa.restorer and fresh >> (sa.signo - 1) & 1]
    return owners[0] if len(owners) == 1 else None


# --- the thread: surveys of its stacks, the live chain, the report ----------------------------------------


@record(frozen=False)
class _Survey:
    """What examining one stack's anchors left: the addresses that pass every check (ascending), and the
    rejected candidates, at most :data:`MAX_RECORDED` per thread of them with their evidence."""

    stack: _Stack
    valid: list[int] = field(default_factory=list)
    rejected: list[SignalFrame] = field(default_factory=list)


class SigactionIndex:
    """What discovery derives from a process's sigactions: the restorer addresses anchors are searched
    for (as 64-bit and as compat values) and each ABI's set of them. Made once per process
    (``Process.frame_index``), not once per thread."""

    __slots__ = ("anchored", "compat_restorers", "restorers", "sigactions")

    def __init__(self, sigactions: Sequence[Sigaction]) -> None:
        self.sigactions = sigactions
        self.restorers = sorted({sa.restorer for sa in sigactions if sa.restorer})
        self.compat_restorers = [r & 0xFFFFFFFF for r in self.restorers]
        self.anchored = {abi: _restorers(sigactions, abi) for abi in Abi}


class _Thread:
    """Frame discovery for one thread. Each stack is read once and each anchor examined once; what is
    kept is the valid addresses and a bounded number of rejected frames."""

    def __init__(self, thread: ThreadStacks, memory: Memory, index: SigactionIndex) -> None:
        self.thread = thread
        self.memory = memory
        self.index = index
        self.sigactions = index.sigactions
        self.restorers = index.restorers
        self.anchored = index.anchored
        self.stacks = _stacks_of(thread, memory)
        self.reader = _Reader(memory)
        self.surveys: dict[_Stack, _Survey] = {}
        self.unreadable: list[UnreadableStack] = []
        self.examined = 0
        self.rejected = 0
        self._frames: dict[tuple[int, StackKind], SignalFrame] = {}
        self._candidates: dict[int, _Candidate] = {}

    def candidate(self, addr: int) -> _Candidate:
        """The candidate at ``addr``, parsed once (MemoryUnreadable if its bytes are not there)."""
        c = self._candidates.get(addr)
        if c is None:
            abi = self.abi_at(addr)
            c = self._candidates[addr] = _candidate(self.reader, abi, addr, self.anchored[abi])
        return c

    def stack_for(self, addr: int) -> _Stack | None:
        for s in self.stacks:
            if addr in s:
                return s
        region = self.memory.region_of(addr)
        if region is None:
            return None
        s = _Stack(StackKind.STACK, region[0], region[1])
        self.stacks.append(s)
        return s

    def anchors(self, stack: _Stack) -> list[int]:
        """Restorer anchors on ``stack``, scanning from a little below SP (stale frames are reported)."""
        low = self.thread.sp - STALE_WINDOW if self.thread.sp in stack else stack.start
        scanner = _Scanner(self.memory, stack, low)
        try:
            if self.thread.compat:
                found = scanner.anchors(self.index.compat_restorers, 4, 12)
            else:
                found = scanner.anchors(self.restorers, 8, 8)
        except MemoryUnreadable as exc:
            self._unreadable(stack, exc)
            return []
        if len(found) > MAX_CANDIDATES_PER_STACK:
            why = f"{len(found)} restorer-address candidates (limit {MAX_CANDIDATES_PER_STACK}): not a stack"
            self._unreadable(stack, MemoryUnreadable(None, stack.start, stack.end - stack.start, why))
            return []
        self.reader.scanners.append(scanner)
        return found

    def _unreadable(self, stack: _Stack, exc: MemoryUnreadable) -> None:
        if not any(u.stack is stack.kind for u in self.unreadable):
            self.unreadable.append(UnreadableStack(self.thread.tid, stack.kind, exc))

    def abi_at(self, addr: int) -> Abi:
        if not self.thread.compat:
            return Abi.X86_64
        head = RT_SIGFRAME_IA32.parse(self.reader.read(addr, RT_SIGFRAME_IA32.size))
        return Abi.IA32_RT if head["fpstate"] == addr + IA32_RT_KERNEL_FPSTATE_OFFSET else Abi.IA32

    def _abi_or_rt(self, addr: int) -> Abi:
        try:
            return self.abi_at(addr)
        except MemoryUnreadable:
            return Abi.IA32_RT  # the frame reports the unreadable bytes

    def examine(self, addr: int, stack: _Stack) -> SignalFrame:
        """The frame at ``addr`` (examined once: the live chain and the report both ask for it)."""
        key = (addr, stack.kind)
        frame = self._frames.get(key)
        if frame is None:
            try:
                c = self.candidate(addr)
            except MemoryUnreadable as exc:
                frame = _unreadable_frame(exc, self._abi_or_rt(addr), addr, stack.kind, self.thread.tid)
            else:
                frame = _frame_of(c, _run_checks(c), stack.kind, self.thread.tid, self.sigactions)
            self._frames[key] = frame
        return frame

    def passes(self, addr: int) -> bool:
        try:
            return _passes(self.candidate(addr))
        except MemoryUnreadable:
            return False

    def survey(self, stack: _Stack) -> _Survey:
        if stack not in self.surveys:
            got = _Survey(stack)
            for addr in self.anchors(stack):
                self.examined += 1
                if self.passes(addr):
                    got.valid.append(addr)
                    continue
                self.rejected += 1
                if self.rejected <= MAX_RECORDED:
                    got.rejected.append(self.examine(addr, stack))
            self.surveys[stack] = got
        return self.surveys[stack]

    def live_chain(self) -> list[tuple[int, _Stack]]:
        """The innermost valid frame at or above SP, then outwards via each frame's interrupted SP."""
        chain: list[tuple[int, _Stack]] = []
        cursor = self.thread.sp
        while len(chain) <= MAX_CHAIN and (stack := self.stack_for(cursor)) is not None:
            valid = self.survey(stack).valid
            taken = {a for a, _ in chain}
            i = bisect_left(valid, cursor)
            nxt = next((a for a in valid[i:] if a not in taken), None)
            if nxt is None:
                break
            chain.append((nxt, stack))
            isp = self.candidate(nxt).fields["sp"]  # it passed: its bytes were read
            # On one stack a chain goes outwards (up); across stacks (altstack -> the interrupted stack)
            # the next frame may sit at any address. Anything else is hostile: stop.
            if isp in stack and isp <= nxt:
                break
            cursor = isp
        return chain

    def liveness_off_chain(self, addr: int) -> Liveness:
        sp_stack = self.stack_for(self.thread.sp)
        if sp_stack is not None and addr in sp_stack and addr < self.thread.sp:
            return Liveness.STALE
        return Liveness.CANDIDATE

    def live_frames(self, chain: list[tuple[int, _Stack]]) -> list[SignalFrame]:
        out: list[SignalFrame] = []
        mask_during = self.thread.blocked  # the mask while the innermost handler runs
        for depth, (addr, stack) in enumerate(chain):
            c = self.candidate(addr)  # on the chain: it passed every check
            frame = _frame_of(
                c,
                _run_checks(c),
                stack.kind,
                self.thread.tid,
                self.sigactions,
                liveness=Liveness.LIVE,
                depth=depth,
                mask_during=mask_during,
                with_image=True,
            )
            out.append(frame)
            mask_during = frame.sigmask
        return out

    def other_frames(self, chain: list[tuple[int, _Stack]]) -> tuple[list[SignalFrame], int]:
        """Frames off the live chain by address, at most MAX_RECORDED, and how many more there were."""
        on_chain = {a for a, _ in chain}
        valid = [(a, s) for s in list(self.stacks) for a in self.survey(s).valid if a not in on_chain]
        rejected = [f for sv in self.surveys.values() for f in sv.rejected]
        if not valid and not rejected:
            return [], self.rejected  # the common case: the live chain is all there is
        picked: list[tuple[int, SignalFrame | _Stack]] = [*valid, *((f.address, f) for f in rejected)]
        out: list[SignalFrame] = []
        for addr, what in sorted(picked, key=lambda p: p[0])[:MAX_RECORDED]:
            if isinstance(what, SignalFrame):
                out.append(_with_image(what, self.reader))  # INVALID: which check failed is in failed
            else:
                frame = self.examine(addr, what)
                out.append(_with_image(frame, self.reader, liveness=self.liveness_off_chain(addr)))
        omitted = len(valid) + self.rejected - len(out)
        return out, omitted


def find_frames(
    thread: ThreadStacks,
    memory: Memory,
    sigactions: Sequence[Sigaction],
    *,
    index: SigactionIndex | None = None,
) -> ThreadFrames:
    """Every anchored frame candidate on the thread's stacks (those off the live chain up to
    :data:`MAX_RECORDED`, the rest counted), with the live chain marked. ``index``: the process's
    :class:`SigactionIndex` of ``sigactions``, when the caller keeps one."""
    t = _Thread(thread, memory, index if index is not None else SigactionIndex(sigactions))
    if not t.restorers:
        return ThreadFrames(thread.tid, ())
    chain = t.live_chain()
    others, omitted = t.other_frames(chain)  # every stack the thread has: stale frames, suspended contexts
    frames = (*t.live_frames(chain), *others)
    return ThreadFrames(thread.tid, frames, tuple(t.unreadable), t.examined, omitted)
