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


def test_plan_and_apply_are_timed_in_one_process(tmp_path: Path) -> None:
    import bench.__main__ as bench_main

    cks = {}
    for gib in (0.01, 0.02):
        cks[gib] = tmp_path / f"ck-{gib}"
        build(cks[gib], 4, gib, criu_shaped=True)
    got = bench_main.in_one_process(cks, 2, tmp_path / "out")
    assert len(got["plan_ms"]) == 2 and all(t > 0 for t in got["apply_ms"])  # type: ignore[arg-type]
    assert not any((tmp_path / "out").iterdir())  # every output was removed


def test_plan_and_the_floor_are_timed_in_one_process_by_thread_count(tmp_path: Path) -> None:
    import bench.__main__ as bench_main

    cks = {n: tmp_path / f"ck-{n}" for n in (1, 4, 16)}
    for n, ck in cks.items():
        build(ck, n, 0.01, criu_shaped=True)
    got = bench_main.threads_in_one_process(cks, 2)
    assert got["threads"] == [4, 16]
    assert all(t > 0 for what in ("plan_s", "floor_s") for t in got[what])  # type: ignore[attr-defined]
    assert isinstance(got["plan_thread_exponent"], float) and len(got["plan_over_floor"]) == 2  # type: ignore[arg-type]
