"""Benchmark: does plan or apply --out cost more as the checkpoint's memory grows? (issue 13)

    .venv/bin/python -m bench.bench_memory [--threads 100] [--memory-gib 1 8 32] [--out FILE]

CRIU-shaped synthetic checkpoints (bench/synth.py: one pagemap entry per MiB, as CRIU 4.1.1 writes;
the pages file is sparse, so memory costs no disk), N threads each in a handler. For each size, in
fresh processes: `plan` against a host that needs a translation, and `apply --out` (an incremental
image: only changed pages are written). Reports medians, bytes written, and the slope in ms per GiB
(a least-squares line through the sizes), all measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.synth import build

DEST = str(Path(__file__).parents[1] / "criu_xstate" / "data" / "hosts" / "intel-icelake-sp.yaml")


def _timed(argv: list[str]) -> float:
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "criu_xstate", *argv], capture_output=True, text=True)
    took = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"bench_memory: {' '.join(argv[:2])} failed: {r.stderr.strip()}")
    return took


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else 0.0


def run(threads: int, sizes: list[float], rounds: int) -> dict[str, object]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="criu-xstate-bench-") as tmp:
        for gib in sizes:
            ck = Path(tmp) / f"ck-{gib}"
            build(ck, threads, gib, criu_shaped=True)
            plans, applies, written = [], [], 0
            for r in range(rounds):
                plans.append(_timed(["plan", str(ck), "--dest", DEST, "--json"]))
                out = Path(tmp) / f"out-{gib}-{r}"
                applies.append(_timed(["apply", str(ck), "--dest", DEST, "--out", str(out)]))
                written = sum(p.stat().st_size for p in out.glob("pages-*.img"))
            rows.append(
                {
                    "memory_gib": gib,
                    "plan_s": round(statistics.median(plans), 4),
                    "apply_out_s": round(statistics.median(applies), 4),
                    "apply_pages_written": written,
                    "written_fraction": written / (gib * (1 << 30)),
                }
            )
    xs = [float(r["memory_gib"]) for r in rows]
    return {
        "threads": threads,
        "rows": rows,
        "plan_ms_per_gib": round(1000 * _slope(xs, [float(r["plan_s"]) for r in rows]), 3),
        "apply_ms_per_gib": round(1000 * _slope(xs, [float(r["apply_out_s"]) for r in rows]), 3),
        "date": time.strftime("%Y-%m-%d"),
    }


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=100)
    ap.add_argument("--memory-gib", type=float, nargs="+", default=[1.0, 8.0, 32.0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = json.dumps(run(args.threads, args.memory_gib, args.rounds), indent=2)
    print(result)
    if args.out:
        args.out.write_text(result + "\n")


if __name__ == "__main__":
    cli()
