"""Crash testing of every write path on a real CRIU dump: the writer is killed (SIGKILL), or gets ENOSPC
or EIO, at each of its disk-changing syscalls in turn (the fault points of criu_xstate.fsio).

After each, the images must be byte-identical to the state before the command, or to its complete
result, or hold a pending journal; and `undo` must then return the ORIGINAL dump byte for byte, with
nothing outside the checkpoint changed. The writer runs in a forked child, so a kill is a real kill:
no `finally`, no rollback, no clean-up runs in it.

The fast suite runs every third point; `-m slow` runs them all (counts in docs/journal.md).
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from criu_xstate import fsio
from criu_xstate.applying import Options, verify_compatible
from criu_xstate.cli import main
from criu_xstate.commands.planning import load_destinations
from criu_xstate.fsio import JOURNAL, TMP_PREFIX
from criu_xstate.transaction import journal_state

REPO = Path(__file__).parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "threads"
HOSTS = REPO / "contrib" / "hosts"
IN_PLACE = "amd-zen4.yaml"  # threads fixture: frames rewritten in place (PKRU carried)
RELOCATING = "intel-skylake-sp.yaml"  # ... offsets moved and the images relocated (mm, pagemap, pages grow)
KINDS = ("kill", "enospc", "eio")

Snapshot = dict[str, bytes]


def snapshot(d: Path) -> Snapshot:
    return {
        p.name: p.read_bytes()
        for p in sorted(d.iterdir())
        if p.name != JOURNAL and not p.name.startswith(TMP_PREFIX) and p.is_file() and not p.is_symlink()
    }


def _quiet() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)


def run_child(argv: list[str], fault_at: int | None, kind: str) -> int | str:
    """Run the CLI in a forked child with a fault at point ``fault_at``; its exit code, or 'killed'."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _quiet()
            seen = 0

            def hook(point: str, name: str) -> None:
                nonlocal seen
                if seen == fault_at:
                    if kind == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    code = errno.ENOSPC if kind == "enospc" else errno.EIO
                    seen += 1
                    raise OSError(code, os.strerror(code))
                seen += 1

            fsio.fault_hook = hook
            os._exit(main(argv))
        except BaseException:
            os._exit(99)
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return "killed"
    return os.WEXITSTATUS(status)


def count_points(argv: list[str]) -> int:
    seen: list[str] = []
    fsio.fault_hook = lambda point, name: seen.append(point)
    try:
        assert main(argv) == 0
    finally:
        fsio.fault_hook = None
    return len(seen)


@dataclass
class Scenario:
    name: str
    prepare: Callable[[Path], None]  # bring a fresh copy of the fixture to the state before the command
    argv: Callable[[Path], list[str]]
    fixture: Path = FIXTURE
    env: Callable[[Path], dict[str, str]] = lambda ck: {}


def _apply(ck: Path, host: str) -> list[str]:
    return ["apply", str(ck), "--dest", str(HOSTS / host), "--in-place"]


def _nothing(ck: Path) -> None:
    pass


def _applied(ck: Path) -> None:
    assert main(_apply(ck, IN_PLACE)) == 0


def _applied_twice(ck: Path) -> None:
    _applied(ck)
    assert main(_apply(ck, RELOCATING)) == 0


def _hook(ck: Path, host: str) -> list[str]:
    """The hook as CRIU runs it: its environment is set by the test (``Scenario.env``)."""
    return ["hook"]


SCENARIOS = [
    Scenario("first apply", _nothing, lambda ck: _apply(ck, IN_PLACE)),
    Scenario("first apply, relocating", _nothing, lambda ck: _apply(ck, RELOCATING)),
    Scenario("second apply, other host", _applied, lambda ck: _apply(ck, RELOCATING)),
    Scenario(
        "hook after a manual apply",
        _applied,
        lambda ck: _hook(ck, RELOCATING),
        env=lambda ck: {
            "CRTOOLS_SCRIPT_ACTION": "pre-restore",
            "CRTOOLS_IMAGE_DIR": str(ck),
            "CRIU_XSTATE_DEST": str(HOSTS / RELOCATING),
        },
    ),
    Scenario("third apply, relocated frames back", _applied_twice, lambda ck: _apply(ck, IN_PLACE)),
    Scenario("undo after two applies", _applied_twice, lambda ck: ["undo", str(ck)]),
]
# The same on every other real dump with live frames (slow suite only).
MORE = [
    Scenario(f"{s.name} [{fixture}]", s.prepare, s.argv, FIXTURE.parent / fixture, s.env)
    for fixture in ("siginfo", "nested", "altstack", "plain")
    for s in SCENARIOS
]


@pytest.fixture
def quiet_capsys(capsys: pytest.CaptureFixture[str]) -> Iterator[None]:
    yield
    capsys.readouterr()


@dataclass
class Case:
    ck: Path
    outside: Path
    original: Snapshot
    before: Snapshot
    after: Snapshot
    journal_before: str | None


def _case(root: Path, scenario: Scenario) -> tuple[Path, Path]:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir()
    ck = root / "ck"
    shutil.copytree(scenario.fixture, ck)
    outside = root / "outside.img"
    outside.write_bytes(b"not part of the checkpoint")
    scenario.prepare(ck)
    return ck, outside


def check_after_fault(case: Case, result: int | str, kind: str, undoing: bool) -> str:
    """The invariant; returns the outcome's name for the tally."""
    ck = case.ck
    state = snapshot(ck)
    journal = journal_state(ck)
    assert sorted(p.name for p in ck.parent.iterdir()) == ["ck", "outside.img"]
    assert case.outside.read_bytes() == b"not part of the checkpoint"
    if kind == "kill":
        assert result in ("killed", 0), result
    else:
        assert result in (0, 2), result
    if state == case.before:
        outcome = "as before"
    elif state == case.after:
        outcome = "complete"
    else:
        # Mixed bytes only ever with a journal: a pending apply, or an undo cut short.
        assert journal == "pending" or (undoing and journal == "complete"), "mixed checkpoint, no journal"
        outcome = "journal left for undo"
    if kind != "kill" and result == 2 and not undoing:
        assert state == case.before, "a failed apply was not rolled back"
        # The journal is back as it was, or (its reset failed too) pending: undo still returns the original.
        assert journal in (case.journal_before, "pending")
    if journal is not None:
        assert main(["undo", str(ck)]) == 0
        assert snapshot(ck) == case.original, "undo did not return the original dump"
        assert not [p for p in ck.iterdir() if p.name.startswith((TMP_PREFIX, ".criu-xstate"))]
    else:
        assert snapshot(ck) == case.original
    return outcome


def _points(total: int, every: int) -> range:
    return range(0, total, every)


@pytest.mark.parametrize(
    ("scenario", "every"),
    [pytest.param(s, 3, id=f"{s.name}, every third point") for s in SCENARIOS]
    + [pytest.param(s, 1, id=f"{s.name}, every point", marks=pytest.mark.slow) for s in SCENARIOS + MORE],
)
def test_a_fault_at_any_point_never_loses_the_checkpoint(
    tmp_path: Path, scenario: Scenario, every: int, quiet_capsys: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    for var, value in scenario.env(tmp_path / "case" / "ck").items():
        monkeypatch.setenv(var, value)  # restored when the test ends: nothing leaks into later tests
    original = snapshot(scenario.fixture)
    ck, outside = _case(tmp_path / "case", scenario)
    before, journal_before = snapshot(ck), journal_state(ck)
    total = count_points(scenario.argv(ck))
    after = snapshot(ck)
    assert after != before and total > 10
    undoing = scenario.name.startswith("undo")
    tally: dict[str, int] = {}
    for point in _points(total, every):
        for kind in KINDS:
            ck, outside = _case(tmp_path / "case", scenario)
            case = Case(ck, outside, original, before, after, journal_before)
            result = run_child(scenario.argv(ck), point, kind)
            outcome = check_after_fault(case, result, kind, undoing)
            tally[f"{kind}: {outcome}"] = tally.get(f"{kind}: {outcome}", 0) + 1
    print(f"{scenario.name}: {total} fault points, {sum(tally.values())} cases: {tally}")
    assert sum(tally.values()) == len(_points(total, every)) * len(KINDS)


def test_a_killed_undo_is_finished_by_the_next_undo(tmp_path: Path, quiet_capsys: None) -> None:
    original = snapshot(FIXTURE)
    scenario = SCENARIOS[-1]
    ck, _ = _case(tmp_path / "case", scenario)
    total = count_points(["undo", str(ck)])
    for point in range(total):
        ck, _ = _case(tmp_path / "case", scenario)
        assert run_child(["undo", str(ck)], point, "kill") == "killed"
        if journal_state(ck) is not None:  # killed after the journal went: the undo was complete
            assert main(["undo", str(ck)]) == 0, f"undo after a kill at point {point}"
        assert snapshot(ck) == original, f"undo after a kill at point {point}"


@pytest.mark.parametrize("self_contained", [False, True], ids=["overlay", "self-contained"])
def test_a_killed_apply_out_leaves_no_output_or_a_complete_one(
    tmp_path: Path, self_contained: bool, quiet_capsys: None
) -> None:
    """Killed after a growing delay, again and again: ``out`` is absent or complete and compatible."""
    src = tmp_path / "src"
    shutil.copytree(FIXTURE, src)
    original = snapshot(src)
    out = tmp_path / "out"
    argv = ["apply", str(src), "--dest", str(HOSTS / RELOCATING), "--out", str(out)]
    argv += ["--self-contained"] if self_contained else []
    (dest,) = load_destinations([str(HOSTS / RELOCATING)])
    outcomes = {"absent": 0, "complete": 0}
    for step in range(40):
        if out.exists():
            shutil.rmtree(out)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            _quiet()
            os._exit(main(argv))
        time.sleep(step * 0.003)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        assert snapshot(src) == original
        if out.exists():
            verify_compatible(out, dest, Options())  # raises unless the output plans as compatible
            outcomes["complete"] += 1
        else:
            outcomes["absent"] += 1
    print(f"apply --out killed 40 times: {outcomes}")
    assert outcomes["absent"] > 0
