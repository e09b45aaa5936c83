"""The premise of PKRU_MISSING_OPENS_KEYS, measured on real kernels with protection keys (QEMU TCG
`-cpu max`): a signal frame whose XSAVE image lacks the PKRU component (its xstate_bv bit clear, with
or without the bit in fpx_sw_bytes.xfeatures) gives the thread PKRU 0 at rt_sigreturn, every key open,
not the kernel's default 0x55555554 (tests/workloads/pkru_sigreturn.c). A frame carrying PKRU gets
exactly its value back. Both sigreturn rules' kernels (Debian 6.1, 6.16) behave the same."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests import qemu_guest
from tests.realcriu import WORKLOADS

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
