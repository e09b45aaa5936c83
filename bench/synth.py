"""Build a large synthetic CRIU checkpoint: one process, N threads each parked in a signal handler on
its own stack, plus an anonymous mapping of M GiB whose pages are all "present" (a sparse pages file,
so it costs no disk). The images are real CRIU framing and protobuf; the frames are kernel-style
(tests/framebuild.py placement). Each 64 KiB stack holds the top 64 KiB of a real dump's stack
(tests/fixtures/siginfo: mostly zeroed pages with pointers and a frame near the top, as real stacks
are) under the synthetic frame, so that scanning a stack costs what it costs on a real one. Each core
entry likewise carries a real thread's registers, FPU arrays and thread_core (tests/fixtures/threads,
dumped on a Zen 4: ~1.7 KB, its XSAVE arrays for AVX and AVX-512) with only sp, ip and xstate_bv
changed, so decoding a core costs what it costs on a real dump (a bare core of sp and ip decoded 20x
faster: docs/wire.md)."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from criu_xstate.images.framing import CORE, INVENTORY, MM, PAGEMAP, PSTREE, encode_image
from criu_xstate.images.pb import core_pb2, inventory_pb2, mm_pb2, pagemap_pb2, pstree_pb2
from tests.framebuild import RESTORER, frame_bytes

PAGE = 4096
BIG_START = 0x10000000
STACK_TOP = 0x7F0000000000
STACK_SIZE = 64 * 1024
SA_SIGINFO_RESTORER = 0x04000004


REAL_STACK = Path(__file__).parents[1] / "tests" / "fixtures" / "siginfo"
REAL_THREAD_CORE = Path(__file__).parents[1] / "tests" / "fixtures" / "threads" / "core-6681.img"


@functools.cache
def real_thread_core() -> bytes:
    """A non-leader thread's core entry from a real CRIU 4.1.1 dump."""
    from criu_xstate.images.framing import read_raw

    return read_raw(REAL_THREAD_CORE, CORE).payloads[0]


@functools.cache
def real_stack_bytes() -> bytes:
    """The top STACK_SIZE bytes of the stack of the fixture's thread (a real CRIU 4.1.1 dump)."""
    from criu_xstate.images import open_checkpoint
    from criu_xstate.model import load_model

    with open_checkpoint(REAL_STACK) as ck:
        thread = next(load_model(ck).threads())
        region = thread.process.memory.region_of(thread.sp)
        assert region is not None
        return thread.process.memory.read(region[1] - STACK_SIZE, STACK_SIZE)


CRIU_ENTRY_PAGES = 256  # CRIU 4.1.1 writes one pagemap entry per MiB of a large mapping


def build(dest: Path, threads: int, big_gib: float, *, criu_shaped: bool = False) -> dict[str, int]:
    """``criu_shaped``: the big mapping as CRIU writes it (one pagemap entry per MiB), so that costs
    which grow with pagemap entries (and so with memory) show; else one entry for the whole mapping."""
    dest.mkdir(parents=True, exist_ok=True)
    pid = 1000
    tids = [pid + i for i in range(threads)]
    inv = inventory_pb2.inventory_entry(img_version=2, fdinfo_per_id=True)
    (dest / "inventory.img").write_bytes(encode_image(None, INVENTORY.magic, [inv.SerializeToString()]))
    ps = pstree_pb2.pstree_entry(pid=pid, ppid=0, pgid=pid, sid=pid, threads=tids)
    (dest / "pstree.img").write_bytes(encode_image(PSTREE.head, PSTREE.magic, [ps.SerializeToString()]))

    big_pages = int(big_gib * (1 << 30)) // PAGE
    mm = mm_pb2.mm_entry()
    mm.vmas.add(start=BIG_START, end=BIG_START + big_pages * PAGE, prot=3, flags=0x22, status=0x201, fd=-1)
    stacks = []
    for i in range(threads):
        hi = STACK_TOP - i * (STACK_SIZE + PAGE)
        lo = hi - STACK_SIZE
        stacks.append((lo, hi))
    for lo, hi in sorted(stacks):
        mm.vmas.add(start=lo, end=hi, prot=3, flags=0x22, status=0x201, fd=-1)
    (dest / f"mm-{pid}.img").write_bytes(encode_image(MM.head, MM.magic, [mm.SerializeToString()]))

    head = pagemap_pb2.pagemap_head(pages_id=1)
    step = CRIU_ENTRY_PAGES if criu_shaped else big_pages
    entries = [
        pagemap_pb2.pagemap_entry(vaddr=BIG_START + i * PAGE, nr_pages=min(step, big_pages - i), flags=4)
        for i in range(0, big_pages, max(step, 1))
    ]
    for lo, _hi in sorted(stacks):
        entries.append(pagemap_pb2.pagemap_entry(vaddr=lo, nr_pages=STACK_SIZE // PAGE, flags=4))
    payloads = [head.SerializeToString(), *(e.SerializeToString() for e in entries)]
    (dest / f"pagemap-{pid}.img").write_bytes(encode_image(PAGEMAP.head, PAGEMAP.magic, payloads))

    pages = dest / "pages-1.img"
    total = (big_pages + threads * STACK_SIZE // PAGE) * PAGE
    fd = os.open(pages, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.ftruncate(fd, total)
        offset_of = {lo: big_pages * PAGE + k * STACK_SIZE for k, (lo, _) in enumerate(sorted(stacks))}
        for i, tid in enumerate(tids):
            lo, hi = stacks[i]
            isp = hi - 2048
            frame, _, data = frame_bytes(isp, restorer=RESTORER)
            os.pwrite(fd, real_stack_bytes(), offset_of[lo])
            os.pwrite(fd, data, offset_of[lo] + frame - lo)
            core = core_pb2.core_entry.FromString(real_thread_core())
            ti = core.thread_info
            ti.gpregs.sp = frame - 256
            ti.gpregs.ip = 0x401000
            ti.gpregs.mode = 1
            ti.fpregs.mxcsr = 0x1F80
            ti.fpregs.xsave.xstate_bv = 0x7
            if tid == pid:
                core.tc.comm = b"bench"
                for s in range(62):
                    sa = core.tc.sigactions.add(sigaction=0, flags=0, restorer=0, mask=0)
                    if s == 9:  # index 9 is SIGUSR1 (10)
                        sa.sigaction, sa.flags, sa.restorer = 0x401100, SA_SIGINFO_RESTORER, RESTORER
            else:
                core.thread_core.futex_rla = 0
                core.thread_core.futex_rla_len = 0
            core.thread_core.blk_sigset = 0
            (dest / f"core-{tid}.img").write_bytes(
                encode_image(CORE.head, CORE.magic, [core.SerializeToString()])
            )
    finally:
        os.close(fd)
    return {"threads": threads, "memory_bytes": total, "stack_bytes": threads * STACK_SIZE}
