"""crun 1.21 (trixie's, with libcriu) end to end, configured the way every CRIU caller is: a CRIU config
file (CRIU_CONFIG_FILE here; /etc/criu/default.conf in production) naming the installed hook. crun
before 1.26 reads no runc.conf/crun.conf at all, so this is the only configuration that reaches it.
The flow runs in a private mount namespace (tests/crun_flow.py); nothing on the host changes."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from criu_xstate.cli import main
from tests.crun_flow import CRUN
from tests.runtimes import skip_reason
from tests.test_runtimes import foreign_profile, no_avx_profile

pytestmark = [pytest.mark.slow, pytest.mark.criu, pytest.mark.runtime]
REPO = Path(__file__).parents[1]


def _install(tmp_path: Path, name: str, dest: str, mode: str = "enforce") -> str:
    d = tmp_path / name
    argv = ["hook-install", "--script", str(d / "hook"), "--config", str(d / "config.yaml")]
    assert main([*argv, "--criu-config", str(d / "criu.conf"), "--dest", dest, "--mode", mode]) == 0
    return str(d / "criu.conf")


def _flow(tmp_path: Path, prepare: str, *configs: str) -> list[dict[str, object]]:
    reason = skip_reason() or (None if CRUN.exists() else "no crun prefix: run scripts/get-criu")
    if reason:
        pytest.skip(reason)
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is needed for a private mount namespace")
    name = f"criu-xstate-crun-{os.getpid()}-{secrets.token_hex(3)}"
    cmd = [
        "unshare",
        "-m",
        "--propagation",
        "private",
        sys.executable,
        "-m",
        "tests.crun_flow",
        str(tmp_path / "c"),
        name,
        prepare,
        *configs,
    ]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    steps = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert steps and steps[0]["step"] == "checkpoint" and steps[0]["rc"] == 0, (r.stdout, r.stderr)
    return steps[1:]


def test_crun_restores_through_the_hook_compatible_translated_and_refused(tmp_path: Path) -> None:
    probe = _install(tmp_path, "probe", "probe")
    off = _install(tmp_path, "off", "probe", mode="off")
    refuse = _install(tmp_path, "refuse", str(no_avx_profile(tmp_path)))
    apply_foreign = f"{REPO}/.venv/bin/criu-xstate apply {{images}} --dest {foreign_profile()} --in-place"
    control, translated, refused = _flow(tmp_path, apply_foreign, off, probe, refuse)
    assert control["rc"] == 0 and all("CORRUPT" in x for x in control["lines"]), control  # type: ignore[attr-defined]
    assert (
        translated["rc"] == 0
        and translated["lines"]
        and all(  # type: ignore[attr-defined]
            x.endswith(" OK")
            for x in translated["lines"]  # type: ignore[attr-defined]
        )
    ), translated
    assert any("rewrote" in x for x in translated["hook"]), translated  # type: ignore[attr-defined]
    assert refused["rc"] != 0 and any("refusing the restore" in x for x in refused["hook"]), refused  # type: ignore[attr-defined]
