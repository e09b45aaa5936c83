"""Issue 15 on real kernels: a glibc process dumped in a QEMU guest whose CPU has AVX2 (Haswell-noTSX)
and planned for one without it (SandyBridge) is refused by name; restored there anyway, it dies at its
first string function (the control). Started again with the tunables the refusal names, the same
migration is allowed and the restored process runs: its ifuncs chose variants SandyBridge executes.

The workload runs on trixie's glibc 2.41 (the libraries the guest has for CRIU), through a copy of
its loader (a process mapping the very loader CRIU runs under cannot be restored: docs/glibc-state.md).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from criu_xstate import hosts
from criu_xstate.cli import main
from criu_xstate.glibc import save_extent
from criu_xstate.x86.cpuid import parse_dump
from tests import qemu_guest, realcriu
from tests.qemu_guest import SHARED, run_guest
from tests.realcriu import CACHE, WORKLOADS

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SOURCE_CPU = "Haswell-noTSX"  # AVX2, BMI1/2, FMA, MOVBE, LZCNT; XSAVE without XSAVEC
DEST_CPU = "SandyBridge"  # AVX without AVX2 and the rest
LOADER = f"{SHARED}/ld/ld-linux-x86-64.so.2"
EXE = f"{SHARED}/bin/glibc_features"
GUEST_LIBS = "/criu/usr/lib/x86_64-linux-gnu"  # trixie's libraries, in every guest for CRIU


def _files(tmp: Path) -> dict[str, Path]:
    exe = tmp / "glibc_features"
    cmd = ["gcc", "-O2", "-o", str(exe), str(WORKLOADS / "glibc_features.c")]
    cmd += [f"-Wl,--dynamic-linker={LOADER}", f"-Wl,-rpath,{GUEST_LIBS}"]
    subprocess.run(cmd, check=True, capture_output=True)
    files = qemu_guest.guest_files()
    return {
        EXE: exe,
        LOADER: CACHE / "criu-4.1.1" / "usr" / "lib" / "x86_64-linux-gnu" / "ld-linux-x86-64.so.2",
        "bin/probe-dump": files["bin/probe-dump"],
    }


def _root(tmp: Path, files: dict[str, Path]) -> Path:
    """Where the guest's files are for the plan on this machine: its loader at the guest's path."""
    root = tmp / "root"
    (root / LOADER.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(files[LOADER], root / LOADER.lstrip("/"))
    return root


def _dump(files: dict[str, Path], where: Path, tunables: str | None) -> tuple[Path, int]:
    env = f"GLIBC_TUNABLES={tunables} " if tunables else ""
    scenario = f"""
W={SHARED}/wl
mkdir -p $W && chown 1000:1000 $W
echo {qemu_guest.free_pid_window()} > /proc/sys/kernel/ns_last_pid
su -s /bin/sh user -c "{env}setsid {EXE} $W </dev/null >/dev/null 2>&1 &"
for i in $(seq 1 300); do [ -e $W/ready ] && break; sleep 0.1; done
PID=$(pidof glibc_features)
echo "workload pid $PID"
cp $W/truth /out/truth
mkdir -p /out/images
/criu/criu dump -t $PID -D /out/images -o dump.log -v4
echo "dump exit $?"
"""
    g = run_guest(scenario, files, where, cpu=SOURCE_CPU)
    assert "dump exit 0" in g.log, g.log[-2000:]
    pid = int(re.search(r"workload pid (\d+)", g.log).group(1))  # type: ignore[union-attr]
    return g.out / "images", pid


def _plan(images: Path, dest: Path, root: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    capsys.readouterr()
    main(["plan", str(images), "--dest", str(dest), "--root", str(root), "--json"])
    doc: dict[str, Any] = json.loads(capsys.readouterr().out)
    return doc


def test_ifunc_features_are_refused_by_name_and_the_tunables_it_names_make_it_restorable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    reason = qemu_guest.skip_reason()
    if reason:
        pytest.skip(reason)
    files = _files(tmp_path)
    root = _root(tmp_path, files)
    probe = run_guest("/bin/probe-dump > /out/probe.txt\n", files, tmp_path / "probe", cpu=DEST_CPU)
    profile = hosts.profile_from_facts(
        parse_dump((probe.out / "probe.txt").read_text(), "probe.txt"), DEST_CPU
    )
    dest = tmp_path / "sandybridge.yaml"
    dest.write_text(hosts.dump_profile(profile))
    assert "avx2" not in profile.flags

    plain, pid_plain = _dump(files, tmp_path / "src-plain", None)
    refused = _plan(plain, dest, root, capsys)
    (proc,) = refused["processes"]
    assert proc["glibc"]["read"] and "AVX2" in proc["glibc"]["usable"], proc
    reasons = {r["code"]: r for r in proc["reasons"]}
    assert refused["verdict"] == "refuse" and "GLIBC_FEATURE_MISSING_ON_DEST" in reasons, proc
    tunables = re.search(r"GLIBC_TUNABLES=(\S+)", reasons["GLIBC_FEATURE_MISSING_ON_DEST"]["remedy"]).group(1)  # type: ignore[union-attr]
    assert "-AVX2" in tunables.split("=", 1)[1].split(","), tunables

    masked, pid_masked = _dump(files, tmp_path / "src-masked", tunables)
    allowed = _plan(masked, dest, root, capsys)
    (proc,) = allowed["processes"]
    assert allowed["verdict"] != "refuse" and not proc["reasons"], allowed
    assert proc["glibc"]["read"] and "AVX2" not in proc["glibc"]["usable"], proc

    # Both restored on SandyBridge: the refused one is the control, the allowed one must run.
    ends = _restore_in_guest(
        {"plain": (plain, pid_plain), "masked": (masked, pid_masked)}, files, tmp_path / "dest", DEST_CPU
    )
    assert ends["plain"].startswith("died: "), f"the refused process ran on a CPU without AVX2: {ends}"
    assert "invalid opcode" in ends["plain"], ends
    assert ends["masked"] == "ok", ends


LIBDIR = f"{SHARED}/lib"  # the same path in the guest and here: the restored process maps its libraries


def _save_area_files(tmp: Path) -> dict[str, Path]:
    """glibc_features with trixie's loader and libc at LIBDIR: paths that exist alike in every guest
    and on this machine, so a checkpoint taken in one restores in the other."""
    trixie = CACHE / "criu-4.1.1" / "usr" / "lib" / "x86_64-linux-gnu"
    exe = tmp / "glibc_features"
    cmd = ["gcc", "-O2", "-o", str(exe), str(WORKLOADS / "glibc_features.c")]
    cmd += [f"-Wl,--dynamic-linker={LIBDIR}/ld-linux-x86-64.so.2", f"-Wl,-rpath,{LIBDIR}"]
    subprocess.run(cmd, check=True, capture_output=True)
    return {
        EXE: exe,
        f"{LIBDIR}/ld-linux-x86-64.so.2": trixie / "ld-linux-x86-64.so.2",
        f"{LIBDIR}/libc.so.6": trixie / "libc.so.6",
        "bin/probe-dump": qemu_guest.guest_files()["bin/probe-dump"],
    }


def _root_of(tmp: Path, files: dict[str, Path]) -> Path:
    root = tmp / "root"
    for guest_path, src in files.items():
        if guest_path.startswith(SHARED):
            (root / guest_path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, root / guest_path.lstrip("/"))
    return root


def _source_save_area(proc: dict[str, Any]) -> dict[str, Any]:
    glibc = proc["glibc"]
    assert glibc["read"] and glibc["trampoline"] == "xsave", glibc  # Haswell has no XSAVEC
    (area,) = [a for a in glibc["save_areas"] if a["name"] == "xsave_state_size"]
    assert area["size"] == 960, area  # glibc 2.41 without XSAVEC: ALIGN_UP(CPUID 0xD.0 EBX 832 + 88, 64)
    return area  # type: ignore[no-any-return]


def _written_on(profile_path: Path, area: dict[str, Any]) -> int:
    """What the source's trampoline writes on the destination: its register area and an XSAVE of the
    glibc mask, as the destination lays it out (from the destination's probed profile)."""
    profile = hosts.load_profile(profile_path)
    xcr0, comps = profile.xsave.xcr0, {n: (c.offset, c.size) for n, c in profile.xsave.components.items()}
    return 64 + save_extent("xsave", int(area["mask"], 16), xcr0, comps)


def test_the_save_area_glibc_reserved_is_rewritten_for_a_guest_whose_xsave_writes_more(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CRIU issue #3120 on any machine: glibc 2.41 started on `-cpu Haswell-noTSX` (XCR0 0x7, XSAVE
    without XSAVEC: its lazy-binding trampoline reserves 960 bytes) restored in a `-cpu max` guest
    (XCR0 0x21f). glibc's save mask 0xee names MPX's BNDREGS (bit 3), which max enables and lays out at
    960..1024, so the same XSAVE writes 64 + 1024 bytes: 128 past the area. Unmodified, the restored
    process corrupts its caller's stack at its first lazy binding (seen here, from run to run: it
    exits early without a result, or the zeros of MPX's state land on main's buffer and it writes an
    empty result: a silent corruption); after `apply` it runs to its end with the right result."""
    reason = qemu_guest.skip_reason()
    if reason:
        pytest.skip(reason)
    files = _save_area_files(tmp_path)
    probe = run_guest("/bin/probe-dump > /out/probe.txt\n", files, tmp_path / "probe", cpu="max")
    profile = hosts.profile_from_facts(
        parse_dump((probe.out / "probe.txt").read_text(), "probe.txt"), "qemu-max"
    )
    dest = tmp_path / "qemu-max.yaml"
    dest.write_text(hosts.dump_profile(profile))
    assert profile.xsave.xcr0 & 0x8, f"-cpu max enables no BNDREGS here: XCR0 {profile.xsave.xcr0:#x}"

    images, pid = _dump(files, tmp_path / "src", None)
    root = _root_of(tmp_path, files)
    plan = _plan(images, dest, root, capsys)
    (proc,) = plan["processes"]
    area = _source_save_area(proc)
    need = _written_on(dest, area)
    assert need == 64 + 1024 > area["size"], (need, area)
    reasons = {r["code"]: r for r in proc["reasons"]}
    assert "GLIBC_SAVE_AREA_TOO_SMALL" in reasons and plan["verdict"] == "translate", proc
    fixed = tmp_path / "fixed"
    apply = ["apply", str(images), "--dest", str(dest), "--root", str(root), "--out", str(fixed)]
    assert main([*apply, "--self-contained"]) == 0  # it goes into the guest without its parent
    capsys.readouterr()
    after = _plan(fixed, dest, root, capsys)
    (fixed_proc,) = after["processes"]
    (cached,) = [a for a in fixed_proc["glibc"]["save_areas"] if a["name"] == "xsave_state_size"]
    assert after["verdict"] == "compatible" and cached["size"] >= need, (after, cached)

    results = _restore_in_guest(
        {"control": (images, pid), "fixed": (fixed, pid)}, files, tmp_path / "dest", "max"
    )
    print(f"-cpu max writes {need} bytes, the source reserved {area['size']}; restored: {results}")
    assert results["fixed"] == "ok", results
    assert results["control"] != "ok", results


def _restore_in_guest(
    checkpoints: dict[str, tuple[Path, int]], files: dict[str, Path], where: Path, cpu: str
) -> dict[str, str]:
    """Restore each checkpoint in turn in one guest, let it bind its first functions, and say how each
    ended: "ok", or what became of it ("wrong result", "died: " and the kernel's last word on it, or
    "hung")."""
    w = f"{SHARED}/wl"
    steps = f"mkdir -p {w} && chown 1000:1000 {w}\n"
    for name, (_, pid) in checkpoints.items():
        steps += f"""
rm -f {w}/go {w}/result {w}/done
dmesg -c > /dev/null
/criu/criu restore -D /in/{name} -d -o /out/restore-{name}.log -v4
echo "restore {name} exit $?"
touch {w}/go
for i in $(seq 1 200); do [ -e {w}/done ] && break; [ -d /proc/{pid} ] || break; sleep 0.1; done
for i in $(seq 1 50); do [ -d /proc/{pid} ] || break; sleep 0.1; done
[ -d /proc/{pid} ] && {{ echo hung > /out/end-{name}; kill -9 {pid}; sleep 0.5; }}
[ -e {w}/result ] && cp {w}/result /out/result-{name}
dmesg | grep -iE 'segfault|trap|general protection' | tail -1 > /out/kernel-{name}
"""
    inputs = {**files, **{f"in/{name}": d for name, (d, _) in checkpoints.items()}}
    g = run_guest(steps, inputs, where, cpu=cpu)
    ends: dict[str, str] = {}
    for name in checkpoints:
        assert f"restore {name} exit 0" in g.log, g.log[-2000:]
        result, end = g.out / f"result-{name}", g.out / f"end-{name}"
        if result.exists():
            text = result.read_text()
            ends[name] = "ok" if text.startswith("ok ") else f"wrong result {text!r}"
        elif end.exists():
            ends[name] = "hung"
        else:
            ends[name] = "died: " + (g.out / f"kernel-{name}").read_text().strip()
    return ends


def test_the_save_area_glibc_reserved_on_a_smaller_cpu_is_rewritten_for_this_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The same source restored on this machine, whose XSAVE of the glibc mask may write more than 960
    bytes (AVX-512: 64 + 2432) or not (AVX only, and no MPX on AMD): when it does, the unmodified
    process dies at its first lazy binding and the applied one runs; when it does not, the plan asks
    for nothing and both run. The failure itself is proven on any machine by the `-cpu max` test
    above."""
    reason = qemu_guest.skip_reason() or realcriu.skip_reason()
    if reason:
        pytest.skip(reason)
    files = _save_area_files(tmp_path)
    images, pid = _dump(files, tmp_path / "src", None)
    here = tmp_path / "here.yaml"
    assert main(["probe", "-o", str(here), "--name", "this-host"]) == 0
    root = _root_of(tmp_path, files)
    plan = _plan(images, here, root, capsys)
    (proc,) = plan["processes"]
    area = _source_save_area(proc)
    need = _written_on(here, area)
    codes = [r["code"] for r in proc["reasons"]]
    fixed = tmp_path / "fixed"
    assert main(["apply", str(images), "--dest", str(here), "--root", str(root), "--out", str(fixed)]) == 0
    capsys.readouterr()
    results = {name: _restore_here(d, pid, files) for name, d in (("control", images), ("fixed", fixed))}
    print(f"this host writes {need} bytes, the source reserved {area['size']}; restored: {results}")
    if need <= area["size"]:
        assert "GLIBC_SAVE_AREA_TOO_SMALL" not in codes, proc
        assert results == {"control": "ok", "fixed": "ok"}, results
        return
    assert "GLIBC_SAVE_AREA_TOO_SMALL" in codes, proc
    assert results["fixed"] == "ok" and results["control"] != "ok", results


def _restore_here(images: Path, pid: int, files: dict[str, Path]) -> str:
    """Restore a guest's checkpoint on this machine (its files at the guest's paths), let it bind its
    first functions, and say how it ended: "ok", or what became of it."""
    for guest_path, src in files.items():
        if guest_path.startswith(SHARED):
            Path(guest_path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, guest_path)
    work = Path(SHARED) / "wl"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chown(work, 1000, 1000)
    realcriu.criu("restore", "-D", str(images), "-d", log_dir=images, log="restore-here.log")
    (work / "go").touch()
    deadline = time.monotonic() + 20
    while not (work / "done").exists() and Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    if Path(f"/proc/{pid}").exists():
        os.kill(pid, signal.SIGKILL)
        return "hung"
    result = work / "result"
    return result.read_text().split()[0] if result.exists() else "died"
