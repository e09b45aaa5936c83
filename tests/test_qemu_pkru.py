"""The premise of PKRU_MISSING_OPENS_KEYS, measured on real kernels with protection keys (QEMU TCG
`-cpu max`): a signal frame whose XSAVE image lacks the PKRU component (its xstate_bv bit clear, with
or without the bit in fpx_sw_bytes.xfeatures) gives the thread PKRU 0 at rt_sigreturn, every key open,
not the kernel's default 0x55555554 (tests/workloads/pkru_sigreturn.c). A frame carrying PKRU gets
exactly its value back. Both sigreturn rules' kernels (Debian 6.1, 6.16) behave the same. CRIU restores
a thread's registers through the same path: a thread dumped on a CPU without protection keys runs on
one with them with PKRU 0 unless `apply` carries the default into core-<tid>.img."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from criu_xstate.cli import main
from tests import qemu_guest
from tests.realcriu import REPO, WORKLOADS, build_workload

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


@pytest.mark.parametrize("kernel", ["6.1", "6.16"])
def test_a_frame_without_pkru_opens_every_key(tmp_path: Path, kernel: str) -> None:
    reason = qemu_guest.skip_reason()
    if reason:
        pytest.skip(reason)
    exe = tmp_path / "pkru_sigreturn"
    src = WORKLOADS / "pkru_sigreturn.c"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(exe), str(src)], check=True, capture_output=True)
    g = qemu_guest.run_guest(
        "/bin/pkru_sigreturn > /out/pkru.txt 2>&1",
        {"bin/pkru_sigreturn": exe},
        tmp_path / "g",
        kernel_version=kernel,
        cpu="max",
    )
    lines = (g.out / "pkru.txt").read_text().splitlines()
    assert lines == [
        "initial 0x55555554",  # the kernel's default for a new task
        "variant 0 after 0x54555554",  # the frame carries PKRU: its value comes back
        "variant 1 after 0x00000000",  # xstate_bv without PKRU: init state, 0
        "variant 2 after 0x00000000",  # ... and without it in the frame's xfeatures too
    ], (lines, g.xstate_line)


NO_PKU_CPU = "max,-pku"  # XCR0 0x1f: XSAVE with MPX but no protection keys
CURRENT = f"{qemu_guest.SHARED}/bin/pkru_current"


def _dump_without_pkeys(tmp_path: Path) -> tuple[Path, int]:
    """A thread in no handler, dumped by CRIU in a guest without protection keys: core-<tid>.img has
    no PKRU at all."""
    w = f"{qemu_guest.SHARED}/wl"
    scenario = f"""
mkdir -p {w} && chown 1000:1000 {w}
echo {qemu_guest.free_pid_window()} > /proc/sys/kernel/ns_last_pid
su -s /bin/sh user -c "setsid {CURRENT} {w} </dev/null >/dev/null 2>&1 &"
for i in $(seq 1 300); do [ -e {w}/ready ] && break; sleep 0.1; done
PID=$(pidof pkru_current)
echo "workload pid $PID"
cp {w}/ready /out/ready
mkdir -p /out/images
/criu/criu dump -t $PID -D /out/images -o dump.log -v4
echo "dump exit $?"
"""
    g = qemu_guest.run_guest(
        scenario, {CURRENT: build_workload("pkru_current")}, tmp_path / "src", cpu=NO_PKU_CPU
    )
    assert "dump exit 0" in g.log, g.log[-2000:]
    assert (g.out / "ready").read_text() == "no-ospke\n", g.xstate_line
    pid = int(g.log.split("workload pid ")[1].split()[0])
    return g.out / "images", pid


def _restore_each(dirs: dict[str, Path], pid: int, tmp_path: Path) -> dict[str, str]:
    """One guest with protection keys (TCG `-cpu max`) restores each checkpoint in turn and reports
    the PKRU the restored thread runs with."""
    w = f"{qemu_guest.SHARED}/wl"
    steps = "".join(
        f"""
rm -f {w}/go {w}/result {w}/done
/criu/criu restore -D /in/{name} -d -o /out/restore-{name}.log -v4
echo "restore {name} exit $?"
touch {w}/go
for i in $(seq 1 200); do [ -e {w}/done ] && break; [ -d /proc/{pid} ] || break; sleep 0.1; done
cp {w}/result /out/result-{name} 2>/dev/null
for i in $(seq 1 50); do [ -d /proc/{pid} ] || break; sleep 0.1; done
"""
        for name in dirs
    )
    scenario = f"mkdir -p {w} && chown 1000:1000 {w}\n{steps}"
    files = {CURRENT: build_workload("pkru_current"), **{f"in/{n}": d for n, d in dirs.items()}}
    g = qemu_guest.run_guest(scenario, files, tmp_path / "dest", cpu="max")
    for name in dirs:
        assert f"restore {name} exit 0" in g.log, g.log[-2000:]
    return {n: (g.out / f"result-{n}").read_text().strip() for n in dirs if (g.out / f"result-{n}").exists()}


def test_a_thread_from_a_host_without_pkeys_gets_the_default_pkru(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """THREAD_PKRU_MISSING_OPENS_KEYS through CRIU itself: restored as dumped, a thread from a source
    without protection keys runs on a host with them with PKRU 0 (every key open); after `apply`,
    core-<tid>.img carries the default and the thread runs with 0x55555554, as a task started there."""
    reason = qemu_guest.skip_reason()
    if reason:
        pytest.skip(reason)
    images, pid = _dump_without_pkeys(tmp_path)
    dest = str(REPO / "contrib" / "hosts" / "qemu-tcg-max.yaml")
    assert main(["plan", str(images), "--dest", dest, "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    codes = [r["code"] for t in plan["threads"] for r in t["reasons"]]
    assert plan["verdict"] == "translate" and codes == ["THREAD_PKRU_MISSING_OPENS_KEYS"], plan
    fixed = tmp_path / "fixed"
    assert main(["apply", str(images), "--dest", dest, "--out", str(fixed), "--self-contained"]) == 0
    capsys.readouterr()
    assert main(["plan", str(fixed), "--dest", dest, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "compatible"
    results = _restore_each({"raw": images, "fixed": fixed}, pid, tmp_path)
    assert results == {"raw": "pkru 0x00000000", "fixed": "pkru 0x55555554"}, results
