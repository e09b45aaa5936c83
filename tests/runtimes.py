"""Real container runtimes for the end-to-end tests: a runc container running the ymm_handler workload.

runc (Debian's, installed by scripts/setup-dev) runs CRIU 4.1.1 from the private prefix (`runc --criu`);
CRIU's configuration comes from a private file named by ``CRIU_CONFIG_FILE`` (never /etc). The
container has no network namespace of its own (CRIU would need iptables to lock it) and its stdio is
/dev/null inside (CRIU cannot dump a container whose fd 1 is a host file: research/runtimes.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.realcriu import build_workload, criu_path
from tests.realcriu import skip_reason as criu_skip_reason

BUSYBOX = Path("/bin/busybox")


def make_rootfs(rootfs: Path) -> None:
    """busybox (static) as /bin/sh, the static ymm_handler workload, and /out for its reports."""
    for d in ("bin", "out", "proc", "dev", "sys", "tmp"):
        (rootfs / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, rootfs / "bin" / "busybox")
    (rootfs / "bin" / "sh").symlink_to("busybox")
    shutil.copy2(build_workload("ymm_handler"), rootfs / "ymm_handler")


def _run_logged(
    cmd: list[str], env: dict[str, str], log: list[str], what: str, check: bool
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    log.append(f"$ {' '.join(cmd)} -> {r.returncode} {r.stderr.strip()[-300:]}")
    if check and r.returncode != 0:
        raise RuntimeError(f"{what} failed ({r.returncode}): {r.stderr.strip()}")
    return r


def clean_env() -> dict[str, str]:
    """This process's environment without criu-xstate's and CRIU's own variables: a runtime test
    configures the hook only through the files it installs, never by accident through a variable."""
    return {
        k: v for k, v in os.environ.items() if not k.startswith(("CRIU_XSTATE_", "CRIU_CONFIG", "CRTOOLS_"))
    }


def skip_reason() -> str | None:
    reason = criu_skip_reason()
    if reason:
        return reason
    if shutil.which("runc") is None:
        return "runc is not installed (scripts/setup-dev installs it)"
    if not BUSYBOX.exists():
        return "busybox-static is not installed (scripts/setup-dev installs it)"
    return None


@dataclass
class RuncContainer:
    """One container from a fresh bundle; every method raises with runc's own message on failure."""

    root: Path
    name: str
    mode: str = "siginfo"
    criu_config: Path | None = None
    log: list[str] = field(default_factory=list)

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    @property
    def out(self) -> Path:
        return self.bundle / "rootfs" / "out"

    def _runc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = clean_env()
        if self.criu_config is not None:
            env["CRIU_CONFIG_FILE"] = str(self.criu_config)
        cmd = ["runc", "--criu", str(criu_path()), *args]
        return _run_logged(cmd, env, self.log, f"runc {args[0]}", check)

    def create_bundle(self) -> None:
        make_rootfs(self.bundle / "rootfs")
        subprocess.run(["runc", "spec"], cwd=self.bundle, check=True, capture_output=True)
        spec = json.loads((self.bundle / "config.json").read_text())
        spec["process"]["terminal"] = False
        spec["process"]["args"] = [
            "/bin/sh",
            "-c",
            f"exec </dev/null >/dev/null 2>&1; exec /ymm_handler /out 11 {self.mode}",
        ]
        spec["root"]["readonly"] = False
        spec["linux"]["namespaces"] = [n for n in spec["linux"]["namespaces"] if n["type"] != "network"]
        (self.bundle / "config.json").write_text(json.dumps(spec))

    def run(self, timeout: float = 20.0) -> None:
        self._runc("run", "-d", "--bundle", str(self.bundle), self.name)
        self._wait(self.out / "ready", timeout)
        time.sleep(0.05)

    def checkpoint(self, images: Path, work: Path) -> None:
        images.mkdir(parents=True, exist_ok=True)
        work.mkdir(parents=True, exist_ok=True)
        self._runc("checkpoint", "--image-path", str(images), "--work-path", str(work), self.name)

    def restore(self, images: Path, work: Path) -> subprocess.CompletedProcess[str]:
        for name in ("result", "done"):
            (self.out / name).unlink(missing_ok=True)
        self.delete()
        work.mkdir(parents=True, exist_ok=True)
        return self._runc(
            "restore",
            "-d",
            "--bundle",
            str(self.bundle),
            "--image-path",
            str(images),
            "--work-path",
            str(work),
            self.name,
            check=False,
        )

    def result(self, timeout: float = 20.0) -> list[str]:
        """Release the handler (SIGUSR2) and read the workload's own verdict lines."""
        self._runc("kill", self.name, "USR2")
        try:
            self._wait(self.out / "done", timeout)
        except TimeoutError:
            state = self._runc("state", self.name, check=False).stdout
            if '"running"' not in state:  # it died instead of reporting: say so, never "lost"
                return [*_lines(self.out / "result"), "DIED before finishing"]
            raise
        return _lines(self.out / "result")

    def delete(self) -> None:
        with contextlib.suppress(Exception):
            self._runc("delete", "--force", self.name, check=False)

    def _wait(self, path: Path, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not path.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"timed out waiting for {path}; runc log: {self.log[-3:]}")
            time.sleep(0.02)


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def podman_skip_reason() -> str | None:
    reason = skip_reason()
    if reason:
        return reason
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/setup-dev installs it)"
    return None


@dataclass
class Podman:
    """Podman with private storage, run root and containers.conf under ``root`` (never the system's),
    runc as its runtime (crun 1.8 in bookworm cannot checkpoint), CRIU 4.1.1 first on PATH."""

    root: Path
    log: list[str] = field(default_factory=list)
    runroot: Path | None = None  # storage and run root: podman wants short paths (under 50 characters)

    def setup(self) -> None:
        import tempfile

        self.runroot = Path(tempfile.mkdtemp(prefix="cxs-", dir="/tmp"))
        assert self.short
        bin_dir = self.root / "bin"
        bin_dir.mkdir(parents=True, exist_ok=True)
        for name, target in (("criu", criu_path()), ("runc", None)):
            script = bin_dir / name
            if target is None:  # runc with our CRIU (podman passes no --criu of its own)
                runc = shutil.which("runc", path="/usr/sbin:/usr/bin:/sbin:/bin")
                script.write_text(f'#!/bin/sh\nexec {runc} --criu {criu_path()} "$@"\n')
            else:
                script.write_text(f'#!/bin/sh\nexec {target} "$@"\n')
            script.chmod(0o755)
        (self.root / "containers.conf").write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            "[engine.runtimes]\n"
            f'runc = ["{bin_dir / "runc"}"]\n'
        )
        rootfs = self.root / "rootfs"
        make_rootfs(rootfs)
        subprocess.run(["tar", "-C", str(rootfs), "-cf", str(self.root / "rootfs.tar"), "."], check=True)
        self.run("import", str(self.root / "rootfs.tar"), "localhost/criu-xstate-ymm:test")

    @property
    def out(self) -> Path:
        return self.root / "rootfs" / "out"

    @property
    def short(self) -> Path:
        if self.runroot is None:
            raise RuntimeError("Podman.setup() first")
        return self.runroot

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [
            "podman",
            "--root",
            str(self.short / "storage"),
            "--runroot",
            str(self.short / "run"),
            "--storage-driver",
            "vfs",
            *args,
        ]
        env = {
            **clean_env(),
            "CONTAINERS_CONF": str(self.root / "containers.conf"),
            "PATH": f"{self.root / 'bin'}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        }
        return _run_logged(cmd, env, self.log, f"podman {args[0]}", check)

    def start_workload(self, name: str, *extra: str) -> None:
        for p in self.out.iterdir():
            p.unlink()
        self.run(
            "run",
            "-d",
            "--name",
            name,
            "--network",
            "none",
            "-v",
            f"{self.out}:/out",
            *extra,
            "localhost/criu-xstate-ymm:test",
            "/bin/sh",
            "-c",
            "exec </dev/null >/dev/null 2>&1; exec /ymm_handler /out 11 siginfo",
        )
        _wait(self.out / "ready", 20.0)
        time.sleep(0.05)

    def result(self, name: str) -> list[str]:
        self.run("kill", "--signal", "USR2", name)
        _wait(self.out / "done", 20.0)
        return _lines(self.out / "result")

    def clean_out(self) -> None:
        for n in ("result", "done"):
            (self.out / n).unlink(missing_ok=True)

    def teardown(self) -> None:
        with contextlib.suppress(Exception):
            self.run("rm", "--all", "--force", check=False)
        with contextlib.suppress(Exception):
            self.run("rmi", "--all", "--force", check=False)
        if self.runroot is not None:
            subprocess.run(["umount", "-R", str(self.runroot)], capture_output=True)
            shutil.rmtree(self.runroot, ignore_errors=True)


def _wait(path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {path}")
        time.sleep(0.02)
