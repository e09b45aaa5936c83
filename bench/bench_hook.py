"""Benchmark: what the installed CRIU hook costs a real runc checkpoint and restore.

    .venv/bin/python -m bench.bench_hook [--rounds 5] [--out FILE]   (root, runc, CRIU; python -m bench)

Interleaved rounds of the same runc container (the ymm_handler workload parked in its handler),
checkpointed and restored once with no action script and once with the script `hook-install` writes
(probing this host at pre-restore; the checkpoint is compatible, so the hook plans and writes
nothing). Reports medians and the ratios within the run: the checkpoint (the hook returns in the shell
for every dump action) and the restore (one Python start, a probe, and a plan).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from criu_xstate.cli import main
from tests.runtimes import RuncContainer, skip_reason


def _round(root: Path, criu_conf: Path | None) -> tuple[float, float]:
    if root.exists():
        shutil.rmtree(root)
    c = RuncContainer(root, f"criu-xstate-bench-{time.monotonic_ns() % 10**9}", criu_config=criu_conf)
    c.create_bundle()
    try:
        c.run()
        images, work = root / "images", root / "work"
        t0 = time.perf_counter()
        c.checkpoint(images, work)
        t1 = time.perf_counter()
        r = c.restore(images, work)
        t2 = time.perf_counter()
        if r.returncode != 0:
            raise RuntimeError(f"restore failed: {c.log[-1]}")
        c.result()
        return t1 - t0, t2 - t1
    finally:
        c.delete()


def run(rounds: int) -> dict[str, object]:
    reason = skip_reason()
    if reason:
        raise SystemExit(f"bench_hook: {reason}")
    tmp = Path(tempfile.mkdtemp(prefix="criu-xstate-bench-"))
    try:
        hook = tmp / "hook"
        conf = hook / "criu.conf"
        argv = ["hook-install", "--script", str(hook / "hook"), "--config", str(hook / "config.yaml")]
        if main([*argv, "--criu-config", str(conf), "--dest", "probe"]) != 0:
            raise SystemExit("bench_hook: hook-install failed")
        times: dict[str, list[tuple[float, float]]] = {"runc alone": [], "runc + hook": []}
        for _ in range(rounds):
            times["runc alone"].append(_round(tmp / "a", None))
            times["runc + hook"].append(_round(tmp / "b", conf))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    med = {
        k: (statistics.median(c for c, _ in v), statistics.median(r for _, r in v)) for k, v in times.items()
    }
    alone, hooked = med["runc alone"], med["runc + hook"]
    return {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": rounds,
        "checkpoint_s": {"runc alone": round(alone[0], 4), "runc + hook": round(hooked[0], 4)},
        "restore_s": {"runc alone": round(alone[1], 4), "runc + hook": round(hooked[1], 4)},
        "checkpoint_ratio": round(hooked[0] / alone[0], 3),
        "restore_ratio": round(hooked[1] / alone[1], 3),
        "hook_pre_restore_s": round(hooked[1] - alone[1], 4),
    }


def cli() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    result = run(args.rounds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    cli()
