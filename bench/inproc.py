"""What a command's work costs once the process has started: ``plan`` and ``apply --out`` run over and
over in one process, the checkpoints interleaved, so that process start-up (~0.15 s, and by far the
noisiest part of a fresh process on a shared VM) drops out of a slope that is a few milliseconds.

    python -m bench.inproc ROUNDS DEST OUTDIR CHECKPOINT...
    python -m bench.inproc threads ROUNDS DEST CHECKPOINT...

Prints JSON: per checkpoint, the plan and apply times of every round (seconds); with ``threads``, the
plan and floor (bench/floor.py) times instead, for growth in threads without the start-up that the
fresh-process rows subtract (at 250 threads what is left above start-up is a few milliseconds, and
the exponent from it mostly noise). Each round runs every checkpoint once, in the same order; the
first round warms caches and is not kept. Nothing is remembered between runs but what the code itself
keeps (the pagemap memo is cleared).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import sys
import time
from pathlib import Path

from bench.floor import floor
from criu_xstate.cli import main
from criu_xstate.images import pagemap


def _timed(argv: list[str]) -> float:
    pagemap._MEMO.clear()  # a fresh process decodes every pagemap once; so does each run here
    sink = io.StringIO()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        rc = main(argv)
    took = time.perf_counter() - t0
    if rc not in (0, 1):
        raise SystemExit(f"bench.inproc: {' '.join(argv[:2])} exited {rc}: {sink.getvalue()[-300:]}")
    return took


def run(rounds: int, dest: str, out: Path, checkpoints: list[str]) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {ck: {"plan": [], "apply": []} for ck in checkpoints}
    for r in range(rounds + 1):
        for ck in checkpoints:
            target = out / Path(ck).name
            shutil.rmtree(target, ignore_errors=True)
            p = _timed(["plan", ck, "--dest", dest, "--json"])
            a = _timed(["apply", ck, "--dest", dest, "--out", str(target), "--json"])
            shutil.rmtree(target, ignore_errors=True)
            if r:
                times[ck]["plan"].append(p)
                times[ck]["apply"].append(a)
    return times


def threads(rounds: int, dest: str, checkpoints: list[str]) -> dict[str, dict[str, list[float]]]:
    times: dict[str, dict[str, list[float]]] = {ck: {"plan": [], "floor": []} for ck in checkpoints}
    for r in range(rounds + 1):
        for ck in checkpoints:
            p = _timed(["plan", ck, "--dest", dest, "--json"])
            pagemap._MEMO.clear()
            t0 = time.perf_counter()
            floor(Path(ck))
            f = time.perf_counter() - t0
            if r:
                times[ck]["plan"].append(p)
                times[ck]["floor"].append(f)
    return times


if __name__ == "__main__":
    if sys.argv[1] == "threads":
        rounds, dest, *cks = sys.argv[2:]
        print(json.dumps(threads(int(rounds), dest, cks)))
    else:
        rounds, dest, out, *cks = sys.argv[1:]
        print(json.dumps(run(int(rounds), dest, Path(out), cks)))
