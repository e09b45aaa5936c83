"""The benchmark's own pieces run on real dumps (the benchmark itself runs outside the suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.floor import floor
from bench.synth import build
from criu_xstate.cli import main

FIXTURES = Path(__file__).parent / "fixtures"
DEST = str(Path(__file__).parents[1] / "criu_xstate" / "data" / "hosts" / "intel-icelake-sp.yaml")


@pytest.mark.parametrize("mode", ["threads", "altstack"])
def test_the_floor_reads_the_stack_bytes_of_every_thread(mode: str) -> None:
    assert floor(FIXTURES / mode) >= 4096


def test_a_synthetic_checkpoint_plans_and_floors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    build(tmp_path / "ck", 8, 0.01, criu_shaped=True)
    assert floor(tmp_path / "ck") > 8 * 4096
    assert main(["plan", str(tmp_path / "ck"), "--dest", DEST, "--json"]) in (0, 1)
    assert '"threads"' in capsys.readouterr().out
