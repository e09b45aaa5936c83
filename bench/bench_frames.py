"""Benchmark: frame discovery cost against threads, stack bytes and total memory.

    .venv/bin/python -m bench.bench_frames [--threads 1000] [--memory-gib 1 4 8]

For each memory size it builds a synthetic checkpoint (bench/synth.py: N threads each inside a
handler, plus an M GiB anonymous mapping held in a sparse pages file), then loads the model and finds
every thread's frames, and reports wall time and the bytes actually read from the pages file. The
claim under test: the work grows with threads and stack bytes, never with total memory.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from bench.synth import build
from criu_xstate.images import open_checkpoint
from criu_xstate.images.addrspace import AddressSpace
from criu_xstate.model import load_model


def measure(images: Path) -> dict[str, float]:
    read = {"bytes": 0, "calls": 0}
    original = AddressSpace._pread

    def counting(self: AddressSpace, offset: int, size: int) -> bytes:
        read["bytes"] += size
        read["calls"] += 1
        return original(self, offset, size)

    AddressSpace._pread = counting  # type: ignore[method-assign]
    try:
        start = time.perf_counter()
        with open_checkpoint(images) as ck:
            model = load_model(ck)
            live = sum(len(t.frames.live) for t in model.threads())
        seconds = time.perf_counter() - start
    finally:
        AddressSpace._pread = original  # type: ignore[method-assign]
    return {
        "seconds": round(seconds, 3),
        "live_frames": live,
        "bytes_read": read["bytes"],
        "preads": read["calls"],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1000)
    ap.add_argument("--memory-gib", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows = []
    for gib in args.memory_gib:
        with tempfile.TemporaryDirectory(prefix="criu-xstate-bench-") as tmp:
            info = build(Path(tmp), args.threads, gib)
            row = {
                **info,
                **measure(Path(tmp)),
                "disk_bytes": sum(os.stat(p).st_blocks * 512 for p in Path(tmp).iterdir()),
            }
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(
        f"{'threads':>7} {'memory':>10} {'stack':>9} {'read':>9} {'preads':>7} {'frames':>6} {'seconds':>8}"
    )
    for r in rows:
        print(
            f"{r['threads']:>7} {r['memory_bytes'] / 2**30:>8.1f}Gi {r['stack_bytes'] / 2**20:>7.1f}Mi "
            f"{r['bytes_read'] / 2**20:>7.1f}Mi {r['preads']:>7} {r['live_frames']:>6} {r['seconds']:>8.3f}"
        )


if __name__ == "__main__":
    main()
