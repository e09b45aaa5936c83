"""The own-decoder floor: what ``plan`` cannot do with less, written as plainly as possible.

    python -m bench.floor CHECKPOINT

It decodes pstree, every core, mm and pagemap (protobuf's C decoder, upb, for the first three: the
fastest there is, faster per entry than the pure-Python images.wire that plan reads them with,
docs/wire.md; the compact pagemap decoder for the last, as plan does), and reads each thread's stack
bytes: the mapping that holds its SP, from 64 KiB below SP (stale frames are looked for there) to the
mapping's end, plus its sigaltstack when it has one: the bytes frame discovery scans. No frame is
parsed, no plan is made, nothing is printed but a count. ``plan / floor`` (bench/__main__.py) is what
plan spends above reading what it needs.
"""

from __future__ import annotations

import bisect
import os
import sys
from pathlib import Path

from criu_xstate.images import framing
from criu_xstate.images.pagemap import NO_OFFSET, PAGE, read_pagemap_runs
from criu_xstate.images.pb import core_pb2, mm_pb2, pstree_pb2
from criu_xstate.images.rewrite import read_pb_messages

STALE_WINDOW = 64 << 10  # frames.STALE_WINDOW


def floor(images: Path) -> int:
    """Bytes of stack read (from present pages; holes and parent pages count as zero-cost)."""
    total = 0
    pstree = read_pb_messages(images / "pstree.img", framing.PSTREE, pstree_pb2.pstree_entry)
    for entry in pstree.entries:
        pid = int(entry.pid)
        (mm,) = read_pb_messages(images / f"mm-{pid}.img", framing.MM, mm_pb2.mm_entry, 1).entries
        vmas = sorted((int(v.start), int(v.end)) for v in mm.vmas)
        starts = [v[0] for v in vmas]
        runs = read_pagemap_runs(images / f"pagemap-{pid}.img")
        fd = os.open(images / f"pages-{runs.pages_id}.img", os.O_RDONLY)
        try:
            for tid in [int(t) for t in entry.threads] or [pid]:
                path = images / f"core-{tid}.img"
                (core,) = read_pb_messages(path, framing.CORE, core_pb2.core_entry, 1).entries
                sp = int(core.thread_info.gpregs.sp)
                ranges = []
                i = bisect.bisect_right(starts, sp) - 1
                if i >= 0 and sp < vmas[i][1]:
                    ranges.append((max(vmas[i][0], sp - STALE_WINDOW) & ~0xF, vmas[i][1]))
                sas = core.thread_core.sas if core.HasField("thread_core") else None
                if sas is not None and int(sas.ss_size) and not int(sas.ss_flags) & 2:
                    ranges.append((int(sas.ss_sp), int(sas.ss_sp) + int(sas.ss_size)))
                for lo, hi in ranges:
                    total += _read(fd, runs, lo, hi)
        finally:
            os.close(fd)
    return total


def _read(fd: int, runs: object, lo: int, hi: int) -> int:
    from criu_xstate.images.pagemap import PagemapRuns

    assert isinstance(runs, PagemapRuns)
    got = 0
    k = max(0, bisect.bisect_right(runs.starts, lo) - 1)
    while k < len(runs.starts) and runs.starts[k] < hi:
        start, end = runs.starts[k], runs.starts[k] + runs.pages[k] * PAGE
        a, b = max(lo, start), min(hi, end)
        if a < b and runs.offsets[k] != NO_OFFSET:
            got += len(os.pread(fd, b - a, runs.offsets[k] + a - start))
        k += 1
    return got


if __name__ == "__main__":
    print(floor(Path(sys.argv[1])), flush=True)
    os._exit(0)  # as criu-xstate leaves (cli.leave): neither pays for the interpreter's finalization
