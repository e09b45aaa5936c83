"""The committed real-CRIU fixtures (tests/fixtures/*, made by scripts/make-fixtures): decoding, frames
against each workload's ground truth, byte-identical round trips, plans against shipped profiles.
No root and no CRIU needed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from criu_xstate.cli import main
from criu_xstate.frames import Liveness
from criu_xstate.images import open_checkpoint
from criu_xstate.images.framing import MESSAGE_KINDS, kind_of
from criu_xstate.images.rewrite import PB_TYPES, read_pagemap, read_pb_messages
from criu_xstate.model import load_model

FIXTURES = Path(__file__).parent / "fixtures"
MODES = sorted(p.name for p in FIXTURES.iterdir() if (p / "truth.json").exists())
HOSTS = Path(__file__).parents[1] / "contrib" / "hosts"
HERE = HOSTS / "amd-epyc-zen4-vm-nopku.yaml"  # the machine the fixtures were dumped on


def truth(mode: str) -> list[dict[str, object]]:
    return list(json.loads((FIXTURES / mode / "truth.json").read_text()))


def test_fixtures_exist() -> None:
    assert {"siginfo", "plain", "threads", "nested", "altstack", "stale", "nohandler"} <= set(MODES)


@pytest.mark.parametrize("mode", MODES)
def test_frames_match_ground_truth(mode: str) -> None:
    with open_checkpoint(FIXTURES / mode) as ck:
        model = load_model(ck)
        found: dict[tuple[int, int], tuple[int, int | None, int, int, int]] = {}
        stale: list[int] = []
        for t in model.threads():
            for f in t.frames.frames:
                if f.liveness is Liveness.LIVE:
                    assert f.depth is not None and f.sw is not None
                    found[(t.tid, f.depth)] = (
                        f.address,
                        f.fpstate,
                        f.sw.xstate_size,
                        f.sw.xfeatures,
                        f.signo or 0,
                    )
                elif f.liveness is Liveness.STALE:
                    stale.append(f.address)
    expected: dict[tuple[int, int], tuple[int, int | None, int, int, int]] = {}
    truths = truth(mode)
    for tr in truths:
        tid = int(tr["tid"])  # type: ignore[call-overload]
        levels = sum(1 for x in truths if x["tid"] == tid)
        depth = levels - 1 - int(tr["depth"])  # truth counts from the outermost, frames from the innermost
        expected[(tid, depth)] = (
            int(tr["frame"]),
            int(tr["fpstate"]),
            int(tr["xstate_size"]),  # type: ignore[call-overload]
            int(tr["xfeatures"]),
            int(tr["signo"]),
        )  # type: ignore[call-overload]
    if mode == "stale":
        assert found == {}
        assert stale == [int(truths[0]["frame"])]  # type: ignore[call-overload]
    else:
        assert found == expected
        assert not stale


@pytest.mark.parametrize("mode", MODES)
def test_every_image_round_trips_byte_identically(mode: str) -> None:
    checked = 0
    for path in sorted((FIXTURES / mode).glob("*.img")):
        kind = kind_of(path.name)
        if kind is None:
            continue
        data = path.read_bytes()
        if kind == "pagemap":
            assert read_pagemap(path).encode() == data, path.name
        else:
            img_kind, name = MESSAGE_KINDS[kind]
            assert read_pb_messages(path, img_kind, PB_TYPES[name]).encode() == data, path.name
        checked += 1
    assert checked >= 5


def test_altstack_thread_is_on_its_altstack() -> None:
    with open_checkpoint(FIXTURES / "altstack") as ck:
        (t,) = list(load_model(ck).threads())
        assert t.altstack is not None and t.on_altstack
        assert t.frames.live[0].stack.value == "sigaltstack"


def test_show_json_and_text(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["show", str(FIXTURES / "threads"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["schema"] == "criu-xstate/show/v1"
    (proc,) = data["processes"]
    assert len(proc["threads"]) == 4
    assert sum(1 for t in proc["threads"] for f in t["frames"] if f["live"]) == 3
    assert main(["show", str(FIXTURES / "nested")]) == 0
    out = capsys.readouterr().out
    assert "live frame #0" in out and "live frame #1" in out


def test_plan_same_machine_is_compatible(capsys: pytest.CaptureFixture[str]) -> None:
    for mode in MODES:
        assert main(["plan", str(FIXTURES / mode), "--dest", str(HERE), "--json"]) == 0, mode
        assert json.loads(capsys.readouterr().out)["verdict"] == "compatible"


@pytest.mark.parametrize(
    ("host", "verdict", "codes"),
    [
        (
            "amd-zen2",
            "refuse",
            {"COMPONENT_IN_USE_MISSING_ON_DEST", "THREAD_COMPONENT_IN_USE_MISSING_ON_DEST"},
        ),
        ("amd-zen4", "translate", {"PKRU_MISSING_OPENS_KEYS"}),
        (
            "intel-icelake-sp",
            "translate",
            {"COMPONENT_OFFSET_MOVED", "PKRU_MISSING_OPENS_KEYS", "XSAVE_IMAGE_RELOCATED"},
        ),
    ],
)
def test_plan_against_other_hosts(
    host: str, verdict: str, codes: set[str], capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["plan", str(FIXTURES / "siginfo"), "--dest", str(HOSTS / f"{host}.yaml"), "--json"])
    plan = json.loads(capsys.readouterr().out)
    assert plan["verdict"] == verdict and rc == (1 if verdict == "refuse" else 0)
    found = {r["code"] for t in plan["threads"] for f in t["frames"] for r in f["reasons"]}
    found |= {r["code"] for t in plan["threads"] for r in t["reasons"]}
    assert codes <= found


# The siginfo fixture (AVX-512 and PKRU in use, dumped on amd-epyc-zen4-vm-nopku) against every
# shipped profile: each verdict tied to its host.
SIGINFO_VERDICTS = {
    "amd-zen2": "refuse",
    "amd-zen3": "refuse",
    "amd-zen4": "translate",
    "amd-zen5": "translate",
    "intel-apx-diamond-rapids": "translate",
    "intel-granite-rapids": "translate",
    "intel-icelake-sp": "translate",
    "intel-sapphire-rapids": "translate",
    "intel-skylake-sp": "translate",
    "qemu-tcg-max": "refuse",
    "amd-epyc-zen4-vm-nopku": "compatible",
}


def test_plan_many_destinations(capsys: pytest.CaptureFixture[str]) -> None:
    assert sorted(SIGINFO_VERDICTS) == sorted(p.stem for p in HOSTS.glob("*.yaml"))
    assert main(["plan", str(FIXTURES / "siginfo"), "--dest", str(HOSTS), "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)["plans"]
    assert {p["dest"]["name"]: p["verdict"] for p in plans} == SIGINFO_VERDICTS
    assert main(["plan", str(FIXTURES / "siginfo"), "--dest", str(HOSTS)]) == 0
    rows = [line.split()[:2] for line in capsys.readouterr().out.splitlines()[1:]]
    assert dict((name, verdict) for name, verdict in rows) == SIGINFO_VERDICTS


def test_apply_out_then_plan_is_compatible(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "nested", src)
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    out = tmp_path / "out"
    icx = str(HOSTS / "intel-icelake-sp.yaml")
    assert main(["apply", str(src), "--dest", icx, "--out", str(out), "--json"]) == 0
    applied = json.loads(capsys.readouterr().out)["applied"]
    assert applied["frames_rewritten"] == 2 and applied["frames_relocated"] == 2
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # the source is untouched
    assert main(["plan", str(out), "--dest", icx, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "compatible"
    # An incremental image over the source: unchanged images are hard links, only changed pages are
    # written (the frames' pages and the relocated images), everything else is read through `parent`.
    assert (out / "pstree.img").stat().st_ino == (src / "pstree.img").stat().st_ino
    # The dump's source had no protection keys, Ice Lake has them: core-<tid>.img gets the default PKRU
    # (THREAD_PKRU_MISSING_OPENS_KEYS; the "compatible" re-plan above says it is there now).
    assert (out / "core-6782.img").read_bytes() != (src / "core-6782.img").read_bytes()
    assert (out / "parent").is_symlink() and (out / "parent").resolve() == src.resolve()
    assert 0 < (out / "pages-1.img").stat().st_size <= 8 * 4096 < (src / "pages-1.img").stat().st_size


def test_apply_in_place_twice_and_undo(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURES / "threads", ck)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    zen4 = str(HOSTS / "amd-zen4.yaml")
    assert main(["apply", str(ck), "--dest", zen4, "--in-place"]) == 0
    changed = {p.name for p in ck.iterdir() if p.name in before and p.read_bytes() != before[p.name]}
    cores = {p.name for p in ck.glob("core-*.img")}
    assert changed == {"pages-1.img", *cores}  # PKRU carried into the frames and into each thread
    after = {p.name: p.read_bytes() for p in ck.iterdir()}
    assert main(["apply", str(ck), "--dest", zen4, "--in-place"]) == 0  # a no-op
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == after
    assert main(["undo", str(ck)]) == 0
    assert {p.name: p.read_bytes() for p in ck.iterdir() if not p.name.startswith(".")} == before
    capsys.readouterr()


def test_refused_apply_writes_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURES / "siginfo", ck)
    before = {p.name: p.read_bytes() for p in ck.iterdir()}
    assert main(["apply", str(ck), "--dest", str(HOSTS / "amd-zen2.yaml"), "--in-place"]) == 1
    assert {p.name: p.read_bytes() for p in ck.iterdir()} == before
    capsys.readouterr()


def test_apply_out_self_contained(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    icx = str(HOSTS / "intel-icelake-sp.yaml")
    assert (
        main(["apply", str(FIXTURES / "altstack"), "--dest", icx, "--out", str(out), "--self-contained"]) == 0
    )
    assert not (out / "parent").exists()
    assert (out / "pages-1.img").stat().st_size > (FIXTURES / "altstack" / "pages-1.img").stat().st_size
    capsys.readouterr()
    assert main(["plan", str(out), "--dest", icx, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "compatible"
