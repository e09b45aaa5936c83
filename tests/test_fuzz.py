"""Fuzzing in the suite: the saved findings replayed, then a fixed time budget of fresh mutations of
the real dumps, profiles and archives (tests/fuzz.py). CRIU_XSTATE_FUZZ_SECONDS raises the budget;
scripts/fuzz runs long campaigns."""

from __future__ import annotations

import os
import random
from pathlib import Path

from tests import fuzz

BUDGET = float(os.environ.get("CRIU_XSTATE_FUZZ_SECONDS", "20"))


def test_every_saved_finding_is_handled(tmp_path: Path) -> None:
    assert fuzz.replay_corpus(tmp_path) == []


def test_fresh_mutations_give_only_our_one_line_errors(tmp_path: Path) -> None:
    seed = int(os.environ.get("CRIU_XSTATE_FUZZ_SEED", random.randrange(1 << 32)))
    stats = fuzz.campaign(tmp_path, BUDGET, seed)
    print(f"fuzz seed {seed}: {fuzz.report(stats, BUDGET)}")
    assert stats.inputs > 50
    assert stats.findings == [], f"seed {seed}: {stats.findings[:5]}"


def test_the_mutator_changes_its_input() -> None:
    rng = random.Random(1)
    data = bytes(range(256)) * 4
    assert sum(fuzz.mutate(data, rng) != data for _ in range(100)) > 90
