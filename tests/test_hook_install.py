"""hook-install / hook-check into private paths (never /etc), the hook's policy file, its modes, and the
shipped profiles selectable by name."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

import criu_xstate
from criu_xstate import hookconfig, profiles
from criu_xstate.cli import main
from criu_xstate.errors import ProfileError

REPO = Path(__file__).parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "threads"


def _install(tmp_path: Path, *more: str) -> tuple[Path, Path, Path]:
    script, config, criu_conf = (
        tmp_path / "lib" / "hook",
        tmp_path / "etc" / "config.yaml",
        tmp_path / "criu.conf",
    )
    argv = ["hook-install", "--script", str(script), "--config", str(config), "--criu-config", str(criu_conf)]
    assert main([*argv, *more]) == 0
    return script, config, criu_conf


def test_install_writes_script_config_and_one_action_script_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script, config, criu_conf = _install(tmp_path, "--dest", "amd-zen4", "--mode", "check")
    out = capsys.readouterr().out
    assert f"added 'action-script {script}' to {criu_conf}" in out
    assert os.access(script, os.X_OK)
    assert hookconfig.parse(config.read_text(), str(config)).mode == "check"
    _install(tmp_path, "--dest", "amd-zen4", "--mode", "check")  # idempotent
    assert "unchanged" in capsys.readouterr().out
    assert criu_conf.read_text().count("action-script") == 1
    assert main(["hook-check", "--criu-config", str(criu_conf), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["ok"] and any("mode check, dest amd-zen4 = amd-zen4" in c["what"] for c in doc["checks"])


def test_check_finds_a_missing_installation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "criu.conf").write_text("tcp-established\n")
    assert main(["hook-check", "--criu-config", str(tmp_path / "criu.conf")]) == 2
    assert "PROBLEM no criu-xstate action-script" in capsys.readouterr().out


def test_the_installed_script_runs_the_hook_with_its_policy_under_a_bare_environment(tmp_path: Path) -> None:
    """No PATH to the venv, no CRIU_XSTATE_* variables: as under a container runtime."""
    script, _, _ = _install(tmp_path, "--dest", "amd-zen2")  # refuses the threads fixture
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURE, ck)
    env = {"PATH": "/usr/bin:/bin", "CRTOOLS_SCRIPT_ACTION": "pre-restore", "CRTOOLS_IMAGE_DIR": str(ck)}
    r = subprocess.run([str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "COMPONENT_IN_USE_MISSING_ON_DEST" in r.stderr, r.stderr
    assert sorted(p.name for p in ck.iterdir()) == sorted(p.name for p in FIXTURE.iterdir())


def test_the_installed_script_ignores_the_runtimes_python_environment(tmp_path: Path) -> None:
    """The script runs Python isolated, without site, from the directories named at install time: a
    PYTHONPATH (or PYTHONSTARTUP, a user site) in a runtime's environment cannot put other code in the
    hook, and the installation's own modules are found without site's help."""
    script, _, _ = _install(tmp_path, "--dest", "amd-zen2")
    decoy = tmp_path / "decoy" / "criu_xstate"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("raise SystemExit(42)\n")
    (tmp_path / "startup.py").write_text("raise SystemExit(43)\n")
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURE, ck)
    env = {
        "PATH": "/usr/bin:/bin",
        "CRTOOLS_SCRIPT_ACTION": "pre-restore",
        "CRTOOLS_IMAGE_DIR": str(ck),
        "PYTHONPATH": str(decoy.parent),
        "PYTHONSTARTUP": str(tmp_path / "startup.py"),
        "PYTHONHOME": str(tmp_path / "nowhere"),
    }
    r = subprocess.run([str(script)], env=env, capture_output=True, text=True)
    assert r.returncode == 1 and "COMPONENT_IN_USE_MISSING_ON_DEST" in r.stderr, r.stderr
    text = script.read_text()
    assert json.dumps(str(Path(criu_xstate.__file__).resolve().parents[1])) in text and " -I -S " in text


@pytest.mark.parametrize(
    ("mode", "dest", "rc", "changed"),
    [
        ("enforce", "amd-zen4", 0, True),
        ("check", "amd-zen4", 1, False),
        ("warn", "amd-zen4", 0, False),
        ("warn", "amd-zen2", 0, False),
        ("enforce", "amd-zen2", 1, False),
        ("off", "amd-zen2", 0, False),
    ],
)
def test_hook_modes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mode: str, dest: str, rc: int, changed: bool
) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURE, ck)
    log = tmp_path / "decisions.jsonl"
    config = tmp_path / "config.yaml"
    config.write_text(f"dest: {dest}\nmode: {mode}\nlog: {log}\n")
    for var in ("CRIU_XSTATE_DEST", "CRIU_XSTATE_MODE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CRIU_XSTATE_CONFIG", str(config))
    monkeypatch.setenv("CRTOOLS_SCRIPT_ACTION", "pre-restore")
    monkeypatch.setenv("CRTOOLS_IMAGE_DIR", str(ck))
    assert main(["hook"]) == rc
    assert (ck / ".criu-xstate-journal.json").exists() == changed
    if mode == "off":
        assert not log.exists()
    else:
        (record,) = [json.loads(line) for line in log.read_text().splitlines()]
        assert record["mode"] == mode and record["dest"] == dest
        assert record["decision"] == {"amd-zen4": "translated" if changed else "needs-translation"}.get(
            dest, "refused"
        )


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("dest: amd-zen2\nmode: warn\n")
    c = hookconfig.load({"CRIU_XSTATE_CONFIG": str(config), "CRIU_XSTATE_MODE": "apply"})
    assert (c.dest, c.mode) == ("amd-zen2", "enforce") and "environment" in c.source
    with pytest.raises(ProfileError, match="cannot read"):
        hookconfig.load({"CRIU_XSTATE_CONFIG": str(tmp_path / "missing.yaml")})


@pytest.mark.parametrize(
    "text",
    [
        "a: &x 1\nb: *x\n",
        "mode: !!python/name:os.system x\n",
        "mode: bogus\n",
        "colour: red\n",
        "- 1\n",
        "relocate: maybe\n",
        'log: "a\\x1b[31m"\n',
        "dest: " + "x" * 70000 + "\n",
    ],
)
def test_bad_hook_configs_are_one_line_errors(text: str) -> None:
    with pytest.raises(ProfileError) as exc:
        hookconfig.parse(text, "c.yaml")
    assert "\n" not in str(exc.value)


def test_every_shipped_profile_loads_and_resolves_by_name(capsys: pytest.CaptureFixture[str]) -> None:
    names = profiles.shipped_names()
    assert "amd-zen4" in names and len(names) >= 10
    assert main(["profiles", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["profiles"]
    assert [p["name"] for p in listed] == names
    assert profiles.resolve("amd-zen4") == str(profiles.SHIPPED / "amd-zen4.yaml")
    assert profiles.resolve("./amd-zen4.yaml") == "./amd-zen4.yaml"  # a path stays a path
    assert main(["plan", str(FIXTURE), "--dest", "amd-zen4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "translate"
