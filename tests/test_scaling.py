"""Frame discovery reads stack bytes only: the bytes read do not depend on the checkpoint's memory size
(a sparse multi-GiB mapping). Counted, not timed; the timing lives in bench/bench_frames.py."""

from __future__ import annotations

from pathlib import Path

from bench.bench_frames import measure
from bench.synth import STACK_SIZE, build


def test_bytes_read_do_not_grow_with_memory(tmp_path: Path) -> None:
    small = build(tmp_path / "small", 20, 0.01)
    big = build(tmp_path / "big", 20, 4.0)
    a, b = measure(tmp_path / "small"), measure(tmp_path / "big")
    assert a["live_frames"] == b["live_frames"] == 20
    assert a["bytes_read"] == b["bytes_read"] <= 20 * STACK_SIZE + 20 * 4096
    assert big["memory_bytes"] > 100 * small["memory_bytes"]
