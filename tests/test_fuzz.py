"""Fuzzing in the suite: the saved findings replayed, then a fixed time budget of fresh inputs from the
real dumps, profiles and archives (tests/fuzz.py). CRIU_XSTATE_FUZZ_SECONDS raises the budget,
CRIU_XSTATE_FUZZ_SEED replays one run; scripts/fuzz runs long campaigns and saves into the corpus."""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path

import pytest

from tests import fuzz, fuzz_inputs

BUDGET = float(os.environ.get("CRIU_XSTATE_FUZZ_SECONDS", "20"))


def test_every_saved_finding_is_handled(tmp_path: Path) -> None:
    assert fuzz.replay_corpus(tmp_path) == []


def test_fresh_inputs_give_only_our_one_line_errors(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRIU_XSTATE_FUZZ_SEED", random.randrange(1 << 32)))
    findings = tmp_path / "findings"  # the suite never writes into the repository's corpus
    stats = fuzz.campaign(tmp_path / "work", BUDGET, seed, corpus=findings)
    print(f"fuzz seed {seed}: {fuzz.report(stats, BUDGET)}")
    assert stats.inputs > 50 and set(stats.by_target) == {"image", "profile", "archive"}
    assert stats.findings == [], f"seed {seed} (files in {findings}): {stats.findings[:5]}"


def test_the_mutator_changes_its_input() -> None:
    rng = random.Random(1)
    data = bytes(range(256)) * 4
    assert sum(fuzz.mutate(data, rng) != data for _ in range(100)) > 90


@pytest.mark.parametrize(
    ("rc", "out", "err", "wrong"),
    [
        (3, "", "criu-xstate: internal error: KeyError\n", "exit 3"),
        (2, "", "criu-xstate: error: a\nb\n", "not one line"),
        (2, "", "Traceback (most recent call last):\n", "not one line"),
        (0, "name \x1b[2J\n", "", "control character"),
        (2, "", "criu-xstate: error: \x9b31m\n", "control character"),
        (0, "fine\n", "", None),
        (2, "", "criu-xstate: error: one line\n", None),
    ],
)
def test_the_verdict_rejects_what_the_contract_forbids(
    rc: int, out: str, err: str, wrong: str | None
) -> None:
    problem = fuzz.verdict_of(rc, out, err)
    assert (problem is None) if wrong is None else (problem is not None and wrong in problem)


def test_the_guard_reports_leaked_temporary_files_and_memory_bombs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with pytest.raises(fuzz.Hang, match="left temporary files"), fuzz.guard(5, tmp):
        (tmp / "criu-xstate-leak").mkdir()
    assert not list(tmp.iterdir())
    with pytest.raises(MemoryError), fuzz.guard(5, tmp):
        _ = bytearray(fuzz.MEMORY_HEADROOM * 2)


def test_the_structured_generators_reach_the_refusals_they_target(tmp_path: Path) -> None:
    """A control: the hostile archives and profiles really are refused for what they were built to be
    (not all lost to checksum errors), so a fuzz run without findings means something."""
    rng = random.Random(7)
    fixture = fuzz.FIXTURES / "siginfo"
    archive_errors: set[str] = set()
    for _ in range(150):
        path = tmp_path / "a.tar"
        path.write_bytes(fuzz_inputs.hostile_archive(fixture, rng))
        _, _, err = fuzz.run_cli(["show", str(path)])
        archive_errors |= {w for w in ("outside", "link", "sparse", "twice", "limit") if w in err}
    assert archive_errors == {"outside", "link", "sparse", "twice", "limit"}
    profile_errors: set[str] = set()
    seed = (fuzz.PROFILES / "amd-zen4.yaml").read_text()
    for _ in range(150):
        path = tmp_path / "p.yaml"
        path.write_bytes(fuzz_inputs.hostile_profile(seed, rng))
        _, _, err = fuzz.run_cli(["plan", str(fixture), "--dest", str(path)])
        profile_errors |= {w for w in ("aliases", "tag", "twice", "expected", "nested") if w in err}
    assert profile_errors == {"aliases", "tag", "twice", "expected", "nested"}
