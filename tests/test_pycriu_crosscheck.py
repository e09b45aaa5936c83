"""Cross-check the decoder against live pycriu (tests/pycriu_oracle.py), and that the pins the fast suite
uses (tests/fixtures/*/pycriu.json, written by scripts/pin-pycriu) are what pycriu says today."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.pycriu_oracle import DIST, FIXTURES, PINNED, normalized, ours, pycriu_available, pycriu_decode


@pytest.mark.parametrize("images", sorted(p for p in FIXTURES.iterdir() if p.is_dir()), ids=lambda p: p.name)
def test_decoder_matches_pycriu(images: Path) -> None:
    if not pycriu_available():
        pytest.skip(f"pycriu not unpacked at {DIST} (run scripts/get-criu)")
    live = pycriu_decode(images)
    assert ours(images) == normalized(live)
    assert json.loads((images / PINNED).read_text()) == live, "stale pin: run scripts/pin-pycriu"
