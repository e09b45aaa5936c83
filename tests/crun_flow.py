"""Run inside a private mount namespace (tests/test_crun.py starts it with `unshare -m`): crun 1.21 with
CRIU 4.1.1, one container checkpointed in its handler, restored once per CRIU config given, each
result printed as one JSON line. /sys/fs/cgroup/unified is unmounted in this namespace only: crun
cannot handle this machine's hybrid cgroup layout otherwise (research/runtimes.md); the host's mounts
are not touched.

    python -m tests.crun_flow ROOT NAME PREPARE-CMD CONFIG...   (CONFIG: a CRIU config file, or "-")
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from tests.realcriu import CACHE, criu_path
from tests.runtimes import RuncContainer, clean_env

CRUN = CACHE / "crun-1.21" / "crun"


def crun(*args: str, config: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**clean_env(), "PATH": f"{criu_path().parent}:{os.environ['PATH']}"}
    if config:
        env["CRIU_CONFIG_FILE"] = config
    return subprocess.run(
        [str(CRUN), *args], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL
    )


def wait(path: Path, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def main() -> int:
    root, name, prepare, *configs = sys.argv[1:]
    try:
        return _flow(root, name, prepare, configs)
    finally:
        crun("delete", "-f", name)  # never leave a container behind, whatever failed


def _flow(root: str, name: str, prepare: str, configs: list[str]) -> int:
    subprocess.run(["umount", "/sys/fs/cgroup/unified"], capture_output=True)
    c = RuncContainer(Path(root), name)
    c.create_bundle()
    out, images, work = c.out, Path(root) / "images", Path(root) / "work"
    images.mkdir()
    work.mkdir()
    crun("delete", "-f", name)  # a leftover of a killed earlier run
    r = crun("run", "-d", "--bundle", str(c.bundle), name)
    if r.returncode or not wait(out / "ready"):
        print(json.dumps({"step": "run", "rc": r.returncode, "err": r.stderr[-500:]}))
        crun("delete", "-f", name)
        return 1
    time.sleep(0.05)
    r = crun("checkpoint", "--image-path", str(images), "--work-path", str(work), name)
    print(json.dumps({"step": "checkpoint", "rc": r.returncode, "err": r.stderr[-500:]}), flush=True)
    if r.returncode:
        return 1
    if prepare != "-":
        subprocess.run(prepare.replace("{images}", str(images)), shell=True, check=True)
    for config in configs:
        for n in ("result", "done"):
            (out / n).unlink(missing_ok=True)
        crun("delete", "-f", name)
        r = crun(
            "restore",
            "-d",
            "--bundle",
            str(c.bundle),
            "--image-path",
            str(images),
            "--work-path",
            str(work),
            name,
            config=None if config == "-" else config,
        )
        lines: list[str] = []
        if r.returncode == 0:
            crun("kill", name, "USR2")
            lines = out.joinpath("result").read_text().splitlines() if wait(out / "done") else ["NO RESULT"]
        log = (work / "restore.log").read_text(errors="replace") if (work / "restore.log").exists() else ""
        print(
            json.dumps(
                {
                    "step": "restore",
                    "config": config,
                    "rc": r.returncode,
                    "lines": lines,
                    "hook": [x for x in log.splitlines() if "criu-xstate hook" in x],
                }
            ),
            flush=True,
        )
    crun("delete", "-f", name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
