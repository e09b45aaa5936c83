"""The decoder against pycriu's pinned decoding of every committed fixture (scripts/pin-pycriu), on every
run: an independent oracle without pycriu installed. The live comparison is test_pycriu_crosscheck.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pycriu_oracle import FIXTURES, PINNED, normalized, ours

FIXTURE_DIRS = sorted(p for p in FIXTURES.iterdir() if p.is_dir())


def test_every_fixture_is_pinned() -> None:
    assert FIXTURE_DIRS and [p.name for p in FIXTURE_DIRS if not (p / PINNED).exists()] == []


@pytest.mark.parametrize("images", FIXTURE_DIRS, ids=lambda p: p.name)
def test_decoder_matches_pinned_pycriu(images: Path) -> None:
    pinned = normalized(json.loads((images / PINNED).read_text()))
    assert pinned["cores"], "a pin without threads proves nothing"
    assert ours(images) == pinned
