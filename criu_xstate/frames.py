"""Live signal-frame discovery on a thread's stacks.

A thread checkpointed inside a signal handler has a kernel-built ``rt_sigframe`` on its stack (or on
its sigaltstack), with a raw XSAVE image that the *destination* kernel will judge at ``rt_sigreturn``.
This module finds those frames and only those (research/kernel.md §1.3, §1.6):

* the search starts at the thread's SP and reads only the bytes between SP and the top of the stack
  VMA (or of the sigaltstack) that holds it: its cost grows with stack bytes in use, never with the
  checkpoint's memory size;
* a *candidate* is an address ``F`` with ``F % 16 == 8`` whose first 8 bytes equal the restorer of one
  of the process's sigactions; every other check is run on it and the failures are reported;
* the innermost candidate above SP that passes every check is the innermost live frame; older frames
  of nested signals are found by following the interrupted SP (``uc_mcontext.sp``) outwards, on the
  same stack or across from the sigaltstack to the normal stack;
* candidates below SP are stale (a handler that already returned) and candidates off the live chain
  are reported with their evidence but never as live.

Everything here is pure: memory comes in through the :class:`Memory` protocol.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Protocol

from criu_xstate.errors import MemoryUnreadable
from criu_xstate.x86.sigframe import (
    FP_XSTATE_MAGIC1,
    FP_XSTATE_MAGIC2,
    IA32_FSAVE_HEADER,
    IA32_KERNEL_FPSTATE_OFFSET,
    IA32_RT_KERNEL_FPSTATE_OFFSET,
    MIN_XSTATE_SIZE,
    MXCSR_OFFSET,
    RT_KERNEL_FPSTATE_OFFSET,
    RT_SIGFRAME_64,
    RT_SIGFRAME_IA32,
    SA_SIGINFO,
    SIGFRAME_IA32,
    SW_BYTES,
    SW_BYTES_OFFSET,
    UC_KNOWN_FLAGS,
    USER_CS_32,
    USER_CS_64,
    XSAVE_HEADER_OFFSET,
)

RT_SIGFRAME_SIZE = RT_SIGFRAME_64.size
RT_SC_FPSTATE = RT_SIGFRAME_64.offset("fpstate")
MAX_XSTATE_SIZE = 1 << 20  # hostile-input bound: no CPU has an XSAVE area near this
SCAN_CHUNK = 1 << 16
MAX_SCAN_BYTES = 64 << 20  # a stack deeper than this is refused as hostile
# A real stack holds one restorer address per frame (live or stale); a stack with more candidates than
# this is hostile or corrupt: examining each would cost time and memory without bound (a 7 KB archive
# whose stack is full of restorer addresses took 220 s and 8.8 GB). It is reported as unreadable.
MAX_CANDIDATES_PER_STACK = 4096
STALE_WINDOW = 64 << 10  # how far below SP stale frames are looked for (reported, never rewritten)


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


@dataclass(frozen=True)
class Sigaction:
    signo: int
    handler: int
    flags: int
    restorer: int


@dataclass(frozen=True)
class ThreadStacks:
    """What frame discovery needs to know about a thread."""

    tid: int
    sp: int
    compat: bool = False
    altstack: tuple[int, int] | None = None  # (ss_sp, ss_size) when a sigaltstack is configured
    blocked: int = 0


@dataclass(frozen=True)
class SwBytes:
    """``struct _fpx_sw_bytes`` at XSAVE image + 464."""

    magic1: int
    extended_size: int
    xfeatures: int
    xstate_size: int

    @classmethod
    def parse(cls, image: bytes) -> SwBytes:
        return cls(**SW_BYTES.parse(image[SW_BYTES_OFFSET : SW_BYTES_OFFSET + SW_BYTES.size]))


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


@dataclass(frozen=True)
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
            return max(self.address + self.size, self.xsave_address + self.sw.xstate_size + 4)
        return self.address + self.size

    @property
    def xstate_bv(self) -> int | None:
        if len(self.image) < XSAVE_HEADER_OFFSET + 8:
            return None
        return int(struct.unpack_from("<Q", self.image, XSAVE_HEADER_OFFSET)[0])

    @property
    def xcomp_bv(self) -> int | None:
        if len(self.image) < XSAVE_HEADER_OFFSET + 16:
            return None
        return int(struct.unpack_from("<Q", self.image, XSAVE_HEADER_OFFSET + 8)[0])

    @property
    def mxcsr(self) -> int | None:
        if len(self.image) < MXCSR_OFFSET + 4:
            return None
        return int(struct.unpack_from("<I", self.image, MXCSR_OFFSET)[0])


@dataclass(frozen=True)
class UnreadableStack:
    """A stack range the checkpoint does not hold (lazy pages): the thread's frames cannot be known."""

    tid: int
    stack: StackKind
    error: MemoryUnreadable


@dataclass(frozen=True)
class ThreadFrames:
    tid: int
    frames: tuple[SignalFrame, ...]  # every anchored candidate, live ones first (innermost first)
    unreadable: tuple[UnreadableStack, ...] = ()

    @property
    def live(self) -> list[SignalFrame]:
        return [f for f in self.frames if f.live]


# ------------------------------------------------------------------------------------------------------


def _u64(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", buf, off)[0])


def _u32(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", buf, off)[0])


def _u16(buf: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", buf, off)[0])


@dataclass(frozen=True)
class _Stack:
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


def _stack_for(addr: int, thread: ThreadStacks, memory: Memory, stacks: list[_Stack]) -> _Stack | None:
    for s in stacks:
        if addr in s:
            return s
    region = memory.region_of(addr)
    if region is None:
        return None
    s = _Stack(StackKind.STACK, region[0], region[1])
    stacks.append(s)
    return s


class _Scanner:
    """Reads one stack once (in bounded chunks) and finds restorer anchors in it."""

    def __init__(self, memory: Memory, stack: _Stack, low: int) -> None:
        self.memory = memory
        self.stack = stack
        self.low = max(low, stack.start) & ~0xF
        if stack.end - self.low > MAX_SCAN_BYTES:
            self.low = stack.end - MAX_SCAN_BYTES
        self._buf: bytes | None = None

    def bytes(self) -> bytes:
        if self._buf is None:
            parts = []
            pos = self.low
            while pos < self.stack.end:
                n = min(SCAN_CHUNK, self.stack.end - pos)
                parts.append(self.memory.read(pos, n))
                pos += n
            self._buf = b"".join(parts)
        return self._buf

    def anchors(self, restorers: Iterable[int], width: int, align_mod: int) -> list[int]:
        buf = self.bytes()
        found: set[int] = set()
        for r in restorers:
            needle = r.to_bytes(width, "little")
            i = buf.find(needle)
            while i >= 0:
                addr = self.low + i
                if addr % 16 == align_mod:
                    found.add(addr)
                i = buf.find(needle, i + 1)
        return sorted(found)


def _read_image(memory: Memory, fpstate: int) -> tuple[SwBytes, bytes] | str:
    """The XSAVE image at ``fpstate`` (through magic2), or the name of the failed check."""
    try:
        legacy = memory.read(fpstate, XSAVE_HEADER_OFFSET + 64)
    except MemoryUnreadable as exc:
        return f"fpstate unreadable: {exc.reason}"
    sw = SwBytes.parse(legacy)
    if sw.magic1 != FP_XSTATE_MAGIC1:
        return f"magic1 is 0x{sw.magic1:08x}, not 0x{FP_XSTATE_MAGIC1:08x}"
    if not MIN_XSTATE_SIZE <= sw.xstate_size <= MAX_XSTATE_SIZE:
        return f"xstate_size {sw.xstate_size} outside {MIN_XSTATE_SIZE}..{MAX_XSTATE_SIZE}"
    if sw.xstate_size > sw.extended_size:
        return f"xstate_size {sw.xstate_size} > extended_size {sw.extended_size}"
    try:
        image = memory.read(fpstate, sw.xstate_size + 4)
    except MemoryUnreadable as exc:
        return f"XSAVE image unreadable: {exc.reason}"
    magic2 = _u32(image, sw.xstate_size)
    if magic2 != FP_XSTATE_MAGIC2:
        return f"magic2 at fpstate+{sw.xstate_size} is 0x{magic2:08x}, not 0x{FP_XSTATE_MAGIC2:08x}"
    return sw, image


def _signo_for(info_signo: int | None, pretcode: int, sigactions: Sequence[Sigaction]) -> int | None:
    owners = [sa for sa in sigactions if sa.restorer == pretcode]
    if info_signo is not None:
        for sa in owners:
            if sa.signo == info_signo and sa.flags & SA_SIGINFO:
                return sa.signo
    if len(owners) == 1:
        return owners[0].signo
    return None


def _signo_from_masks(frame: SignalFrame, mask_during: int, sigactions: Sequence[Sigaction]) -> int | None:
    """Without siginfo: the handled signal is blocked while its handler runs (unless SA_NODEFER) and was
    not blocked before it (the frame's uc_sigmask). One candidate left names the signal."""
    fresh = mask_during & ~frame.sigmask
    owners = [sa.signo for sa in sigactions if sa.restorer and fresh >> (sa.signo - 1) & 1]
    return owners[0] if len(owners) == 1 else None


def examine_frame_64(
    memory: Memory, address: int, stack: StackKind, sigactions: Sequence[Sigaction], tid: int
) -> SignalFrame:
    """Run every check on a 64-bit candidate frame at ``address``; liveness is decided by the caller."""
    checks: list[Check] = []
    restorers = {sa.restorer for sa in sigactions if sa.restorer}
    fields = RT_SIGFRAME_64.parse(memory.read(address, RT_SIGFRAME_64.size))
    pretcode = fields["pretcode"]
    uc_flags = fields["uc_flags"]
    uc_link = fields["uc_link"]
    isp = fields["sp"]
    iip = fields["ip"]
    cs = fields["cs"]
    fpstate = fields["fpstate"]
    sigmask = fields["sigmask"]
    oldmask = fields["oldmask"]
    info_signo = fields["si_signo"]

    checks.append(Check("alignment", address % 16 == 8, f"frame 0x{address:x} % 16 == {address % 16}"))
    checks.append(Check("pretcode", pretcode in restorers, f"pretcode 0x{pretcode:x}"))
    checks.append(
        Check(
            "uc_flags",
            uc_flags & ~UC_KNOWN_FLAGS == 0 and uc_link == 0,
            f"uc_flags 0x{uc_flags:x}, uc_link 0x{uc_link:x}",
        )
    )
    checks.append(Check("cs", cs in (USER_CS_64, USER_CS_32), f"cs 0x{cs:x}"))
    checks.append(
        Check(
            "sigmask",
            oldmask == sigmask & 0xFFFFFFFFFFFFFFFF,
            f"oldmask 0x{oldmask:x}, uc_sigmask 0x{sigmask:x}",
        )
    )

    sw: SwBytes | None = None
    image = b""
    if fpstate == 0:
        checks.append(Check("fpstate", True, "no FPU context (fpstate NULL): nothing to translate"))
    elif fpstate % 64:
        checks.append(Check("fpstate", False, f"fpstate 0x{fpstate:x} is not 64-byte aligned"))
    else:
        got = _read_image(memory, fpstate)
        if isinstance(got, str):
            checks.append(Check("fpstate", False, got))
        else:
            sw, image = got
            checks.append(
                Check(
                    "fpstate", True, f"fpstate 0x{fpstate:x}: magic1, xstate_size {sw.xstate_size}, magic2 ok"
                )
            )
    # The interrupted SP lies above the frame and its image when it is on the same stack (kernel.md
    # §1.3); from an altstack it points to the other stack, and a relocated image may be anywhere.
    frame_end = address + RT_SIGFRAME_SIZE
    if fpstate and address < fpstate < isp:
        frame_end = max(frame_end, fpstate + (sw.xstate_size if sw else 0) + 4)
    region = memory.region_of(address)
    same_stack = region is not None and region[0] <= isp < region[1]
    checks.append(
        Check(
            "interrupted_sp",
            isp >= frame_end if same_stack else isp != 0,
            f"interrupted sp 0x{isp:x} vs frame end 0x{frame_end:x}"
            + ("" if same_stack else " (other stack)"),
        )
    )
    return SignalFrame(
        tid=tid,
        abi=Abi.X86_64,
        address=address,
        stack=stack,
        liveness=Liveness.INVALID,
        depth=None,
        checks=tuple(checks),
        signo=_signo_for(info_signo, pretcode, sigactions),
        uc_flags=uc_flags,
        sigmask=sigmask,
        interrupted_ip=iip,
        interrupted_sp=isp,
        fpstate=fpstate or None,
        xsave_address=fpstate or None,
        kernel_layout=fpstate == address + RT_KERNEL_FPSTATE_OFFSET,
        sw=sw,
        image=image,
    )


def examine_frame_ia32(
    memory: Memory, address: int, stack: StackKind, sigactions: Sequence[Sigaction], tid: int, rt: bool
) -> SignalFrame:
    """Run the checks on an ia32 candidate (``rt_sigframe_ia32`` or ``sigframe_ia32``)."""
    layout = RT_SIGFRAME_IA32 if rt else SIGFRAME_IA32
    kernel_off = IA32_RT_KERNEL_FPSTATE_OFFSET if rt else IA32_KERNEL_FPSTATE_OFFSET
    fields = layout.parse(memory.read(address, layout.size))
    restorers = {sa.restorer & 0xFFFFFFFF for sa in sigactions if sa.restorer}
    pretcode = fields["pretcode"]
    fpstate = fields["fpstate"]
    isp = fields["sp"]
    iip = fields["ip"]
    cs = fields["cs"] & 0xFFFF
    checks = [
        Check("alignment", (address + 4) % 16 == 0, f"(frame+4) % 16 == {(address + 4) % 16}"),
        Check("pretcode", pretcode in restorers, f"pretcode 0x{pretcode:x}"),
        Check("cs", cs == USER_CS_32, f"cs 0x{cs:x}"),
    ]
    sw: SwBytes | None = None
    image = b""
    xsave = fpstate + IA32_FSAVE_HEADER if fpstate else None
    if xsave is not None:
        if xsave % 64:
            checks.append(Check("fpstate", False, f"XSAVE image 0x{xsave:x} is not 64-byte aligned"))
        else:
            got = _read_image(memory, xsave)
            if isinstance(got, str):
                checks.append(Check("fpstate", False, got))
            else:
                sw, image = got
                checks.append(Check("fpstate", True, f"fpstate 0x{fpstate:x}, xstate_size {sw.xstate_size}"))
    return SignalFrame(
        tid=tid,
        abi=Abi.IA32_RT if rt else Abi.IA32,
        address=address,
        stack=stack,
        liveness=Liveness.INVALID,
        depth=None,
        checks=tuple(checks),
        signo=fields["sig"] or None,
        interrupted_ip=iip,
        interrupted_sp=isp,
        fpstate=fpstate or None,
        xsave_address=xsave,
        kernel_layout=fpstate == address + kernel_off,
        sw=sw,
        image=image,
    )


def _with(frame: SignalFrame, liveness: Liveness, depth: int | None) -> SignalFrame:
    return replace(frame, liveness=liveness, depth=depth)


def find_frames(thread: ThreadStacks, memory: Memory, sigactions: Sequence[Sigaction]) -> ThreadFrames:
    """Every anchored frame candidate on the thread's stacks, with the live chain marked."""
    restorers = sorted({sa.restorer for sa in sigactions if sa.restorer})
    if not restorers:
        return ThreadFrames(thread.tid, ())
    stacks = _stacks_of(thread, memory)
    examined: dict[int, SignalFrame] = {}
    unreadable: list[UnreadableStack] = []
    scanners: dict[tuple[int, int], _Scanner] = {}

    def candidates_on(stack: _Stack) -> list[int]:
        """Anchors on ``stack``, examined; scanning starts at the lowest address it could hold a frame."""
        key = (stack.start, stack.end)
        if key not in scanners:
            # Stale frames live below SP; they are reported, so scan from a little below SP too.
            low = thread.sp - STALE_WINDOW if thread.sp in stack else stack.start
            scanners[key] = _Scanner(memory, stack, low)
        scanner = scanners[key]
        try:
            if thread.compat:
                rt = scanner.anchors([r & 0xFFFFFFFF for r in restorers], 4, 12)
            else:
                rt = scanner.anchors(restorers, 8, 8)
        except MemoryUnreadable as exc:
            if not any(u.stack is stack.kind for u in unreadable):
                unreadable.append(UnreadableStack(thread.tid, stack.kind, exc))
            return []
        if len(rt) > MAX_CANDIDATES_PER_STACK:
            if not any(u.stack is stack.kind for u in unreadable):
                why = f"{len(rt)} restorer-address candidates (limit {MAX_CANDIDATES_PER_STACK}): not a stack"
                unreadable.append(
                    UnreadableStack(
                        thread.tid,
                        stack.kind,
                        MemoryUnreadable(None, stack.start, stack.end - stack.start, why),
                    )
                )
            return []
        for addr in rt:
            if addr in examined:
                continue
            try:
                if thread.compat:
                    as_rt = RT_SIGFRAME_IA32.parse(memory.read(addr, RT_SIGFRAME_IA32.size))
                    is_rt = as_rt["fpstate"] == addr + IA32_RT_KERNEL_FPSTATE_OFFSET
                    examined[addr] = examine_frame_ia32(
                        memory, addr, stack.kind, sigactions, thread.tid, is_rt
                    )
                else:
                    examined[addr] = examine_frame_64(memory, addr, stack.kind, sigactions, thread.tid)
            except MemoryUnreadable as exc:
                examined[addr] = SignalFrame(
                    tid=thread.tid,
                    abi=Abi.IA32_RT if thread.compat else Abi.X86_64,
                    address=addr,
                    stack=stack.kind,
                    liveness=Liveness.INVALID,
                    depth=None,
                    checks=(Check("readable", False, f"frame bytes unreadable: {exc.reason}"),),
                )
        return rt

    # Walk the live chain: innermost valid frame at or above SP, then outwards via the interrupted SP.
    live: list[int] = []
    cursor = thread.sp
    seen_stacks = 0
    while True:
        stack = _stack_for(cursor, thread, memory, stacks)
        if stack is None:
            break
        anchors = candidates_on(stack)
        nxt = next((a for a in anchors if a >= cursor and a not in live and not examined[a].failed), None)
        if nxt is None:
            break
        live.append(nxt)
        frame = examined[nxt]
        # On one stack a chain goes outwards (up); across stacks (altstack -> the interrupted stack)
        # the next frame may sit at any address. Anything else is hostile: stop.
        if frame.interrupted_sp in stack and frame.interrupted_sp <= nxt:
            break
        cursor = frame.interrupted_sp
        seen_stacks += 1
        if seen_stacks > 64:
            break
    # Scan every stack the thread has for candidates off the chain (stale ones, suspended contexts).
    for stack in list(stacks):
        candidates_on(stack)

    sp_stack = _stack_for(thread.sp, thread, memory, stacks)
    out: list[SignalFrame] = []
    mask_during = thread.blocked  # the mask while the innermost handler runs
    for depth, addr in enumerate(live):
        frame = _with(examined[addr], Liveness.LIVE, depth)
        if frame.signo is None:
            frame = replace(frame, signo=_signo_from_masks(frame, mask_during, sigactions))
        out.append(frame)
        mask_during = frame.sigmask
    for addr in sorted(examined):
        if addr in live:
            continue
        f = examined[addr]
        if f.failed:
            out.append(f)  # INVALID: which check failed is in f.failed
        elif sp_stack is not None and addr in sp_stack and addr < thread.sp:
            out.append(_with(f, Liveness.STALE, None))
        else:
            out.append(_with(f, Liveness.CANDIDATE, None))
    return ThreadFrames(thread.tid, tuple(out), tuple(unreadable))
