"""The CI subset of the cross-CPU matrix (tests/matrix.py, docs/matrix.md): real kernels of both
sigreturn rules on chosen QEMU CPU models as sources and destinations, so every cell runs the same on
any x86-64 machine. Each cell asserts the matrix's pass criterion: the applied copy restores with every
register the oracle holds intact, or the plan refused for the true cause and apply wrote nothing.

The judge itself is tested without QEMU below, so a broken criterion cannot pass silently."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests import matrix, qemu_guest

CI_IDS = [c.id for c in matrix.ci_cells()]

# Cells that fail today for a product bug recorded in docs/matrix.md: expected to fail, and the test
# fails once they pass, so that this list is emptied when criu_xstate is fixed.
KNOWN_BUGS: dict[str, str] = {}  # cell id -> why it is expected to fail (none now)

# Every translate code and every refusal a TCG source/destination pair can reach (COMPONENT_OFFSET_MOVED
# needs AVX-512 or PKRU at AMD's offsets on one side, which only a KVM -cpu host guest has).
CI_CODES = {
    "XSTATE_SIZE_EXCEEDS_DEST",
    "MAGIC2_AT_DEST_USER_SIZE",
    "XSAVE_IMAGE_RELOCATED",
    "COMPONENT_INIT_DROPPED",
    "PKRU_MISSING_OPENS_KEYS",
    "PKRU_DROPPED_DEFAULT",
    "PKRU_IN_USE_DEST_NO_PKEYS",
    "THREAD_PKRU_IN_USE_DEST_NO_PKEYS",
    "COMPONENT_IN_USE_MISSING_ON_DEST",
    "THREAD_COMPONENT_IN_USE_MISSING_ON_DEST",
    "THREAD_PKRU_MISSING_OPENS_KEYS",
    "DEST_WITHOUT_XSAVE",
    "THREAD_XSAVE_DEST_WITHOUT_XSAVE",
}


@pytest.fixture(scope="module")
def ci_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    reason = qemu_guest.skip_reason()
    if reason:
        pytest.skip(reason)
    run = matrix.Run(matrix.ci_cells(), tmp_path_factory.mktemp("matrix"), "ci")
    run.execute()
    return {c["id"]: c for c in run.results}


@pytest.mark.qemu
@pytest.mark.slow
@pytest.mark.parametrize("cell_id", CI_IDS)
def test_cell(ci_run: dict[str, dict[str, Any]], cell_id: str) -> None:
    cell = ci_run[cell_id]
    assert cell.get("source_unchanged", True), "apply --out wrote into the source dump"
    if cell_id in KNOWN_BUGS:
        assert cell["outcome"] == "fail", f"fixed? remove {cell_id} from KNOWN_BUGS: {cell['why']}"
        pytest.xfail(KNOWN_BUGS[cell_id])
    assert cell["outcome"] == "pass", (
        cell["why"],
        cell.get("codes"),
        cell.get("control"),
        cell.get("applied"),
    )
    if cell["verdict"] != "refuse":  # the control shows what apply prevented, or that nothing was needed
        assert cell["control"]["status"] in ("intact", "lost", "killed"), cell["control"]


@pytest.mark.qemu
@pytest.mark.slow
def test_subset_covers_codes_rules_and_variants(ci_run: dict[str, dict[str, Any]]) -> None:
    seen = {code for c in ci_run.values() for code in c.get("codes", {})}
    assert seen >= CI_CODES, sorted(CI_CODES - seen)
    here = matrix.host_profile_brief()
    if here.get("pkru_offset") not in (None, 2688):  # AMD with pkeys: TCG max's PKRU moves for real
        assert "COMPONENT_OFFSET_MOVED" in ci_run["max-to-host-6.1-pkeys"]["codes"], here
    assert {c["kernel"] for c in ci_run.values()} == set(matrix.KERNELS)
    assert {c["variant"] for c in ci_run.values()} == set(matrix.VARIANTS)
    refused = [c for c in ci_run.values() if c.get("verdict") == "refuse"]
    assert refused and all(c["apply_wrote_nothing"] for c in refused)
    # the controls prove the failures apply prevents: a lost frame and a killed process
    assert any(c["control"].get("status") == "lost" for c in ci_run.values() if "control" in c)
    assert any(
        c["control"].get("status") == "killed" and c["outcome"] == "pass"
        for c in ci_run.values()
        if c.get("verdict") == "translate"
    )


# ---- the judge, without QEMU


def _cell(**kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "verdict": "translate",
        "codes": {"XSTATE_SIZE_EXCEEDS_DEST": "translate"},
        "true_causes": [],
        "control": {"status": "lost", "lost": ["frame0@1:ymm3.hi"]},
        "applied": {"status": "intact", "lost": []},
        "apply_wrote_nothing": False,
    }
    return base | kw


def test_judge_passes_an_intact_translation_and_fails_any_loss_after_apply() -> None:
    assert matrix.judge(_cell())[0] == "pass"
    assert matrix.judge(_cell(applied={"status": "lost", "lost": ["frame0@1:mxcsr"]}))[0] == "fail"
    assert matrix.judge(_cell(applied={"status": "killed", "signal": "SIGSEGV"}))[0] == "fail"
    assert matrix.judge(_cell(applied={"status": "restore-failed"}))[0] == "fail"
    assert matrix.judge(_cell(verdict="compatible", applied={"status": "hung"}))[0] == "fail"


def test_judge_wants_a_refusal_for_the_true_cause_and_nothing_written() -> None:
    refusal = {
        "verdict": "refuse",
        "codes": {"PKRU_IN_USE_DEST_NO_PKEYS": "refuse", "PKRU_DROPPED_DEFAULT": "translate"},
        "true_causes": ["PKRU_IN_USE_DEST_NO_PKEYS", "THREAD_PKRU_IN_USE_DEST_NO_PKEYS"],
        "apply_wrote_nothing": True,
    }
    assert matrix.judge(_cell(**refusal))[0] == "pass"
    assert matrix.judge(_cell(**(refusal | {"apply_wrote_nothing": False})))[0] == "fail"
    assert matrix.judge(_cell(**(refusal | {"true_causes": []})))[0] == "fail"  # refused for nothing
    other = {"MXCSR_UNSUPPORTED_BITS": "refuse", "PKRU_IN_USE_DEST_NO_PKEYS": "refuse"}
    assert matrix.judge(_cell(**(refusal | {"codes": other})))[0] == "fail"  # a second, wrong reason
    # a translation where a true cause exists is a silent loss waiting to happen
    assert matrix.judge(_cell(true_causes=["COMPONENT_IN_USE_MISSING_ON_DEST"]))[0] == "fail"


def test_true_causes_follow_what_the_source_held_and_the_destination_lacks() -> None:
    avx_only = {"xsave": {"xcr0": "0x7", "mxcsr_mask": "0xffff"}}
    sse_only = {"xsave": {"xcr0": "0x3", "mxcsr_mask": "0xffff"}}
    pkeys = {"xsave": {"xcr0": "0x207", "mxcsr_mask": "0xffff"}}
    assert matrix.true_causes({"width": 256}, {}, avx_only, "single") == set()
    assert "COMPONENT_IN_USE_MISSING_ON_DEST" in matrix.true_causes({"width": 256}, {}, sse_only, "single")
    assert matrix.true_causes({"width": 128}, {}, sse_only, "single") == set()
    assert "PKRU_IN_USE_DEST_NO_PKEYS" in matrix.true_causes({"width": 256}, {}, avx_only, "pkeys")
    assert matrix.true_causes({"width": 256}, {}, pkeys, "pkeys") == set()
    assert "COMPONENT_IN_USE_MISSING_ON_DEST" in matrix.true_causes({"width": 512}, {}, avx_only, "single")


def test_read_result_tells_intact_lost_and_killed_apart(tmp_path: Path) -> None:
    def run(lines: list[str], done: bool, rc: int = 0) -> dict[str, Any]:
        d = tmp_path / str(len(list(tmp_path.iterdir())))
        d.mkdir()
        (d / "restore-exit").write_text(f"{rc}\n")
        (d / "result").write_text("".join(line + "\n" for line in lines))
        if done:
            (d / "done").touch()
        return matrix.read_result(d)

    ok = '{"tid": 5, "level": 0, "kind": "frame", "ok": true, "lost": []}'
    bad = '{"tid": 5, "level": 0, "kind": "frame", "ok": false, "lost": ["ymm1.hi", "pkru"]}'
    assert run([ok], True)["status"] == "intact"
    r = run([bad], True)
    assert r["status"] == "lost" and r["lost"] == ["frame0@5:pkru", "frame0@5:ymm1.hi"]
    assert run([ok, '{"event": "signal", "signo": 11, "tid": 5}'], False)["signal"] == "SIGSEGV"
    assert run([], False)["status"] == "died"
    assert run([ok], True, rc=1)["status"] == "restore-failed"
    assert run(['{"event": "start"}'], True)["status"] == "no-checks"


def test_known_gap_is_only_the_idle_threads_pkru_from_a_source_without_pkeys() -> None:
    gap = _cell(
        verdict="compatible",
        source_oracle={"pku": False},
        applied={"status": "lost", "lost": ["idle0@7:pkru"], "pkru": ["idle0@7=0x00000000"]},
    )
    assert matrix.known_gap(gap) and matrix.judge(gap)[0] == "fail"
    assert not matrix.known_gap(gap | {"source_oracle": {"pku": True}})
    frame = gap | {"applied": {"status": "lost", "lost": ["frame0@7:pkru"], "pkru": ["frame0@7=0x00000000"]}}
    assert not matrix.known_gap(frame)
    ymm = gap | {"applied": {"status": "lost", "lost": ["idle0@7:pkru", "idle0@7:ymm1.hi"]}}
    assert not matrix.known_gap(ymm)


def test_a_destination_nothing_can_restore_to_is_not_run_not_passed() -> None:
    blocked = _cell(
        verdict="error",
        plan_error="destination profile: criu-xstate: error: fx: no CPUID leaf 0xD",
        control={
            "status": "restore-failed",
            "error": "(0.3) Error (crtools.c:395): x86: FPU xsave area present",
        },
    )
    assert matrix.judge(blocked)[0] == "not-run"
    assert matrix.judge(blocked | {"control": {"status": "intact"}})[0] == "fail"
    assert matrix.judge(_cell(skipped="no KVM"))[0] == "not-run"
