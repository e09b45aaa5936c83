"""Real CRIU for tests and fixture scripts: build the workloads, start them, dump, restore, release.

The CRIU is Debian trixie's 4.1.1 in a private prefix (scripts/get-criu). Dumps and restores need
root; :func:`skip_reason` says why they cannot run here, for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("CRIU_XSTATE_CACHE", REPO / ".cache"))
WORKLOADS = REPO / "tests" / "workloads"
UNSUPPORTED = 77


def criu_path() -> Path:
    return CACHE / "criu-4.1.1" / "criu"


@functools.cache
def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "real CRIU dumps need root"
    if not criu_path().exists():
        return f"no CRIU at {criu_path()}: run scripts/get-criu"
    if shutil.which("gcc") is None:
        return "gcc is needed to build the static workloads"
    r = subprocess.run([str(criu_path()), "check"], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        return f"criu check failed: {(r.stdout + r.stderr).strip().splitlines()[-1:]}"
    return None


def build_workload(name: str = "ymm_handler") -> Path:
    """Build a workload statically: C with glibc, or a 32-bit assembly program without libc (.S)."""
    asm = WORKLOADS / f"{name}.S"
    src = asm if asm.exists() else WORKLOADS / f"{name}.c"
    out = CACHE / "workloads" / name
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        out.parent.mkdir(parents=True, exist_ok=True)
        if src.suffix == ".S":
            cmd = ["gcc", "-m32", "-nostdlib", "-static", "-o", str(out), str(src)]
        else:
            cmd = ["gcc", "-static", "-O2", "-Wall", "-o", str(out), str(src), "-lpthread"]
        subprocess.run(cmd, check=True, capture_output=True)
    return out


def _wait_for(path: Path, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"workload exited with {proc.returncode} before {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what} ({path})")
        time.sleep(0.02)


def _pid_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{pid}").exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"pid {pid} still exists")
        time.sleep(0.02)


def criu(*args: str, log_dir: Path, log: str) -> None:
    cmd = [str(criu_path()), *args, "-o", log, "-v4"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        tail = (
            "\n".join((log_dir / log).read_text(errors="replace").splitlines()[-15:])
            if (log_dir / log).exists()
            else ""
        )
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr}\n{tail}")


@dataclass
class Workload:
    """One run of a workload: start it, wait until every handler is entered, dump, restore, release."""

    workdir: Path
    mode: str = "siginfo"
    seed: int = 5
    threads: int = 1
    binary: str = "ymm_handler"
    exe: Path | None = None  # run this copy of the binary (a path another machine will also have)
    env: dict[str, str] | None = None
    pid: int = 0
    _proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def start(self, timeout: float = 20.0) -> Workload:
        self.workdir.mkdir(parents=True, exist_ok=True)
        exe = self.exe or build_workload(self.binary)
        if self.binary in ("prof_vector", "ia32_handler"):
            args = [str(exe), str(self.workdir)]
        else:
            args = [str(exe), str(self.workdir), str(self.seed), self.mode]
            if self.mode == "threads":
                args.append(str(self.threads))
        self._proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
            env=None if self.env is None else {**os.environ, **self.env},
            cwd="/",  # a path every machine has: the restored process reopens its cwd
        )
        self.pid = self._proc.pid
        try:
            _wait_for(self.workdir / "ready", timeout, "the workload's ready marker", self._proc)
        except RuntimeError:
            if self._proc.returncode == UNSUPPORTED:
                raise Unsupported(f"workload mode {self.mode} unsupported on this CPU") from None
            raise
        time.sleep(0.05)
        return self

    def truths(self) -> list[dict[str, Any]]:
        return [json.loads(p.read_text()) for p in sorted(self.workdir.glob("truth-*.json"))]

    def dump(self, images: Path, *, leave_running: bool = False) -> None:
        images.mkdir(parents=True, exist_ok=True)
        extra = ["--leave-running"] if leave_running else []
        criu("dump", "-t", str(self.pid), "-D", str(images), *extra, log_dir=images, log="dump.log")
        if leave_running:
            return
        if self._proc is not None:
            self._proc.wait(timeout=10)  # reap it, or its pid stays taken by a zombie
        _pid_gone(self.pid)

    def restore(self, images: Path, *extra: str) -> None:
        for name in ("result", "done"):
            (self.workdir / name).unlink(missing_ok=True)
        _pid_gone(self.pid)
        criu("restore", "-D", str(images), "-d", *extra, log_dir=images, log="restore.log")

    def release(self) -> None:
        os.kill(self.pid, signal.SIGUSR2)

    def result(self, timeout: float = 20.0) -> list[str]:
        """The per-level OK/CORRUPT lines, or ['DIED ...'] when the process died without reporting."""
        deadline = time.monotonic() + timeout
        done = self.workdir / "done"
        while not done.exists():
            gone = not Path(f"/proc/{self.pid}").exists() or _is_zombie(self.pid)
            if gone and not done.exists():  # re-checked after death: it may have finished in between
                lines = _lines(self.workdir / "result")
                return [*lines, f"DIED before finishing (pid {self.pid})"]
            if time.monotonic() > deadline:
                raise TimeoutError("workload did not finish")
            time.sleep(0.02)
        _pid_gone(self.pid)
        return _lines(self.workdir / "result")

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        if self._proc is not None and self._proc.poll() is None:
            self._proc.wait(timeout=10)


class Unsupported(RuntimeError):
    pass


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except (OSError, IndexError):
        return True


def truth_levels(workdir: Path) -> set[tuple[int, int]]:
    """(tid, depth) of every handler level the workload recorded (truth-<tid>-<depth>.json)."""
    return {(int(p.stem.split("-")[1]), int(p.stem.split("-")[2])) for p in workdir.glob("truth-*.json")}


def lost_upper_halves(lines: list[str], levels: set[tuple[int, int]]) -> bool:
    """The process ran to the end and each of ``levels`` reported exactly its YMM upper halves lost: the
    kernel restored the frame FX-only. A crash (a DIED line), a missing level or any other damage is not
    that, so a control built on this proves the failure it claims."""
    got: set[tuple[int, int]] = set()
    for line in lines:
        m = re.fullmatch(r"(\d+) (\d+) CORRUPT ymm\d+:hi(?:,ymm\d+:hi)*", line)
        if m is None:
            return False
        got.add((int(m[1]), int(m[2])))
    return bool(got) and got == levels and len(lines) == len(levels)


def results_ok(lines: list[str]) -> bool:
    return bool(lines) and all(line.endswith(" OK") for line in lines)
