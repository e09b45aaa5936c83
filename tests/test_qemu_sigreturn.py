"""The sigreturn self-test inside QEMU guests whose kernels follow each rule (docs/qemu-guests.md):
Debian 6.1 finds magic2 at the frame's xstate_size, trixie-backports 6.16 at the task's user size
(test_qemu.py restores a host frame in both and sees it lost on 6.16 only). ``probe`` (this machine's
Python copied into the guest) and the static ``probe-dump`` + ``probe --from-dump`` must both report
that rule as measured: the release table decides nothing."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from criu_xstate import hosts
from criu_xstate.x86.cpuid import parse_dump
from tests import qemu_guest
from tests.guest_python import PYTHON_ENV, guest_python
from tests.realcriu import REPO

pytestmark = [pytest.mark.qemu, pytest.mark.slow]

SCENARIO = f"""
/bin/probe-dump > /out/probe.txt
echo "probe-dump exit $?"
env {PYTHON_ENV} /py/python -m criu_xstate probe --name guest -o /out/probe.yaml > /out/probe.log 2>&1
echo "probe exit $?"
"""


def _probe_dump(out: Path) -> Path:
    """Built here, not in the shared cache: other worktrees' parsers may not know its sigreturn line."""
    src = REPO / "contrib" / "probe-dump" / "probe-dump.c"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


@pytest.mark.parametrize(
    ("kernel", "rule", "cpu", "size"),
    [
        ("6.1", "frame-size", "max", 832),  # 2696-byte frames: xstate_size 832 = end of AVX
        ("6.16", "user-size", "max", 832),
        ("6.1", "frame-size", "Haswell-noTSX", 576),  # XCR0 0x7, 832-byte frames: 576, AVX past it
        ("6.16", "user-size", "Haswell-noTSX", 576),
    ],
)
def test_probe_measures_the_guest_kernels_rule(
    tmp_path: Path, kernel: str, rule: str, cpu: str, size: int
) -> None:
    reason = qemu_guest.skip_reason()
    if reason:
        pytest.skip(reason)
    files = {**guest_python(tmp_path / "py"), "bin/probe-dump": _probe_dump(tmp_path / "probe-dump")}
    g = qemu_guest.run_guest(SCENARIO, files, tmp_path / "g", kernel_version=kernel, cpu=cpu)
    assert "probe exit 0" in g.log and "probe-dump exit 0" in g.log, g.log + (g.out / "probe.log").read_text()
    probed = hosts.load_profile(g.out / "probe.yaml")
    dumped = hosts.profile_from_facts(parse_dump((g.out / "probe.txt").read_text(), "probe.txt"), "guest")
    for p in (probed, dumped):
        assert p.kernel.release and p.kernel.release.startswith(kernel + ".")
        assert (p.kernel.sigreturn, p.kernel.sigreturn_source) == (rule, "measured"), p.notes
        assert any(f"rewritten to xstate_size {size} " in n for n in p.notes), p.notes
    print(f"{kernel} {cpu}: {g.seconds:.1f} s;", *[n for n in probed.notes if n.startswith("sigreturn")])
