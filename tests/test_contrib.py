"""contrib/kubernetes scripts on the fixtures and shipped profiles."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).parents[1]


def test_nodes_for_checkpoint(tmp_path: Path) -> None:
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    for name in ("amd-zen2", "amd-zen4", "amd-epyc-zen4-vm-nopku"):
        shutil.copy2(REPO / "contrib" / "hosts" / f"{name}.yaml", nodes)
    script = str(REPO / "contrib" / "kubernetes" / "nodes-for-checkpoint")
    ck = str(REPO / "tests" / "fixtures" / "siginfo")
    strict = subprocess.run([sys.executable, script, ck, str(nodes)], capture_output=True, text=True)
    loose = subprocess.run(
        [sys.executable, script, ck, str(nodes), "--allow-translate"], capture_output=True, text=True
    )
    assert strict.returncode == 0 and loose.returncode == 0, strict.stderr + loose.stderr

    def admitted(out: str) -> list[str]:
        terms = yaml.safe_load(out)["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]
        return list(terms["nodeSelectorTerms"][0]["matchExpressions"][0]["values"])

    assert admitted(strict.stdout) == ["amd-epyc-zen4-vm-nopku"]
    assert admitted(loose.stdout) == ["amd-epyc-zen4-vm-nopku", "amd-zen4"]
    only_zen2 = tmp_path / "zen2"
    only_zen2.mkdir()
    shutil.copy2(nodes / "amd-zen2.yaml", only_zen2)
    assert subprocess.run([sys.executable, script, ck, str(only_zen2)], capture_output=True).returncode == 1


def test_nfd_features() -> None:
    out = subprocess.run(
        [
            sys.executable,
            str(REPO / "contrib" / "kubernetes" / "nfd-features"),
            str(REPO / "contrib" / "hosts" / "intel-sapphire-rapids.yaml"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert "criu-xstate.xcr0=0x602e7" in out and "criu-xstate.amx-xtiledata=true" in out
    assert "criu-xstate.user-size=2816" in out
    assert "criu-xstate.sigreturn-source=guessed" in out  # a CPU-family profile: its kernel is unknown


def test_the_hook_script_starts_no_python_for_other_actions(tmp_path: Path) -> None:
    """CRIU runs the action script at every action, also while a container is frozen."""
    script = str(REPO / "contrib" / "criu" / "criu-xstate-hook")
    spy = tmp_path / "criu-xstate"
    spy.write_text(f"#!/bin/sh\necho called > {tmp_path / 'called'}\n")
    spy.chmod(0o755)
    for action in ("pre-dump", "post-dump", "network-lock", "post-restore", "pre-resume"):
        env = {"PATH": "/usr/bin:/bin", "CRIU_XSTATE": str(spy), "CRTOOLS_SCRIPT_ACTION": action}
        assert subprocess.run([script], env=env).returncode == 0
    assert not (tmp_path / "called").exists()
    env = {"PATH": "/usr/bin:/bin", "CRIU_XSTATE": str(spy), "CRTOOLS_SCRIPT_ACTION": "pre-restore"}
    assert subprocess.run([script], env=env).returncode == 0
    assert (tmp_path / "called").read_text() == "called\n"


def test_python_dash_m_is_the_cli() -> None:
    r = subprocess.run([sys.executable, "-m", "criu_xstate", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.startswith("criu-xstate ")


def test_bash_completion_completes_commands_and_options(tmp_path: Path) -> None:
    script = tmp_path / "c.bash"
    r = subprocess.run(
        [sys.executable, "-m", "criu_xstate", "completion", "bash"], capture_output=True, text=True
    )
    assert r.returncode == 0
    script.write_text(r.stdout)
    probe = (
        f"source {script}; COMP_WORDS=(criu-xstate pl); COMP_CWORD=1; _criu_xstate; echo ${{COMPREPLY[@]}};"
        " COMP_WORDS=(criu-xstate apply --in); COMP_CWORD=2; _criu_xstate; echo ${COMPREPLY[@]}"
    )
    out = subprocess.run(["bash", "-c", probe], capture_output=True, text=True).stdout.splitlines()
    assert out == ["plan", "--in-place"]


def test_format_json_is_json(capsys: object) -> None:
    import json

    from criu_xstate.cli import main

    fixture = str(REPO / "tests" / "fixtures" / "threads")
    assert main(["plan", fixture, "--dest", "amd-zen4", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "translate"  # type: ignore[attr-defined]
