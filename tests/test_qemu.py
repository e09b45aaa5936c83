"""Cross-host proof on real kernels: dump in a QEMU TCG `-cpu max` guest (XSAVE 0x21f: PKRU, MPX,
Intel layout, 2696 bytes), restore on this machine with real CRIU. The workload checks its own YMM
registers after its handler returns: without `apply` the kernel here restores the foreign frame
FX-only (YMM upper halves lost); with `apply` every register is intact. A process using protection
keys in the guest must be refused for a host without them, and `apply` must then change nothing."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from functools import cache
from pathlib import Path

import pytest

from criu_xstate import hosts
from criu_xstate.cli import main
from criu_xstate.x86.cpuid import parse_dump
from tests import qemu_guest
from tests.qemu_guest import SHARED, GuestResult, dump_scenario, guest_files, run_guest
from tests.realcriu import REPO, criu, lost_upper_halves, skip_reason, truth_levels

pytestmark = [pytest.mark.qemu, pytest.mark.slow]
HOSTS = REPO / "contrib" / "hosts"


@pytest.fixture(scope="module")
def here(tmp_path_factory: pytest.TempPathFactory) -> str:
    reason = qemu_guest.skip_reason() or skip_reason()
    if reason:
        pytest.skip(reason)
    path = tmp_path_factory.mktemp("host") / "here.yaml"
    assert main(["probe", "-o", str(path), "--name", "this-host"]) == 0
    return str(path)


@cache
def guest_dump(mode: str, workdir: str, cpu: str = "max") -> GuestResult:
    threads = " 3" if mode == "threads" else ""
    where = Path(workdir) / f"guest-{mode}-{cpu}"
    return run_guest(dump_scenario(mode + threads), guest_files(), where, cpu=cpu)


def _dump(mode: str, tmp_path_factory: pytest.TempPathFactory, cpu: str = "max") -> GuestResult:
    result = guest_dump(mode, str(tmp_path_factory.getbasetemp()), cpu)
    if "dump exit 0" not in result.log:
        if "exit 77" in result.log or not list(result.out.glob("truth-*.json")):
            pytest.skip(f"guest could not run workload mode {mode}: {result.log[-300:]}")
        raise AssertionError(f"guest dump failed:\n{result.log[-2000:]}")
    return result


def _prepare_host_paths() -> None:
    """The restored process reopens its binary and work directory by the guest's paths."""
    wl = Path(SHARED) / "wl"
    shutil.rmtree(wl, ignore_errors=True)
    wl.mkdir(parents=True)
    os.chown(wl, 1000, 1000)
    (Path(SHARED) / "bin").mkdir(parents=True, exist_ok=True)
    shutil.copy2(guest_files()[f"{SHARED}/bin/ymm_handler"], Path(SHARED) / "bin" / "ymm_handler")


def _restore_and_check(images: Path) -> list[str]:
    _prepare_host_paths()
    pids = {int(json.loads(t.read_text())["pid"]) for t in images.parent.glob("truth-*.json")}
    (pid,) = pids
    criu("restore", "-D", str(images), "-d", log_dir=images, log="restore.log")
    os.kill(pid, signal.SIGUSR2)
    done = Path(SHARED) / "wl" / "done"
    deadline = time.monotonic() + 20
    while not done.exists() and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    result = Path(SHARED) / "wl" / "result"
    lines = result.read_text().splitlines() if result.exists() else []
    return lines if done.exists() else [*lines, "DIED"]


def test_guest_profile_matches_the_guest_kernel(here: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    g = _dump("siginfo", tmp_path_factory)
    facts = parse_dump((g.out / "probe.txt").read_text(), "probe.txt")
    profile = hosts.profile_from_facts(facts, "qemu-guest")
    line = g.xstate_line
    assert (
        f"features 0x{profile.xsave.xcr0:x}," in line and f"size is {profile.xsave.user_size} bytes" in line
    )
    assert not [n for n in profile.notes if n.startswith("disagreement")], (
        profile.notes
    )  # AT_MINSIGSTKSZ agrees
    shipped = hosts.load_profile(HOSTS / "qemu-tcg-max.yaml")
    assert profile.xsave.xcr0 == shipped.xsave.xcr0 and profile.xsave.components == shipped.xsave.components
    assert profile.xsave.user_size == shipped.xsave.user_size


@pytest.mark.parametrize("mode", ["siginfo", "threads", "nested", "altstack"])
def test_guest_frames_lost_without_apply_intact_with_it(
    here: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, mode: str
) -> None:
    g = _dump(mode, tmp_path_factory)
    truths = [json.loads(p.read_text()) for p in g.out.glob("truth-*.json")]
    assert {t["xstate_size"] for t in truths} == {2696} and {t["xfeatures"] for t in truths} == {0x21F}
    raw = tmp_path / "raw" / "images"
    shutil.copytree(g.out / "images", raw)
    for t in g.out.glob("truth-*.json"):
        shutil.copy2(t, raw.parent)
    lost = _restore_and_check(raw)  # the control: the process ran, and reported the upper halves lost
    assert lost_upper_halves(lost, truth_levels(raw.parent)), lost

    fixed = tmp_path / "fixed" / "images"
    assert main(["apply", str(g.out / "images"), "--dest", here, "--out", str(fixed)]) == 0
    for t in g.out.glob("truth-*.json"):
        shutil.copy2(t, fixed.parent)
    ok = _restore_and_check(fixed)
    assert ok and all(line.endswith(" OK") for line in ok), ok


def _without_pkeys(here: str, tmp_path: Path) -> str:
    """This host's probed profile as a CPU without protection keys would have it (XCR0 bit 9 clear,
    no PKRU slot, sizes ending at the last remaining component): on any host, pkeys or not."""
    import yaml

    doc = yaml.safe_load(Path(here).read_text())
    xs = doc["xsave"]
    xs["xcr0"] = hex(int(str(xs["xcr0"]), 0) & ~(1 << 9))
    comps = {int(n): c for n, c in xs["components"].items() if int(n) != 9}
    end = max([576, *(c["offset"] + c["size"] for c in comps.values())])
    xs.update(components=comps, user_size=end, max_user_size=end)
    doc["name"] = "this-host-without-pkeys"
    doc["flags"] = [f for f in doc.get("flags", []) if f not in ("pku", "ospke")]
    path = tmp_path / "no-pkeys.yaml"
    path.write_text(yaml.safe_dump(doc))
    return str(path)


def test_pkeys_in_use_is_refused_and_apply_changes_nothing(
    here: str, tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = _without_pkeys(here, tmp_path)
    assert not hosts.load_profile(Path(dest)).xsave.xcr0 >> 9 & 1
    g = _dump("pkeys", tmp_path_factory)
    images = tmp_path / "images"
    shutil.copytree(g.out / "images", images)
    before = {p.name: p.read_bytes() for p in images.iterdir()}
    assert main(["plan", str(images), "--dest", dest, "--json"]) == 1
    plan = json.loads(capsys.readouterr().out)
    codes = {r["code"] for t in plan["threads"] for f in t["frames"] for r in f["reasons"]}
    assert "PKRU_IN_USE_DEST_NO_PKEYS" in codes and plan["verdict"] == "refuse"
    assert main(["apply", str(images), "--dest", dest, "--in-place"]) == 1
    assert {p.name: p.read_bytes() for p in images.iterdir()} == before


AVX_ONLY_CPU = "Haswell-noTSX"  # XCR0 0x7: an 832-byte frame with x87/SSE/AVX only, whatever this host is


@pytest.fixture(scope="module")
def avx_only_dump(here: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """A frame dumped in a QEMU guest whose CPU has AVX and nothing beyond it (832 bytes): the source
    is chosen, not this machine, so the proof holds on every host."""
    g = _dump("siginfo", tmp_path_factory, cpu=AVX_ONLY_CPU)
    (truth,) = [json.loads(p.read_text()) for p in g.out.glob("truth-*.json")]
    assert truth["xstate_size"] == 832 and truth["xstate_bv"] & ~0x7 == 0, truth
    return g.out / "images", int(truth["pid"])


@pytest.mark.parametrize(
    ("kernel", "rule", "raw_expected"), [("6.16", "user-size", "CORRUPT"), ("6.1", "frame-size", "OK")]
)
def test_sigreturn_rule_of_the_destination_kernel(
    avx_only_dump: tuple[Path, int], tmp_path: Path, kernel: str, rule: str, raw_expected: str
) -> None:
    """Debian 6.16 (trixie-backports) looks for magic2 at its own user size (2696 in a `-cpu max`
    guest): an 832-byte frame (dumped in an AVX-only guest) is restored FX-only there, not on 6.1.
    `apply` for a user-size destination relocates the image to exactly 2696 bytes, which both kernels
    accept."""
    import yaml

    images, pid = avx_only_dump
    profile = yaml.safe_load((HOSTS / "qemu-tcg-max.yaml").read_text())
    profile.update(name=f"tcg-max-{kernel}", kernel={"release": kernel, "sigreturn": rule})
    dest = tmp_path / "dest.yaml"
    dest.write_text(yaml.safe_dump(profile))
    fixed = tmp_path / "fixed"
    assert main(["apply", str(images), "--dest", str(dest), "--out", str(fixed), "--self-contained"]) == 0
    files = {
        f"{SHARED}/bin/ymm_handler": guest_files()[f"{SHARED}/bin/ymm_handler"],
        "bin/probe-dump": guest_files()["bin/probe-dump"],
    }
    for name, src, expected in (("raw", images, raw_expected), ("fixed", fixed, "OK")):
        g = run_guest(
            qemu_guest.restore_scenario(pid),
            {**files, "in/images": src},
            tmp_path / f"g-{name}",
            kernel_version=kernel,
        )
        assert "restore exit 0" in g.log, g.log[-2000:]
        result = (g.out / "result").read_text() if (g.out / "result").exists() else ""
        assert result.split()[2:3] == [expected], (name, result, g.log[-500:])


@pytest.mark.parametrize("cpu", ["max", "Haswell-noTSX"])
def test_probe_dump_profile_of_a_guest_matches_its_kernel(here: str, tmp_path: Path, cpu: str) -> None:
    """probe --from-dump on what the static probe-dump printed in the guest agrees with the guest
    kernel's own boot lines: enabled features, context size (standard format) and max sigframe size."""
    g = run_guest("/bin/probe-dump > /out/probe.txt\n", guest_files(), tmp_path / "g", cpu=cpu)
    profile = hosts.profile_from_facts(parse_dump((g.out / "probe.txt").read_text(), "probe.txt"), cpu)
    assert (
        f"features 0x{profile.xsave.xcr0:x}, context size is {profile.xsave.user_size} bytes" in g.xstate_line
    )
    m = [line for line in g.dmesg.splitlines() if "max sigframe size" in line]
    facts = parse_dump((g.out / "probe.txt").read_text(), "probe.txt")
    assert m and m[0].endswith(f"max sigframe size: {facts.minsigstksz}")
    assert not [n for n in profile.notes if n.startswith("disagreement")], profile.notes


def test_a_cpu_without_xsave_gets_an_fxsave_profile_and_xsave_images_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """QEMU `-cpu Nehalem` has no XSAVE (no CPUID leaf 0xD): its profile is the 512-byte FXSAVE area,
    and a checkpoint whose threads carry XSAVE images is refused for it (CRIU itself refuses to restore
    them there: "image has xsave, host has no OSXSAVE")."""
    reason = qemu_guest.skip_reason()
    if reason:
        pytest.skip(reason)
    g = run_guest("/bin/probe-dump > /out/probe.txt\n", guest_files(), tmp_path / "g", cpu="Nehalem")
    profile = hosts.profile_from_facts(parse_dump((g.out / "probe.txt").read_text(), "probe.txt"), "nehalem")
    assert (profile.xsave.xcr0, profile.xsave.user_size, dict(profile.xsave.components)) == (0x3, 512, {})
    dest = tmp_path / "nehalem.yaml"
    dest.write_text(hosts.dump_profile(profile))
    assert main(["plan", str(REPO / "tests" / "fixtures" / "plain"), "--dest", str(dest), "--json"]) == 1
    plan = json.loads(capsys.readouterr().out)
    codes = {r["code"] for t in plan["threads"] for r in t["reasons"]}
    assert "THREAD_XSAVE_DEST_WITHOUT_XSAVE" in codes, plan
