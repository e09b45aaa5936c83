"""The CRIU hook's modes and refusals (driven by the environment CRIU sets), and apply on a real full
filesystem."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from criu_xstate.cli import main
from criu_xstate.transaction import journal_state
from tests.faults import interrupt_at_first_pwrite

REPO = Path(__file__).parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "threads"
HOSTS = REPO / "contrib" / "hosts"


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


def _hook(
    monkeypatch: pytest.MonkeyPatch,
    images: Path,
    dest: str,
    action: str = "pre-restore",
    mode: str | None = None,
) -> int:
    monkeypatch.setenv("CRTOOLS_SCRIPT_ACTION", action)
    monkeypatch.setenv("CRTOOLS_IMAGE_DIR", str(images))
    monkeypatch.setenv("CRIU_XSTATE_DEST", str(HOSTS / dest))
    if mode:
        monkeypatch.setenv("CRIU_XSTATE_MODE", mode)
    else:
        monkeypatch.delenv("CRIU_XSTATE_MODE", raising=False)
    return main(["hook"])


def test_hook_modes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURE, ck)
    before = _snapshot(ck)
    assert _hook(monkeypatch, ck, "amd-zen4.yaml", action="post-restore") == 0  # other actions: no-op
    assert _hook(monkeypatch, ck, "amd-epyc-zen4-vm-nopku.yaml") == 0  # compatible: nothing written
    assert _hook(monkeypatch, ck, "amd-zen4.yaml", mode="check") == 1  # needs apply, check mode refuses
    assert _hook(monkeypatch, ck, "amd-zen2.yaml") == 1  # refused
    assert _snapshot(ck) == before
    assert "COMPONENT_IN_USE_MISSING_ON_DEST" in capsys.readouterr().err
    assert _hook(monkeypatch, ck, "amd-zen4.yaml") == 0  # translated in place, journaled
    assert json.loads((ck / ".criu-xstate-journal.json").read_text())["state"] == "complete"
    assert _snapshot(ck) != before
    assert main(["undo", str(ck)]) == 0
    assert {k: v for k, v in _snapshot(ck).items() if not k.startswith(".")} == before


def test_hook_refuses_a_checkpoint_with_a_pending_journal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURE, ck)

    interrupt_at_first_pwrite(monkeypatch, lambda: _hook(monkeypatch, ck, "amd-zen4.yaml"))
    assert journal_state(ck) == "pending"
    assert _hook(monkeypatch, ck, "amd-zen4.yaml") == 2
    assert "interrupted" in capsys.readouterr().err


def test_apply_on_a_full_filesystem_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], capture_output=True
    ).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        ck = mnt / "ck"
        shutil.copytree(FIXTURE, ck)
        fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT, 0o600)  # leave no room for the journal
        try:
            while True:
                os.write(fd, b"\0" * 4096)
        except OSError:
            pass
        finally:
            os.close(fd)
        before = _snapshot(ck)
        rc = main(["apply", str(ck), "--dest", str(HOSTS / "amd-zen4.yaml"), "--in-place"])
        err = capsys.readouterr().err
        assert rc == 2 and "nothing was changed" in err, err
        assert _snapshot(ck) == before  # nothing changed, and no file of ours is left
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize(
    ("fixture", "self_test"), [("nohandler", False), ("stale", False), ("plain", True), ("threads", True)]
)
def test_the_hook_runs_the_sigreturn_self_test_only_when_a_thread_has_a_signal_frame(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fixture: str, self_test: bool
) -> None:
    """The self-test forks a child inside every restore; its rule judges live signal frames only (a
    stale frame is reported, never planned). Either way the plan is the one a fully measured probe of
    this host gives."""
    from criu_xstate import hook, hosts
    from criu_xstate.applying import Options, _plan
    from criu_xstate.images import open_checkpoint
    from criu_xstate.model import load_model
    from criu_xstate.plan import facts_from_profile
    from criu_xstate.report.json import plan_json
    from criu_xstate.x86 import cpuid

    runs: list[int] = []
    measure = cpuid._measure_sigreturn
    monkeypatch.setattr(
        cpuid, "_measure_sigreturn", lambda facts, ok: (runs.append(1), measure(facts, ok))[1]
    )
    ck = tmp_path / "ck"
    shutil.copytree(REPO / "tests" / "fixtures" / fixture, ck)
    monkeypatch.setenv("CRTOOLS_SCRIPT_ACTION", "pre-restore")
    monkeypatch.setenv("CRTOOLS_IMAGE_DIR", str(ck))
    monkeypatch.setenv("CRIU_XSTATE_DEST", "probe")
    monkeypatch.setenv("CRIU_XSTATE_MODE", "check")
    assert main(["hook"]) in (0, 1)
    assert bool(runs) is self_test
    with open_checkpoint(ck) as c:
        model = load_model(c)
        probed = hook._probed(model)
        measured = facts_from_profile(hosts.probe_local(probed.name))
        a, b = (plan_json(_plan(model, d, Options(), relocate=True)) for d in (probed, measured))
    assert (probed == measured) is self_test
    for doc in (a, b):
        doc.pop("dest")  # the destination's facts: the sigreturn rule guessed or measured
    assert a == b
