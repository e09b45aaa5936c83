"""Real CRIU dumps and restores on this machine; the workload checks its own registers (the oracle).

The cross-layout proof uses this kernel as the destination: a live frame is rewritten into another
vendor's layout (Ice Lake: MPX hole, 2696 bytes, relocated into a new mapping), which this kernel
must restore FX-only (YMM upper halves lost); `apply` for this host must bring every register back.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from criu_xstate.cli import main
from criu_xstate.images import open_checkpoint
from criu_xstate.model import load_model
from tests.realcriu import (
    REPO,
    Unsupported,
    Workload,
    criu_path,
    lost_upper_halves,
    results_ok,
    skip_reason,
    truth_levels,
)

pytestmark = [pytest.mark.criu, pytest.mark.slow]

HOSTS = REPO / "contrib" / "hosts"
ICX = str(HOSTS / "intel-icelake-sp.yaml")


@pytest.fixture(scope="module")
def here(tmp_path_factory: pytest.TempPathFactory) -> str:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("host") / "here.yaml"
    assert main(["probe", "-o", str(path), "--name", "this-host"]) == 0
    return str(path)


def _start(tmp_path: Path, mode: str, threads: int = 1) -> Workload:
    wl = Workload(tmp_path / "wl", mode=mode, threads=threads, seed=11)
    try:
        return wl.start()
    except Unsupported as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize(
    ("mode", "threads"),
    [
        ("siginfo", 1),
        ("plain", 1),
        ("threads", 3),
        ("nested", 1),
        ("altstack", 1),
        ("stale", 1),
        ("nohandler", 1),
    ],
)
def test_fresh_dump_frames_match_truth_and_restore_intact(
    here: str, tmp_path: Path, mode: str, threads: int
) -> None:
    wl = _start(tmp_path, mode, threads)
    images = tmp_path / "images"
    try:
        wl.dump(images)
        with open_checkpoint(images) as ck:
            model = load_model(ck)
            live = {(f.tid, f.address) for t in model.threads() for f in t.frames.live}
        expected = {(int(t["tid"]), int(t["frame"])) for t in wl.truths()}
        assert live == (set() if mode == "stale" else expected)
        assert main(["plan", str(images), "--dest", here]) == 0
        wl.restore(images)
        wl.release()
        lines = wl.result()
        assert results_ok(lines), lines
        assert len(lines) == max(threads, 1) + (1 if mode == "nested" else 0)
    finally:
        wl.kill()


def test_a_dump_of_many_threads_has_its_cores_read_by_upb_and_planned_as_by_wire(
    here: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real dump above model.COMPILED_CORES_FROM threads, each in its handler: read by upb by default
    (counted), the same thread states, frames and plans as read by wire, and every thread's registers
    intact after the restore."""
    from criu_xstate import model as model_mod
    from criu_xstate.commands.planning import load_destinations, plan_for
    from criu_xstate.images import framing
    from criu_xstate.report import plan_json

    n = model_mod.COMPILED_CORES_FROM + 16
    wl = Workload(tmp_path / "wl", mode="threads", threads=n, seed=11)
    try:
        wl.start(timeout=120)
    except Unsupported as exc:
        pytest.skip(str(exc))
    images = tmp_path / "images"
    compiled: list[Path] = []
    real = framing.read_single_compiled

    def counted(path: Path, *args: Any) -> Any:
        compiled.append(path)
        return real(path, *args)

    try:
        wl.dump(images)
        dests = load_destinations([here, ICX])
        seen = []
        for how in (None, False):
            with monkeypatch.context() as m:
                m.setattr(framing, "read_single_compiled", counted)
                with open_checkpoint(images) as ck:
                    model = load_model(ck, compiled_cores=how)
                    states = [(t.tid, t.state(), t.frames) for t in model.threads()]
                    seen.append((states, [plan_json(plan_for(model, d, None)) for d in dests]))
        assert len(compiled) == n + 1  # the default read every core (the leader's too) with upb
        assert seen[0] == seen[1]
        assert len({tid for tid, _, frames in seen[0][0] if frames.live}) == n
        assert main(["plan", str(images), "--dest", here]) == 0
        wl.restore(images)
        wl.release()
        lines = wl.result(timeout=120)
        assert len(lines) == n and results_ok(lines), lines[:5]
    finally:
        wl.kill()


def test_foreign_layout_frame_is_lost_without_apply_and_intact_with_it(here: str, tmp_path: Path) -> None:
    wl = _start(tmp_path, "nested")
    try:
        d0, d1, d2 = tmp_path / "d0", tmp_path / "icx", tmp_path / "back"
        wl.dump(d0)
        assert main(["apply", str(d0), "--dest", ICX, "--out", str(d1)]) == 0
        wl.restore(d1)  # Ice Lake layout on this host: xstate_size 2696 > user size -> FX-only
        wl.release()
        lost = wl.result()  # the control: the process ran, and reported the upper halves lost, not died
        assert lost_upper_halves(lost, truth_levels(wl.workdir)), lost
        assert main(["plan", str(d1), "--dest", here]) == 0
        assert main(["apply", str(d1), "--dest", here, "--out", str(d2)]) == 0
        wl.restore(d2)
        wl.release()
        assert results_ok(wl.result())
    finally:
        wl.kill()


def test_hook_translates_at_pre_restore(here: str, tmp_path: Path) -> None:
    wl = _start(tmp_path, "threads", 2)
    try:
        d0, d1 = tmp_path / "d0", tmp_path / "icx"
        wl.dump(d0)
        assert main(["apply", str(d0), "--dest", ICX, "--out", str(d1)]) == 0
        script = tmp_path / "hook.sh"
        script.write_text(f"#!/bin/sh\nCRIU_XSTATE_DEST={here} exec {REPO}/.venv/bin/criu-xstate hook\n")
        script.chmod(0o755)
        wl.restore(d1, "--action-script", str(script))
        wl.release()
        assert results_ok(wl.result())
        assert json.loads((d1 / ".criu-xstate-journal.json").read_text())["state"] == "complete"
    finally:
        wl.kill()


def _without_avx(here: str, tmp_path: Path) -> Path:
    """This host's profile with AVX and everything above it removed: a destination that must refuse
    the workload's frame (it holds YMM data) whatever CPU the test runs on."""
    import yaml

    doc = yaml.safe_load(Path(here).read_text())
    xs = doc["xsave"]
    xs["xcr0"] = hex(int(str(xs["xcr0"]), 0) & 0x3)
    xs["user_size"] = xs["max_user_size"] = 576
    xs["components"] = {}
    doc["name"] = "this-host-without-avx"
    doc["flags"] = [f for f in doc.get("flags", []) if "avx" not in f and "fma" not in f]
    path = tmp_path / "no-avx.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_hook_refusal_aborts_the_restore(here: str, tmp_path: Path) -> None:
    wl = _start(tmp_path, "siginfo")
    try:
        d0 = tmp_path / "d0"
        wl.dump(d0)
        before = {p.name: p.read_bytes() for p in d0.iterdir() if p.is_file() and p.suffix == ".img"}
        script = tmp_path / "hook.sh"
        refusing = _without_avx(here, tmp_path)
        script.write_text(f"#!/bin/sh\nCRIU_XSTATE_DEST={refusing} exec {REPO}/.venv/bin/criu-xstate hook\n")
        script.chmod(0o755)
        with pytest.raises(RuntimeError, match="failed"):
            wl.restore(d0, "--action-script", str(script))
        log = (d0 / "restore.log").read_text()
        assert "Aborting restore due to pre-restore script" in log
        assert "COMPONENT_IN_USE_MISSING_ON_DEST" in log  # the reason is in CRIU's log
        after = {p.name: p.read_bytes() for p in d0.iterdir() if p.is_file() and p.suffix == ".img"}
        assert after == before and not (d0 / ".criu-xstate-journal.json").exists()
    finally:
        wl.kill()


@pytest.mark.parametrize(
    "argv",
    [
        ["sleep", "600"],
        ["python3", "-c", "import time\nwhile True: time.sleep(1)"],
        ["bash", "-c", "while :; do sleep 1; done"],
    ],
)
def test_ordinary_programs_have_no_live_frames(tmp_path: Path, argv: list[str]) -> None:
    if skip_reason():
        pytest.skip(str(skip_reason()))
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    images = tmp_path / "images"
    images.mkdir()
    try:
        import time

        time.sleep(0.5)
        r = subprocess.run(
            [str(criu_path()), "dump", "-t", str(proc.pid), "-D", str(images), "-o", "dump.log"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0, (images / "dump.log").read_text()[-2000:]
        proc.wait(timeout=10)
        with open_checkpoint(images) as ck:
            model = load_model(ck)
            assert [f for t in model.threads() for f in t.frames.live] == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_random_dumps_of_a_profiled_program_find_the_kernel_frame(here: str, tmp_path: Path) -> None:
    """SIGPROF fires at the tick rate and its handler runs ~half the time; dump at random moments
    (leaving the program running) until a dump catches the thread inside the handler. The frame found
    must be the kernel's: after a restore from that dump the program keeps computing correctly."""
    import random
    import time

    rng = random.Random(1234)
    wl = Workload(tmp_path / "wl", binary="prof_vector")
    try:
        wl.start()
    except Unsupported as exc:
        pytest.skip(str(exc))
    try:
        caught = None
        for attempt in range(40):
            time.sleep(rng.uniform(0.0, 0.03))
            images = tmp_path / f"try{attempt}"
            wl.dump(images, leave_running=True)
            with open_checkpoint(images) as ck:
                frames = [f for t in load_model(ck).threads() for f in t.frames.live]
            if frames:
                caught = (images, frames)
                break
        assert caught is not None, "no dump caught the handler in 40 tries"
        images, frames = caught
        (frame,) = frames
        assert frame.signo == 27 and frame.kernel_layout and frame.sw is not None  # SIGPROF
        assert frame.sw.xstate_size == hosts_user_size(here)
        wl.kill()
        wl.restore(images)
        time.sleep(0.5)  # the restored handler returns through the frame; main keeps checking its sums
        wl.release()
        (line,) = wl.result()
        assert line.startswith("OK"), line
    finally:
        wl.kill()


def hosts_user_size(profile: str) -> int:
    from criu_xstate import hosts

    return hosts.load_profile(Path(profile)).xsave.user_size


def test_cpuinfo_img_is_a_partial_profile_of_this_host(
    here: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`criu cpuinfo dump` writes what `criu dump --cpu-cap` records; read it with its quirks."""
    from criu_xstate import hosts
    from criu_xstate.images.framing import CPUINFO, CPUINFO_ENTRY, read_single
    from tests.realcriu import criu as run_criu

    run_criu("cpuinfo", "dump", "-D", str(tmp_path), log_dir=tmp_path, log="cpuinfo.log")
    entry = read_single(tmp_path / "cpuinfo.img", CPUINFO, CPUINFO_ENTRY).x86_entry[0]
    partial = hosts.profile_from_cpuinfo_img(entry)
    me = hosts.load_profile(Path(here))
    assert (partial.vendor, partial.family, partial.model) == (me.cpu.vendor, me.cpu.family, me.cpu.model)
    assert partial.xsave_size == me.xsave.max_user_size  # CPUID 0xD.0 EBX, not a frame size
    assert partial.xfeatures | (me.xsave.xcr0 & 0x8) == me.xsave.xcr0  # the recorded mask lacks bit 3
    assert set(partial.flags) <= set(me.flags)
    # The checkpoint's cpuinfo.img is the source for the ISA rule: refuse with --strict-isa on a
    # destination without AVX-512 when this host has it.
    ck = tmp_path / "ck"
    import shutil

    shutil.copytree(REPO / "tests" / "fixtures" / "nohandler", ck)
    shutil.copy2(tmp_path / "cpuinfo.img", ck / "cpuinfo.img")
    zen2 = str(HOSTS / "amd-zen2.yaml")
    rc = main(["plan", str(ck), "--dest", zen2, "--strict-isa", "--json"])
    plan = json.loads(capsys.readouterr().out)
    if "avx512f" in partial.flags:
        assert rc == 1 and any(
            r["code"] == "ISA_FLAGS_MISSING" and "cpuinfo.img" in r["detail"] for r in plan["reasons"]
        )


def test_ia32_task_frame_is_found_kept_on_this_host_and_refused_elsewhere(
    here: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 32-bit process inside its handler: an rt_sigframe_ia32 (fpstate = frame + 276, FSAVE header,
    XSAVE image at fpstate + 112). Same host: kept, and the restored task's ymm0..7 are intact.
    A host that would need the frame changed: refused by name."""
    import struct

    wl = Workload(tmp_path / "wl", binary="ia32_handler")
    try:
        wl.start()
    except (Unsupported, RuntimeError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"cannot build or run a 32-bit workload here: {exc}")
    try:
        frame_addr = struct.unpack("<I", (wl.workdir / "frame.bin").read_bytes())[0]
        images = tmp_path / "images"
        wl.dump(images)
        with open_checkpoint(images) as ck:
            (t,) = list(load_model(ck).threads())
            (f,) = t.frames.live
        assert t.compat and f.abi.value == "ia32-rt" and f.address == frame_addr
        assert f.fpstate == frame_addr + 276 and f.xsave_address == f.fpstate + 112 and f.kernel_layout
        assert f.sw is not None and f.sw.xstate_size == hosts_user_size(here)
        assert main(["plan", str(images), "--dest", here]) == 0
        assert main(["plan", str(images), "--dest", ICX, "--json"]) == 1
        assert "IA32_FRAME_UNSUPPORTED" in capsys.readouterr().out
        wl.restore(images)
        wl.release()
        assert wl.result() == ["OK"]
    finally:
        wl.kill()
