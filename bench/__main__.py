"""The benchmark suite of issue 13: what plan, apply and the hook cost, as ratios measured in one run.

    .venv/bin/python -m bench [--rounds 3] [--real-gib 1 8] [--no-real] [--no-hook] [--out bench/results.json]

Every time is a fresh process (what a user or CRIU pays), measured in interleaved rounds (each round
runs every command once, so load from elsewhere on the machine falls on all of them alike), and
reported as the median. What is compared:

- ``plan / floor``: ``criu-xstate plan`` against bench/floor.py, which decodes pstree, cores, mm and
  pagemap and reads the stack bytes frame discovery scans, and does nothing else;
- ``plan / pycriu``: against CRIU's own Python decoder (pycriu 4.1.1 from the CRIU prefix, as
  tests/pycriu_oracle.py runs it) decoding the same images;
- growth in threads (250, 1000, 4000 threads, 1 GiB) and in memory (1, 8, 32 GiB, 100 threads): the
  exponent of the time above start-up (a 1-thread checkpoint's time), and ms per GiB;
- ``apply --out``: bytes written / checkpoint bytes;
- real CRIU 4.1.1 dumps (root and scripts/get-criu): a process with 1 GiB (and 8 GiB when the disk
  has 20 GiB free) of touched anonymous memory parked in a signal handler (bench/workloads/ballast.c);
  each is also restored by `criu restore`, with and without the installed hook as its action script
  (hook time: CRIU's own log, pre-restore to the next step); the dumps are deleted afterwards;
- the hook: a runc checkpoint and restore with and without it (bench/bench_hook.py).

Synthetic checkpoints are CRIU-shaped (bench/synth.py: one pagemap entry per MiB, a real dump's stack
bytes). Results go to bench/results.json with the machine, CPU, date and versions, and a table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.synth import build

REPO = Path(__file__).resolve().parents[1]
DEST = str(REPO / "criu_xstate" / "data" / "hosts" / "intel-icelake-sp.yaml")
PY = sys.executable
THREADS = [250, 1000, 4000]
MEMORY_GIB = [1.0, 8.0, 32.0]


def as_installed(*trees: Path) -> None:
    """Time the code as an installation runs it: with its bytecode cached. pip byte-compiles what it
    installs, but a shell with PYTHONDONTWRITEBYTECODE=1 (this machine kind's default) running an
    editable tree recompiles every module in every process: 56 modules, ~80 ms of each plan and hook
    here, more than the floor's imports cost, which skewed every ratio against the tool."""
    import compileall

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)  # also for the hook, run by runc and CRIU
    for tree in trees:
        for pkg in ("criu_xstate", "bench"):
            if (tree / pkg).is_dir():
                compileall.compile_dir(str(tree / pkg), quiet=1)


def _run(argv: list[str], ok: tuple[int, ...] = (0,), tree: Path = REPO) -> float:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    t0 = time.perf_counter()
    r = subprocess.run(argv, capture_output=True, cwd=tree, env=env)
    took = time.perf_counter() - t0
    if r.returncode not in ok:
        raise SystemExit(f"bench: {' '.join(argv[:4])} failed ({r.returncode}): {r.stderr.decode()[-500:]}")
    return took


def plan(ck: Path, tree: Path = REPO) -> float:
    return _run([PY, "-m", "criu_xstate", "plan", str(ck), "--dest", DEST, "--json"], ok=(0, 1), tree=tree)


def floor(ck: Path) -> float:
    return _run([PY, "-m", "bench.floor", str(ck)])


def _oracle() -> Any:
    import importlib

    return importlib.import_module("tests.pycriu_oracle")  # tests/, not type-checked with bench/


def pycriu(ck: Path) -> float:
    oracle = _oracle()
    DIST, SCRIPT = oracle.DIST, oracle.SCRIPT
    env = {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python", "PATH": "/usr/bin:/bin"}
    t0 = time.perf_counter()
    r = subprocess.run([PY, "-I", "-S", "-c", SCRIPT, str(DIST), str(ck)], capture_output=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"bench: pycriu failed on {ck}: {r.stderr.decode()[-500:]}")
    return time.perf_counter() - t0


def apply_out(ck: Path, out: Path, tree: Path = REPO) -> float:
    shutil.rmtree(out, ignore_errors=True)
    argv = [PY, "-m", "criu_xstate", "apply", str(ck), "--dest", DEST, "--out", str(out), "--json"]
    return _run(argv, tree=tree)


def pycriu_available() -> bool:
    return bool(_oracle().pycriu_available())


def _rounds(jobs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Each job once per round, in the same order every round; the median of each."""
    times: dict[str, list[float]] = {k: [] for k in jobs}
    for _ in range(rounds):
        for name, job in jobs.items():
            times[name].append(job())
    return {k: round(statistics.median(v), 4) for k, v in times.items()}


def _exponent(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(max(y, 1e-4)) for y in ys]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum((a - mx) ** 2 for a in lx)


def _slope(xs: list[float], ys: list[float]) -> float:
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    return sum((a - mx) * (b - my) for a, b in zip(xs, ys, strict=True)) / sum((a - mx) ** 2 for a in xs)


def _bytes(d: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in d.glob(pattern) if p.is_file() and not p.is_symlink())


def in_one_process(cks: dict[float, Path], rounds: int, out: Path) -> dict[str, object]:
    """plan and apply --out with process start-up taken out (bench/inproc.py): medians per memory size,
    and the slope in ms/GiB as the median of each round's own slope (a round's checkpoints run back to
    back, so a load spike that hits one round does not tilt the others)."""
    out.mkdir(parents=True, exist_ok=True)
    argv = [PY, "-m", "bench.inproc", str(rounds), DEST, str(out), *map(str, cks.values())]
    r = subprocess.run(argv, capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        raise SystemExit(f"bench: bench.inproc failed: {r.stderr.decode()[-500:]}")
    times = json.loads(r.stdout)
    xs = list(cks)
    result: dict[str, object] = {"rounds": rounds}
    for what in ("plan", "apply"):
        per = [times[str(ck)][what] for ck in cks.values()]
        result[f"{what}_ms"] = [round(1000 * statistics.median(t), 2) for t in per]
        slopes = [_slope(xs, [t[i] for t in per]) for i in range(rounds)]
        result[f"{what}_ms_per_gib"] = round(1000 * statistics.median(slopes), 3)
        result[f"{what}_ms_per_gib_range"] = [round(1000 * min(slopes), 3), round(1000 * max(slopes), 3)]
    return result


def threads_in_one_process(cks: dict[int, Path], rounds: int) -> dict[str, object]:
    """plan and the floor with process start-up taken out (bench/inproc.py threads): medians per thread
    count and their ratio, and each growth exponent as the median of the rounds' own exponents, on what
    a run costs above the one-thread checkpoint's run (the fixed work: the profile, glibc's state)."""
    argv = [PY, "-m", "bench.inproc", "threads", str(rounds), DEST, *map(str, cks.values())]
    r = subprocess.run(argv, capture_output=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    if r.returncode != 0:
        raise SystemExit(f"bench: bench.inproc threads failed: {r.stderr.decode()[-500:]}")
    times = json.loads(r.stdout)
    counts = [n for n in cks if n != 1]
    result: dict[str, object] = {"rounds": rounds, "threads": counts}
    medians: dict[str, list[float]] = {}
    for what in ("plan", "floor"):
        one = times[str(cks[1])][what]
        per = [times[str(cks[n])][what] for n in counts]
        medians[what] = [statistics.median(t) for t in per]
        result[f"{what}_s"] = [round(m, 4) for m in medians[what]]
        exps = [_exponent([float(n) for n in counts], [t[i] - one[i] for t in per]) for i in range(rounds)]
        result[f"{what}_thread_exponent"] = round(statistics.median(exps), 3)
    pairs = zip(medians["plan"], medians["floor"], strict=True)
    result["plan_over_floor"] = [round(p / f, 2) for p, f in pairs]
    return result


# --- synthetic ------------------------------------------------------------------------------------


def threads_sweep(tmp: Path, rounds: int, with_pycriu: bool, base: Path | None) -> dict[str, object]:
    cks = {n: tmp / f"threads-{n}" for n in [1, *THREADS]}
    for n, ck in cks.items():
        build(ck, n, 1.0, criu_shaped=True)
    jobs: dict[str, Callable[[], float]] = {}
    for n, ck in cks.items():
        jobs[f"plan {n}"] = lambda ck=ck: plan(ck)  # type: ignore[misc]
        jobs[f"floor {n}"] = lambda ck=ck: floor(ck)  # type: ignore[misc]
        if with_pycriu and n in (1, 1000, 4000):
            jobs[f"pycriu {n}"] = lambda ck=ck: pycriu(ck)  # type: ignore[misc]
        if base is not None:
            jobs[f"before {n}"] = lambda ck=ck: plan(ck, base)  # type: ignore[misc]
    med = _rounds(jobs, rounds)
    inproc = threads_in_one_process(cks, max(rounds, 5))
    for ck in cks.values():
        shutil.rmtree(ck)
    rows = []
    for n in THREADS:
        row: dict[str, object] = {"threads": n, "plan_s": med[f"plan {n}"], "floor_s": med[f"floor {n}"]}
        row["plan_over_floor"] = round(med[f"plan {n}"] / med[f"floor {n}"], 2)
        if f"pycriu {n}" in med:
            row["pycriu_s"] = med[f"pycriu {n}"]
            row["plan_over_pycriu"] = round(med[f"plan {n}"] / med[f"pycriu {n}"], 3)
        if f"before {n}" in med:
            row["plan_before_s"] = med[f"before {n}"]
            row["before_over_floor"] = round(med[f"before {n}"] / med[f"floor {n}"], 2)
        rows.append(row)
    kinds = ("plan", "floor", "before") if base is not None else ("plan", "floor")
    above = {k: [max(med[f"{k} {n}"] - med[f"{k} 1"], 1e-4) for n in THREADS] for k in kinds}
    extra = {}
    if base is not None:
        extra["before_thread_exponent"] = round(_exponent([float(n) for n in THREADS], above["before"]), 3)
    return {
        **extra,
        "memory_gib": 1.0,
        "startup_s": {"plan": med["plan 1"], "floor": med["floor 1"]},
        "rows": rows,
        "plan_thread_exponent": round(_exponent([float(n) for n in THREADS], above["plan"]), 3),
        "floor_thread_exponent": round(_exponent([float(n) for n in THREADS], above["floor"]), 3),
        "in_one_process": inproc,
    }


def memory_sweep(tmp: Path, rounds: int, base: Path | None) -> dict[str, object]:
    threads = 100
    cks = {g: tmp / f"memory-{g}" for g in MEMORY_GIB}
    for g, ck in cks.items():
        build(ck, threads, g, criu_shaped=True)
    jobs: dict[str, Callable[[], float]] = {}
    for g, ck in cks.items():
        jobs[f"plan {g}"] = lambda ck=ck: plan(ck)  # type: ignore[misc]
        jobs[f"apply {g}"] = lambda ck=ck, g=g: apply_out(ck, tmp / f"out-{g}")  # type: ignore[misc]
        if base is not None:
            jobs[f"plan-before {g}"] = lambda ck=ck: plan(ck, base)  # type: ignore[misc]
            jobs[f"apply-before {g}"] = lambda ck=ck, g=g: apply_out(ck, tmp / f"out-before-{g}", base)  # type: ignore[misc]
    med = _rounds(jobs, rounds)
    inproc = in_one_process(cks, max(rounds, 7), tmp / "inproc")
    rows = []
    for g, ck in cks.items():
        out = tmp / f"out-{g}"
        written = _bytes(out, "pages-*.img")
        total = _bytes(ck)  # apparent size: the sparse pages file counts as the memory it holds
        rows.append(
            {
                "memory_gib": g,
                "pagemap_entries": int(g * 1024) + threads,
                "plan_s": med[f"plan {g}"],
                "apply_out_s": med[f"apply {g}"],
                "apply_bytes_written": written,
                "written_over_checkpoint": written / total,
            }
        )
        if base is not None:
            before = tmp / f"out-before-{g}"
            rows[-1].update(
                plan_before_s=med[f"plan-before {g}"],
                apply_before_s=med[f"apply-before {g}"],
                apply_before_bytes_written=_bytes(before, "pages-*.img"),
            )
            shutil.rmtree(before)
        shutil.rmtree(out)
        shutil.rmtree(ck)
    xs = list(MEMORY_GIB)
    extra = {}
    if base is not None:
        extra = {
            "plan_before_ms_per_gib": round(1000 * _slope(xs, [float(r["plan_before_s"]) for r in rows]), 3),
            "apply_before_ms_per_gib": round(
                1000 * _slope(xs, [float(r["apply_before_s"]) for r in rows]), 3
            ),
        }
    return {
        **extra,
        "threads": threads,
        "rows": rows,
        "in_one_process": inproc,
        "plan_ms_per_gib": round(1000 * _slope(xs, [float(r["plan_s"]) for r in rows]), 3),
        "apply_ms_per_gib": round(1000 * _slope(xs, [float(r["apply_out_s"]) for r in rows]), 3),
        "plan_memory_exponent": round(_exponent(xs, [float(r["plan_s"]) for r in rows]), 3),
        "apply_memory_exponent": round(_exponent(xs, [float(r["apply_out_s"]) for r in rows]), 3),
    }


def import_ms(tree: Path, argv: list[str]) -> float:
    """Sum of the self import times (``python -X importtime``) of one command, in ms."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    r = subprocess.run(
        [PY, "-X", "importtime", "-m", "criu_xstate", *argv], capture_output=True, cwd=tree, env=env
    )
    total = 0
    for line in r.stderr.decode().splitlines():
        if line.startswith("import time:") and "|" in line:
            field = line.split(":", 1)[1].split("|", 1)[0].strip()
            total += int(field) if field.isdigit() else 0
    return total / 1000


def start_up(rounds: int, base: Path | None) -> dict[str, float]:
    fixture = str(REPO / "tests" / "fixtures" / "siginfo")
    argv = ["plan", fixture, "--dest", DEST, "--json"]
    jobs: dict[str, Callable[[], float]] = {"plan imports ms": lambda: import_ms(REPO, argv)}
    jobs["plan of a 1-thread dump s"] = lambda: plan(Path(fixture))
    if base is not None:
        jobs["before: plan imports ms"] = lambda: import_ms(base, argv)
        jobs["before: plan of a 1-thread dump s"] = lambda: plan(Path(fixture), base)
    return _rounds(jobs, max(rounds, 5))


# --- real CRIU ------------------------------------------------------------------------------------


def real_skip_reason() -> str | None:
    from tests.realcriu import skip_reason

    return skip_reason()


def _dump_ballast(gib: float, images: Path, work: Path) -> int:
    from tests.realcriu import CACHE, _wait_for, criu

    exe = CACHE / "workloads" / "ballast"
    src = REPO / "bench" / "workloads" / "ballast.c"
    if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
        exe.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", str(exe), str(src)], check=True)
    work.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(exe), str(work), str(int(gib * 1024))],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        cwd="/",
    )
    try:
        _wait_for(work / "ready", 300, "the ballast workload", proc)
        images.mkdir(parents=True)
        criu("dump", "-t", str(proc.pid), "-D", str(images), log_dir=images, log="dump.log")
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.pid


def install_hook(where: Path) -> Path:
    """The action script `hook-install` writes (probing this host at pre-restore, enforce), as a user
    installs it; the checkpoints restored with it are this host's own, so it plans and writes nothing."""
    from criu_xstate.cli import main as cli

    script = where / "hook"
    argv = ["hook-install", "--script", str(script), "--config", str(where / "config.yaml")]
    if cli([*argv, "--criu-config", str(where / "criu.conf"), "--dest", "probe"]) != 0:
        raise SystemExit("bench: hook-install failed")
    return script


def restore(images: Path, pid: int, hook: Path | None) -> float:
    """`criu restore` of a ballast dump (its pages read back into memory), with or without the hook as
    CRIU's action script; the restored process is killed afterwards and not timed."""
    from tests.realcriu import criu

    extra = ["--action-script", str(hook)] if hook else []
    t0 = time.perf_counter()
    criu("restore", "-D", str(images), "-d", *extra, log_dir=images, log="restore.log")
    took = time.perf_counter() - t0
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    return took


def pre_restore_s(images: Path) -> float:
    """How long CRIU waited for its pre-restore scripts in the last restore, from its own log: the
    time from "Running pre-restore scripts" to the next step (past the lines naming the scripts), which
    is the hook's whole cost (every other action returns in the shell). A restore of a large dump
    varies by more than the hook costs on a shared machine; this does not."""
    stamp = re.compile(r"^\((\d+\.\d+)\) (.)")
    start = None
    for line in (images / "restore.log").read_text(errors="replace").splitlines():
        m = stamp.match(line)
        if m and start is None and "Running pre-restore scripts" in line:
            start = float(m.group(1))
        elif m and start is not None and m.group(2) != "\t":
            return float(m.group(1)) - start
    raise SystemExit(f"bench: no pre-restore step in {images / 'restore.log'}")


def restore_with_hook(images: Path, pid: int, hook: Path, waits: list[float]) -> float:
    took = restore(images, pid, hook)
    waits.append(pre_restore_s(images))
    return took


def _restorable(gib: float) -> bool:
    """A restore needs the dump's memory again: only sizes that fit twice in what is available."""
    avail = next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemAvailable"))
    return gib * 2 * (1 << 20) < int(avail.split()[1])


def real_dumps(tmp: Path, sizes: list[float], rounds: int, with_pycriu: bool) -> dict[str, object]:
    cks = {g: tmp / f"real-{g}" for g in sizes}
    rows = []
    try:
        pids = {g: _dump_ballast(g, ck, tmp / f"real-work-{g}") for g, ck in cks.items()}
        hook = install_hook(tmp / "hook")
        waits: dict[float, list[float]] = {g: [] for g in sizes}
        jobs: dict[str, Callable[[], float]] = {}
        for g, ck in cks.items():
            jobs[f"plan {g}"] = lambda ck=ck: plan(ck)  # type: ignore[misc]
            jobs[f"floor {g}"] = lambda ck=ck: floor(ck)  # type: ignore[misc]
            jobs[f"apply {g}"] = lambda ck=ck, g=g: apply_out(ck, tmp / f"real-out-{g}")  # type: ignore[misc]
            if with_pycriu:
                jobs[f"pycriu {g}"] = lambda ck=ck: pycriu(ck)  # type: ignore[misc]
            if _restorable(g):
                jobs[f"restore {g}"] = lambda ck=ck, g=g: restore(ck, pids[g], None)  # type: ignore[misc]
                jobs[f"restore+hook {g}"] = lambda ck=ck, g=g: restore_with_hook(ck, pids[g], hook, waits[g])  # type: ignore[misc]
        med = _rounds(jobs, rounds)
        inproc = in_one_process(cks, max(rounds, 7), tmp / "real-inproc") if len(cks) > 1 else None
        for g, ck in cks.items():
            from criu_xstate.images.pagemap import read_pagemap_runs

            pm = next(ck.glob("pagemap-*.img"))
            out = tmp / f"real-out-{g}"
            written = _bytes(out, "pages-*.img") if out.exists() else 0
            row: dict[str, object] = {
                "memory_gib": g,
                "checkpoint_bytes": _bytes(ck),
                "pagemap_entries": read_pagemap_runs(pm).entries,
                "plan_s": med[f"plan {g}"],
                "floor_s": med[f"floor {g}"],
                "plan_over_floor": round(med[f"plan {g}"] / med[f"floor {g}"], 2),
                "apply_out_s": med[f"apply {g}"],
                "apply_bytes_written": written,
                "written_over_checkpoint": written / _bytes(ck),
            }
            if with_pycriu:
                row["pycriu_s"] = med[f"pycriu {g}"]
                row["plan_over_pycriu"] = round(med[f"plan {g}"] / med[f"pycriu {g}"], 3)
            if f"restore {g}" in med:
                row["restore_s"] = med[f"restore {g}"]
                row["restore_hook_s"] = med[f"restore+hook {g}"]
                row["hook_over_restore"] = round(med[f"restore+hook {g}"] / med[f"restore {g}"], 3)
                row["hook_pre_restore_s"] = round(statistics.median(waits[g]), 4)
                row["hook_share_of_restore"] = round(statistics.median(waits[g]) / med[f"restore {g}"], 3)
            rows.append(row)
    finally:
        shutil.rmtree(tmp / "hook", ignore_errors=True)
        for g in sizes:
            for d in (f"real-{g}", f"real-out-{g}", f"real-work-{g}"):
                shutil.rmtree(tmp / d, ignore_errors=True)
    result: dict[str, object] = {"threads": 1, "rows": rows}
    if len(sizes) > 1:
        xs = [float(r["memory_gib"]) for r in rows]  # type: ignore[arg-type]
        result["plan_ms_per_gib"] = round(1000 * _slope(xs, [float(r["plan_s"]) for r in rows]), 3)  # type: ignore[arg-type]
        result["apply_ms_per_gib"] = round(1000 * _slope(xs, [float(r["apply_out_s"]) for r in rows]), 3)  # type: ignore[arg-type]
        result["in_one_process"] = inproc
    return result


# --- the machine ------------------------------------------------------------------------------------


def machine() -> dict[str, object]:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import google.protobuf
    import yaml

    from tests.realcriu import criu_path

    criu = "absent"
    if criu_path().exists():
        r = subprocess.run([str(criu_path()), "--version"], capture_output=True, text=True)
        criu = r.stdout.split()[1] if r.returncode == 0 and len(r.stdout.split()) > 1 else "unknown"
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "protobuf": google.protobuf.__version__,
        "pyyaml": f"{yaml.__version__}{' (libyaml)' if yaml.__with_libyaml__ else ''}",
        "criu": criu,
        "criu_xstate": rev.stdout.strip() or "unknown",
    }


def table(results: dict[str, Any]) -> str:
    m, th, mem = results["machine"], results["threads"], results["memory"]
    out = [f"{m['cpu']}, {m['cpus']} CPUs, Linux {m['kernel']}, {m['date']}"]
    before = f" (before: {results['before']})" if "before" in results else ""
    out.append(
        f"{'synthetic, 1 GiB':<34}{'plan s':>8}{'floor s':>9}{'plan/floor':>12}{'plan/pycriu':>13}"
        f"{'before/floor':>14}{before}"
    )
    for r in th["rows"]:
        name = f"  {r['threads']} threads"
        pyc, bef = r.get("plan_over_pycriu", "-"), r.get("before_over_floor", "-")
        out.append(
            f"{name:<34}{r['plan_s']:>8.3f}{r['floor_s']:>9.3f}{r['plan_over_floor']:>12.2f}{pyc:>13}{bef:>14}"
        )
    out.append(
        f"  thread growth exponent above start-up: plan {th['plan_thread_exponent']}, "
        f"floor {th['floor_thread_exponent']}, before {th.get('before_thread_exponent', '-')}"
    )
    if (one := th.get("in_one_process")) is not None:
        out.append(
            f"  in one process ({one['rounds']} rounds): plan {one['plan_s']} s, floor {one['floor_s']} s, "
            f"plan/floor {one['plan_over_floor']}; exponent plan {one['plan_thread_exponent']}, "
            f"floor {one['floor_thread_exponent']}"
        )
    out.append(
        f"{'synthetic, 100 threads':<34}{'plan s':>8}{'apply s':>9}{'written/ckpt':>14}{'plan before':>13}"
        f"{'apply before':>14}"
    )
    for r in mem["rows"]:
        name = f"  {r['memory_gib']:.0f} GiB ({r['pagemap_entries']} entries)"
        pb, ab = r.get("plan_before_s", "-"), r.get("apply_before_s", "-")
        out.append(
            f"{name:<34}{r['plan_s']:>8.3f}{r['apply_out_s']:>9.3f}{r['written_over_checkpoint']:>14.2e}"
            f"{pb:>13}{ab:>14}"
        )
    out.append(f"  plan {mem['plan_ms_per_gib']} ms/GiB, apply --out {mem['apply_ms_per_gib']} ms/GiB")
    one = mem.get("in_one_process")
    if one:
        out.append(
            f"  in one process (start-up excluded, {one['rounds']} rounds): plan {one['plan_ms']} ms, "
            f"{one['plan_ms_per_gib']} ms/GiB; apply --out {one['apply_ms']} ms, "
            f"{one['apply_ms_per_gib']} ms/GiB"
        )
    if "plan_before_ms_per_gib" in mem:
        out.append(
            f"  before: plan {mem['plan_before_ms_per_gib']} ms/GiB, "
            f"apply --out {mem['apply_before_ms_per_gib']} ms/GiB"
        )
    out.append("start-up: " + ", ".join(f"{k} {v}" for k, v in results["start_up"].items()))
    real = results.get("real")
    if isinstance(real, dict) and real.get("rows"):
        out.append(
            f"{'real CRIU 4.1.1 dump':<34}{'plan s':>8}{'floor s':>9}{'plan/floor':>12}{'plan/pycriu':>13}"
            f"{'apply s':>9}{'written/ckpt':>14}"
        )
        for r in real["rows"]:
            name = f"  {r['memory_gib']:.0f} GiB ({r['pagemap_entries']} entries)"
            pyc = r.get("plan_over_pycriu", "-")
            out.append(
                f"{name:<34}{r['plan_s']:>8.3f}{r['floor_s']:>9.3f}{r['plan_over_floor']:>12.2f}{pyc:>13}"
                f"{r['apply_out_s']:>9.3f}{r['written_over_checkpoint']:>14.2e}"
            )
        for r in real["rows"]:
            if "restore_s" in r:
                out.append(
                    f"  {r['memory_gib']:.0f} GiB: criu restore {r['restore_s']} s, the hook in it "
                    f"{r['hook_pre_restore_s']} s ({100 * r['hook_share_of_restore']:.1f}%)"
                )
        if "plan_ms_per_gib" in real:
            out.append(
                f"  plan {real['plan_ms_per_gib']} ms/GiB, apply --out {real['apply_ms_per_gib']} ms/GiB"
            )
        one = real.get("in_one_process")
        if one:
            out.append(
                f"  in one process (start-up excluded, {one['rounds']} rounds): plan {one['plan_ms']} ms, "
                f"{one['plan_ms_per_gib']} ms/GiB; apply --out {one['apply_ms']} ms, "
                f"{one['apply_ms_per_gib']} ms/GiB"
            )
    else:
        out.append(f"real CRIU dumps: skipped ({real})")
    hook = results.get("hook")
    if isinstance(hook, dict):
        r = hook["restore_s"]
        out.append(
            f"hook: runc restore {r['runc alone']} s alone, {r['runc + hook']} s with it "
            f"(x{hook['restore_ratio']}); runc checkpoint x{hook['checkpoint_ratio']}"
        )
    else:
        out.append(f"hook: skipped ({hook})")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--real-gib", type=float, nargs="+", default=None, help="sizes of the real dumps (GiB)")
    ap.add_argument("--no-real", action="store_true", help="no real CRIU dumps")
    ap.add_argument("--no-hook", action="store_true", help="no runc checkpoint/restore with the hook")
    ap.add_argument("--no-pycriu", action="store_true")
    ap.add_argument(
        "--before",
        type=Path,
        default=None,
        help="a source tree of an earlier criu-xstate: its plan and apply run too",
    )
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results.json")
    args = ap.parse_args()
    as_installed(REPO, *([args.before] if args.before is not None else []))
    with_pycriu = not args.no_pycriu and pycriu_available()
    results: dict[str, object] = {"machine": machine(), "rounds": args.rounds}
    tmp = Path(tempfile.mkdtemp(prefix="criu-xstate-bench-", dir="/var/tmp"))
    try:
        print("threads ...", file=sys.stderr)
        if args.before is not None:
            label = (
                args.before / "BENCH_REV"
            )  # e.g. `git archive REV | tar -x -C DIR; echo REV > DIR/BENCH_REV`
            results["before"] = label.read_text().strip() if label.exists() else str(args.before)
        results["threads"] = threads_sweep(tmp, args.rounds, with_pycriu, args.before)
        print("start-up ...", file=sys.stderr)
        results["start_up"] = start_up(args.rounds, args.before)
        print("memory ...", file=sys.stderr)
        results["memory"] = memory_sweep(tmp, args.rounds, args.before)
        reason = "--no-real" if args.no_real else real_skip_reason()
        if reason is None:
            sizes = args.real_gib
            if sizes is None:
                free = shutil.disk_usage(tmp).free
                sizes = [1.0, 8.0] if free >= 20 << 30 else [1.0]
                if free < 20 << 30:
                    results["real_note"] = (
                        f"8 GiB dump left out: {free >> 30} GiB free on {tmp.parent} (< 20)"
                    )
            print(f"real CRIU dumps {sizes} GiB ...", file=sys.stderr)
            results["real"] = real_dumps(tmp, sizes, args.rounds, with_pycriu)
        else:
            results["real"] = reason
        if args.no_hook:
            results["hook"] = "--no-hook"
        else:
            from tests.runtimes import skip_reason as runtime_skip

            why = runtime_skip()
            if why:
                results["hook"] = why
            else:
                print("hook ...", file=sys.stderr)
                from bench.bench_hook import run as run_hook

                results["hook"] = run_hook(args.rounds)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(table(results))


if __name__ == "__main__":
    main()
