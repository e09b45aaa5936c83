"""Measure the running kernel's sigreturn rule (kernel.md §0.6) instead of guessing it from the release.

The self-test (docs/sigreturn-probe.md) runs in a forked child, so a kernel that kills it cannot hurt
the probing process. The child maps a page of machine code (no compiler needed) that:

1. puts a known 32-byte pattern in YMM15 and sends itself SIGUSR1 (``run``);
2. in the handler (installed with a raw ``rt_sigaction`` and our own restorer), rewrites the frame's
   XSAVE image: magic2 at the kernel's place is cleared, ``fpx_sw_bytes.xstate_size`` becomes N (the
   end of the AVX component) with ``extended_size`` N + 4 and magic2 at ``fpstate + N``, and
   ``sw.xfeatures`` / ``XSTATE_BV`` are masked to x87|SSE|AVX;
3. after ``rt_sigreturn`` stores YMM15 back.

A kernel with the frame-size rule finds magic2 and restores YMM15 in full; one with the user-size rule
looks at ``fpstate + user_size``, finds nothing and restores x87/SSE only: the upper half is zeroed.
A control run first rewrites the frame the same way but keeps its own size: YMM15 must survive it
under both rules, else the test itself is broken and the answer is "unknown".
"""

from __future__ import annotations

import ctypes
import marshal
import mmap
import os
import select
import signal
import struct
import time

from criu_xstate.records import record
from criu_xstate.x86.sigframe import RT_SIGFRAME_64, SA_RESTORER, SA_SIGINFO
from criu_xstate.x86.xsave import (
    FP_XSTATE_MAGIC2,
    MIN_XSTATE_SIZE,
    SW_BYTES,
    SW_BYTES_OFFSET,
    XSAVE_HEADER_OFFSET,
)

FRAME_SIZE = "frame-size"
USER_SIZE = "user-size"
CANNOT_MATTER = "cannot-matter"
UNKNOWN = "unknown"
OUTCOMES = (FRAME_SIZE, USER_SIZE, CANNOT_MATTER, UNKNOWN)

AVX_MASK = 0x7  # x87 | SSE | AVX: what the rewritten frame claims
SYS_RT_SIGACTION = 13
TIMEOUT = 10.0

_UC_FPSTATE = RT_SIGFRAME_64.offset("fpstate") - RT_SIGFRAME_64.offset("uc_flags")  # handler's rdx + 224
_SW_SIZE = SW_BYTES_OFFSET + SW_BYTES.offset("xstate_size")  # 480
_SW_EXT = SW_BYTES_OFFSET + SW_BYTES.offset("extended_size")  # 468
_SW_XF = SW_BYTES_OFFSET + SW_BYTES.offset("xfeatures")  # 472

# Page layout: code at fixed offsets, then the parameter block and the YMM buffers.
HANDLER, RESTORER, RUN, PARAMS, PATTERN_IN, PATTERN_OUT = 0x000, 0x080, 0x0C0, 0x200, 0x240, 0x280
# PARAMS: u32 new size (0 = keep the frame's own), u64 mask at +8; the handler records the frame's
# own xstate_size at +16 and its sw.xfeatures at +24.

# handler(sig=rdi, info=rsi, uc=rdx):
#   movabs r8, PARAMS; mov rcx, [rdx+224] (uc_mcontext.fpstate); test rcx,rcx; jz ret
#   mov eax, [rcx+480] (xstate_size); mov [r8+16], rax; mov r9, [rcx+472]; mov [r8+24], r9
#   mov dword [rcx+rax], 0 (clear magic2); mov r9d, [r8]; test r9d,r9d; cmovz r9d, eax
#   mov [rcx+480], r9d; lea eax, [r9+4]; mov [rcx+468], eax (extended_size)
#   mov dword [rcx+r9], MAGIC2; mov rax, [r8+8]; and [rcx+472], rax; and [rcx+512], rax; ret
_HANDLER_HEAD = bytes.fromhex("49b8")  # + PARAMS address (imm64)
_HANDLER_BODY = bytes.fromhex(
    "488b8ae0000000 4885c9 7451 8b81e0010000 49894010 4c8b89d8010000 4d894818"
    " c7040100000000 458b08 4585c9 440f44c8 4489 89e0010000 418d4104 8981d4010000"
    " 42c70409 45585046 498b4008 482181d8010000 48218100020000 c3".replace(" ", "")
)
_RESTORER_CODE = bytes.fromhex("b80f0000000f05")  # mov eax, 15 (rt_sigreturn); syscall
# run(in=rdi, out=rsi, pid=rdx, sig=ecx): vmovdqu ymm15,[rdi]; mov r9,rsi; mov rdi,rdx; mov esi,ecx;
# mov eax,62 (kill); syscall; vmovdqu [r9],ymm15; vzeroupper; ret
_RUN_CODE = bytes.fromhex("c57e6f3f 4989f1 4889d7 89ce b83e000000 0f05 c4417e7f39 c5f877 c3".replace(" ", ""))
PATTERN = bytes(range(0x11, 0x31))  # 32 bytes, every byte non-zero

assert (_UC_FPSTATE, _SW_SIZE, _SW_EXT, _SW_XF, XSAVE_HEADER_OFFSET) == (224, 480, 468, 472, 512)
assert struct.pack("<I", FP_XSTATE_MAGIC2) == bytes.fromhex("45585046")


@record
class Run:
    """One signal round trip: what the handler saw and what YMM15 held afterwards."""

    frame_size: int  # the kernel-built frame's xstate_size (0: the handler did not run)
    frame_xfeatures: int
    ymm: bytes

    @property
    def low_kept(self) -> bool:
        return self.ymm[:16] == PATTERN[:16]

    @property
    def high(self) -> str:
        if self.ymm[16:] == PATTERN[16:]:
            return "kept"
        return "zeroed" if not any(self.ymm[16:]) else "other"


@record
class Measurement:
    """What one sigreturn probe run saw."""

    outcome: str  # one of OUTCOMES
    detail: str
    seconds: float = 0.0


def probe_size(avx_end: int, user_size: int) -> int | None:
    """The smaller xstate_size to test: the end of AVX, or 576 when AVX ends the user area."""
    if avx_end < user_size:
        return avx_end
    if user_size > MIN_XSTATE_SIZE:
        return MIN_XSTATE_SIZE
    return None


def precondition(has_xsave: bool, xcr0: int | None, user_size: int) -> Measurement | None:
    """Why the test cannot or need not run on this host, or None when it can."""
    if not has_xsave:
        return Measurement(CANNOT_MATTER, "no XSAVE: signal frames carry no XSAVE image and no magic2")
    if user_size <= MIN_XSTATE_SIZE:
        return Measurement(
            CANNOT_MATTER,
            f"user xstate size is the minimum {MIN_XSTATE_SIZE}: every frame the kernel accepts has "
            "xstate_size == user size, so both rules look for magic2 at the same place",
        )
    if xcr0 is None or not xcr0 & 0x4:
        return Measurement(UNKNOWN, "AVX not enabled in XCR0: no YMM register to observe the restore with")
    return None


def judge(control: Run, probe: Run, size: int) -> Measurement:
    """The rule from a control run (frame keeps its size) and a probe run (xstate_size ``size``)."""
    if not control.frame_size:
        return Measurement(UNKNOWN, "the signal handler did not run")
    if not (control.low_kept and control.high == "kept"):
        return Measurement(
            UNKNOWN,
            f"control frame ({control.frame_size} bytes, magic2 rewritten in place) lost YMM15 "
            f"(low {'kept' if control.low_kept else 'lost'}, high {control.high}): the test is unreliable",
        )
    what = (
        f"kernel frame of {control.frame_size} bytes rewritten to xstate_size {size} with magic2 at "
        f"{size}: YMM15 upper half {probe.high}"
    )
    if not probe.low_kept:
        return Measurement(UNKNOWN, f"{what}, XMM15 lost too (not an FX-only restore)")
    if probe.high == "kept":
        return Measurement(FRAME_SIZE, f"{what} (full restore: magic2 looked for at xstate_size)")
    if probe.high == "zeroed":
        return Measurement(USER_SIZE, f"{what} (x87/SSE-only restore: magic2 looked for at user size)")
    return Measurement(UNKNOWN, f"{what}: neither kept nor zeroed")


class _Page:
    """The handler, restorer and runner in one executable page, with parameters and buffers."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.page))
        self.put(HANDLER, _HANDLER_HEAD + struct.pack("<Q", self.base + PARAMS) + _HANDLER_BODY)
        self.put(RESTORER, _RESTORER_CODE)
        self.put(RUN, _RUN_CODE)
        self.put(PATTERN_IN, PATTERN)
        self.handler = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p)(self.base)
        self._run = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long, ctypes.c_int)(
            self.base + RUN
        )

    def put(self, offset: int, data: bytes) -> None:
        self.page[offset : offset + len(data)] = data

    def set_params(self, size: int, mask: int) -> None:
        self.put(PARAMS, struct.pack("<IIQQQ", size, 0, mask, 0, 0))

    def recorded(self) -> tuple[int, int]:
        _, _, _, frame_size, xfeatures = struct.unpack_from("<IIQQQ", self.page, PARAMS)
        return int(frame_size), int(xfeatures)

    def install(self, sig: int) -> None:
        act = struct.pack("<QQQQ", self.base + HANDLER, SA_SIGINFO | SA_RESTORER, self.base + RESTORER, 0)
        buf = ctypes.create_string_buffer(act)
        libc = ctypes.CDLL(None, use_errno=True)
        rc = libc.syscall(
            ctypes.c_long(SYS_RT_SIGACTION), ctypes.c_long(sig), buf, ctypes.c_void_p(0), ctypes.c_long(8)
        )
        if rc != 0:
            raise OSError(ctypes.get_errno(), "rt_sigaction failed")

    def round_trip(self, size: int, sig: int) -> Run:
        self.set_params(size, AVX_MASK)
        self.put(PATTERN_OUT, b"\xee" * 32)
        self._run(self.base + PATTERN_IN, self.base + PATTERN_OUT, os.getpid(), sig)
        frame_size, xfeatures = self.recorded()
        return Run(frame_size, xfeatures, bytes(self.page[PATTERN_OUT : PATTERN_OUT + 32]))


def _child(avx_end: int, user_size: int) -> dict[str, object]:
    sig = signal.SIGUSR1
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
    page = _Page()
    page.install(sig)
    control = page.round_trip(0, sig)
    size = probe_size(avx_end, control.frame_size or user_size)
    probe = page.round_trip(size, sig) if size is not None else control
    return {
        "size": size,
        "runs": [[r.frame_size, r.frame_xfeatures, r.ymm.hex()] for r in (control, probe)],
    }


def _in_child(avx_end: int, user_size: int) -> tuple[bytes, int]:
    """Fork, run the test in the child, return (its output, its wait status). The output is marshal's:
    it is built into the interpreter (json costs the hook ~1 ms to import), and what it reads comes
    from this process's own child through its own pipe; :func:`interpret` checks its shape all the same."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child's coverage is not collected
        os.close(rfd)
        code = 0
        try:
            out = marshal.dumps(_child(avx_end, user_size))
        except BaseException as exc:  # anything goes back to the parent as text
            out, code = marshal.dumps({"error": f"{type(exc).__name__}: {exc}"}), 1
        os.write(wfd, out)
        os._exit(code)
    os.close(wfd)
    try:
        raw = _read_all(rfd, pid)
    finally:
        os.close(rfd)
    _, status = os.waitpid(pid, 0)
    return raw, status


def _read_all(fd: int, pid: int) -> bytes:
    chunks: list[bytes] = []
    deadline = time.monotonic() + TIMEOUT
    while True:
        left = deadline - time.monotonic()
        ready, _, _ = select.select([fd], [], [], max(left, 0))
        if not ready:
            os.kill(pid, signal.SIGKILL)  # our own child, hung
            return b""
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _status_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"self-test child killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"self-test child exited with status {os.waitstatus_to_exitcode(status)}"


def interpret(raw: bytes, status: int) -> Measurement:
    """The measurement from the child's output (marshal's) and wait status."""
    try:
        data = marshal.loads(raw) if raw else {}
    except (ValueError, EOFError, TypeError):
        data = {}
    if not isinstance(data, dict):
        data = {}
    if "error" in data:
        return Measurement(UNKNOWN, f"self-test failed: {data['error']}")
    if status != 0 or "runs" not in data:
        return Measurement(UNKNOWN, _status_text(status) if status else "self-test child gave no result")
    runs = [Run(int(a), int(b), bytes.fromhex(c)) for a, b, c in data["runs"]]
    if data["size"] is None:
        return Measurement(
            CANNOT_MATTER, f"kernel frame is {runs[0].frame_size} bytes: no smaller frame is valid"
        )
    return judge(runs[0], runs[1], int(data["size"]))


def measure(*, has_xsave: bool, xcr0: int | None, avx_end: int, user_size: int) -> Measurement:
    """Run the self-test on this kernel (in a child process) and say which rule it follows."""
    early = precondition(has_xsave, xcr0, user_size)
    if early is not None:
        return early
    start = time.monotonic()
    try:
        raw, status = _in_child(avx_end, user_size)
    except OSError as exc:
        return Measurement(UNKNOWN, f"cannot fork the self-test child: {exc}")
    result = interpret(raw, status)
    return Measurement(result.outcome, result.detail, time.monotonic() - start)
