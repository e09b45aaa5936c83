"""Checkpoint -> processes, threads, registers, XSAVE state, stacks, sigactions, live frames.

The model is what the rest of the product reasons about; it is built from the image layer and never
writes. Frames are discovered lazily per thread (reading only that thread's stack bytes).
``Thread.state()`` is what the plan (criu_xstate/plan/) reads of a thread; the model never imports it.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from functools import cached_property
from typing import Any

from criu_xstate.errors import ImageError
from criu_xstate.frames import Sigaction, SigactionIndex, ThreadFrames, ThreadStacks, find_frames
from criu_xstate.images import AddressSpace, Checkpoint
from criu_xstate.images.wire import any_nonzero
from criu_xstate.records import field, record
from criu_xstate.x86.xfeatures import PKRU

MAP_GROWSDOWN = 0x100
GPREGS_NATIVE = 1
GPREGS_COMPAT = 2
NSIG = 64

# xfeature -> the user_x86_xsave_entry field CRIU stores it in (criu.md §2.2)
XSAVE_FIELDS = {
    2: "ymmh_space",
    3: "bndreg_state",
    4: "bndcsr_state",
    5: "opmask_reg",
    6: "zmm_upper",
    7: "hi16_zmm",
    9: "pkru",
}


def sigaction_signo(index: int) -> int:
    """CRIU stores 62 sigactions, skipping SIGKILL (9) and SIGSTOP (19) (criu/sigact.c)."""
    signo = index + 1
    if signo >= 9:
        signo += 1
    if signo >= 19:
        signo += 1
    return signo


@record
class Vma:
    """One mapping of mm.img."""

    start: int
    end: int
    prot: int
    flags: int
    status: int

    def __contains__(self, addr: object) -> bool:
        return isinstance(addr, int) and self.start <= addr < self.end

    @property
    def growsdown(self) -> bool:
        return bool(self.flags & MAP_GROWSDOWN)


@record
class ThreadXsave:
    """The thread's current FPU state as CRIU saved it (layout-free component arrays)."""

    xstate_bv: int | None
    in_use: frozenset[int]
    pkru: int | None
    mxcsr: int | None
    fpregs: bool = True  # the image has FPU registers at all (without xsave: an FXSAVE-only source)


@record
class ThreadState:
    """What the plan reads of one thread: who it is, its current FPU state, and what could not be read."""

    pid: int
    tid: int
    compat: bool
    xsave: ThreadXsave
    unreadable: tuple[str, ...] = ()  # stacks whose pages the checkpoint does not hold (lazy pages)

    @property
    def xstate_bv(self) -> int | None:
        return self.xsave.xstate_bv

    @property
    def in_use(self) -> frozenset[int]:
        return self.xsave.in_use

    @property
    def pkru(self) -> int | None:
        return self.xsave.pkru


@record(frozen=False)
class Thread:
    """One thread: the registers frame discovery and the plan need, and its current XSAVE state."""

    process: Process
    tid: int
    ip: int
    sp: int
    compat: bool
    xsave: ThreadXsave
    altstack: tuple[int, int, int] | None  # ss_sp, ss_size, ss_flags
    blocked: int

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def stack_vma(self) -> Vma | None:
        return self.process.vma_at(self.sp)

    @property
    def on_altstack(self) -> bool:
        return self.altstack is not None and self.altstack[0] <= self.sp < self.altstack[0] + self.altstack[1]

    @cached_property
    def frames(self) -> ThreadFrames:
        alt = (self.altstack[0], self.altstack[1]) if self.altstack and self.altstack[1] else None
        stacks = ThreadStacks(self.tid, self.sp, self.compat, alt, self.blocked)
        process = self.process
        return find_frames(stacks, process.memory, process.sigactions, index=process.frame_index)

    def state(self) -> ThreadState:
        unreadable = tuple(f"{u.stack.value}: {u.error.reason}" for u in self.frames.unreadable)
        return ThreadState(self.pid, self.tid, self.compat, self.xsave, unreadable)


class _ProcessMemory:
    """frames.Memory over the image layer's address space plus the process's VMA list."""

    def __init__(self, space: AddressSpace, vmas: list[Vma]) -> None:
        self._space = space
        self._vmas = sorted(vmas, key=lambda v: v.start)
        self._starts = [v.start for v in self._vmas]

    def read(self, vaddr: int, size: int) -> bytes:
        return self._space.read(vaddr, size)

    def region_of(self, vaddr: int) -> tuple[int, int] | None:
        """The VMA holding ``vaddr``: a bisection (it was a scan of every VMA, 74% of plan's time at
        4000 threads)."""
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i >= 0 and vaddr in self._vmas[i]:
            return self._vmas[i].start, self._vmas[i].end
        return None


@record(frozen=False)
class Process:
    """One process: its mappings, handlers and threads, and the pages behind its memory."""

    checkpoint: Checkpoint
    pid: int
    ppid: int
    comm: str
    vmas: list[Vma]
    sigactions: list[Sigaction]
    threads: list[Thread] = field(default_factory=list)

    def vma_at(self, addr: int) -> Vma | None:
        """A bisection over the VMAs (sorted by load_model): show asks it for every thread."""
        i = bisect.bisect_right(self._vma_starts, addr) - 1
        if i >= 0 and addr in self.vmas[i]:
            return self.vmas[i]
        return None

    @cached_property
    def _vma_starts(self) -> list[int]:
        return [v.start for v in self.vmas]

    @cached_property
    def address_space(self) -> AddressSpace:
        return self.checkpoint.address_space(self.pid)

    @cached_property
    def frame_index(self) -> SigactionIndex:
        """The sigactions as frame discovery searches them, made once for all the threads."""
        return SigactionIndex(self.sigactions)

    @cached_property
    def memory(self) -> _ProcessMemory:
        return _ProcessMemory(self.address_space, self.vmas)


def _ints(values: Any) -> list[int]:
    return [int(v) for v in values]


def _thread_xsave(fpregs: Any) -> ThreadXsave:
    if fpregs is None:
        return ThreadXsave(None, frozenset(), None, None, fpregs=False)
    mxcsr = int(fpregs.mxcsr) if fpregs.HasField("mxcsr") else None
    if not fpregs.HasField("xsave"):
        return ThreadXsave(None, frozenset(), None, mxcsr)
    xs = fpregs.xsave
    bv = int(xs.xstate_bv)
    in_use = set()
    pkru = None
    for n, name in XSAVE_FIELDS.items():
        if n != PKRU and not bv >> n & 1:
            continue  # not in use whatever the array holds: not converted (most threads use 0..2)
        if n == PKRU:
            values = xs.pkru
            pkru = int(values[0]) & 0xFFFFFFFF if values else None
            if bv >> n & 1 and any(values):
                in_use.add(n)
        elif any_nonzero(xs, name):  # not converting a component's elements beyond its first non-zero
            in_use.add(n)
    return ThreadXsave(bv, frozenset(in_use), pkru, mxcsr)


def _sigactions(core: Any) -> list[Sigaction]:
    if not core.HasField("tc"):
        return []
    out = []
    for i, sa in enumerate(core.tc.sigactions):
        handler = int(sa.sigaction)
        if handler in (0, 1):  # SIG_DFL, SIG_IGN: no frame is ever built for them
            continue
        out.append(Sigaction(sigaction_signo(i), handler, int(sa.flags), int(sa.restorer)))
    return out


def _blocked(core: Any, leader: Any) -> int:
    if core.HasField("thread_core") and core.thread_core.HasField("blk_sigset"):
        return int(core.thread_core.blk_sigset)
    if leader.HasField("tc") and leader.tc.HasField("blk_sigset"):
        return int(leader.tc.blk_sigset)
    return 0


def _altstack(core: Any) -> tuple[int, int, int] | None:
    if not core.HasField("thread_core") or not core.thread_core.HasField("sas"):
        return None
    sas = core.thread_core.sas
    if int(sas.ss_size) == 0 or int(sas.ss_flags) & 2:  # SS_DISABLE
        return None
    return int(sas.ss_sp), int(sas.ss_size), int(sas.ss_flags)


@record(frozen=False)
class CheckpointModel:
    """The processes of a checkpoint, as its images describe them."""

    checkpoint: Checkpoint
    processes: list[Process]

    def threads(self) -> Iterator[Thread]:
        for p in self.processes:
            yield from p.threads


# From this many threads, cores are decoded by protobuf's upb (C) instead of images.wire: wire reads a
# real-sized core in ~46 us against upb's ~3.5 and builds a Python object per sub-message, but importing
# protobuf costs ~12-20 ms once. A plan breaks even at ~360 threads (docs/wire.md, "Many threads").
COMPILED_CORES_FROM = 400


def _upb() -> bool:
    """Whether protobuf decodes with upb here: with PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python it
    is pure Python too, and slower than wire."""
    from google.protobuf.internal import api_implementation

    return bool(api_implementation.Type() == "upb")


def load_model(ck: Checkpoint, *, compiled_cores: bool | None = None) -> CheckpointModel:
    """The processes and threads of ``ck``. ``compiled_cores``: decode the cores with upb (True) or
    with wire (False); by default upb from :data:`COMPILED_CORES_FROM` threads on."""
    pstree = ck.pstree()
    if compiled_cores is None:
        compiled_cores = sum(len(e.threads) or 1 for e in pstree) >= COMPILED_CORES_FROM and _upb()
    processes: list[Process] = []
    for entry in pstree:
        pid = int(entry.pid)
        leader = ck.core(pid, compiled=compiled_cores)
        mm = ck.mm(pid)
        vmas = sorted(
            (Vma(int(v.start), int(v.end), int(v.prot), int(v.flags), int(v.status)) for v in mm.vmas),
            key=lambda v: v.start,
        )
        comm = bytes(leader.tc.comm).decode("utf-8", "replace") if leader.HasField("tc") else ""
        proc = Process(ck, pid, int(entry.ppid), comm, vmas, _sigactions(leader))
        tids = _ints(entry.threads) or [pid]
        for tid in tids:
            core = leader if tid == pid else ck.core(tid, compiled=compiled_cores)
            ti = core.thread_info
            if not core.HasField("thread_info") or not ti.HasField("gpregs"):
                raise ImageError(
                    ck.path_of(f"core-{tid}.img"), "no x86 thread_info/gpregs (not an x86 dump?)"
                )
            regs = ti.gpregs
            mode = int(regs.mode) if regs.HasField("mode") else GPREGS_NATIVE
            if mode not in (GPREGS_NATIVE, GPREGS_COMPAT):
                raise ImageError(
                    ck.path_of(f"core-{tid}.img"), f"registers mode {mode} is neither native nor compat"
                )
            proc.threads.append(
                Thread(
                    proc,
                    tid,
                    int(regs.ip),
                    int(regs.sp),
                    mode == GPREGS_COMPAT,
                    _thread_xsave(ti.fpregs if ti.HasField("fpregs") else None),
                    _altstack(core),
                    _blocked(core, leader),
                )
            )
        processes.append(proc)
    return CheckpointModel(ck, processes)


__all__ = ["CheckpointModel", "Process", "Thread", "ThreadState", "ThreadXsave", "Vma", "load_model"]
