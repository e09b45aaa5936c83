"""An incremental checkpoint (criu pre-dump --track-mem, then dump --prev-images-dir) on a real kernel
that tracks memory: a QEMU `-cpu max` guest running Debian's 6.1 (this machine kind's kernel has no
soft-dirty tracking, so the chain cannot be made here). The final images hold only the pages dirtied
after the pre-dump; the frame is read through the parent chain, translated for this machine with
`apply --out` (a third link in the chain), and CRIU restores it here: every YMM register intact (the
chain restored as dumped: the upper halves lost).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from criu_xstate.cli import main
from criu_xstate.images.checkpoint import open_checkpoint
from criu_xstate.model import load_model
from tests.matrix import tree_digest
from tests.qemu_guest import SHARED, free_pid_window, guest_files, run_guest
from tests.realcriu import lost_upper_halves, truth_levels
from tests.test_qemu import _restore_and_check, here  # noqa: F401  (the fixture)

pytestmark = [pytest.mark.qemu, pytest.mark.slow]


def _scenario() -> str:
    return f"""
W={SHARED}/wl
mkdir -p $W && chown 1000:1000 $W
echo {free_pid_window()} > /proc/sys/kernel/ns_last_pid
su -s /bin/sh user -c "setsid {SHARED}/bin/ymm_handler $W 11 siginfo </dev/null >/dev/null 2>&1 &"
for i in $(seq 1 300); do [ -e $W/ready ] && break; sleep 0.1; done
sleep 0.2
PID=$(pidof ymm_handler)
mkdir -p /out/chain/pre /out/chain/dump
/criu/criu pre-dump -t $PID -D /out/chain/pre --track-mem -o pre.log -v4
echo "pre-dump exit $?"
/criu/criu dump -t $PID -D /out/chain/dump --prev-images-dir ../pre --track-mem -o dump.log -v4
echo "dump exit $?"
cp $W/truth-*.json /out/chain/ 2>/dev/null
"""


def test_incremental_dump_frames_are_read_through_the_parent(here: str, tmp_path: Path) -> None:  # noqa: F811
    g = run_guest(_scenario(), guest_files(), tmp_path / "guest", cpu="max")
    assert "pre-dump exit 0" in g.log and "dump exit 0" in g.log, g.log[-2000:]
    chain = tmp_path / "chain"
    shutil.copytree(g.out / "chain", chain, symlinks=True)
    final = chain / "dump"
    assert (final / "parent").is_symlink()
    (truth,) = [json.loads(p.read_text()) for p in chain.glob("truth-*.json")]
    with open_checkpoint(final) as ck:
        assert ck.parent is not None
        pages_here = sum(p.stat().st_size for p in final.glob("pages-*.img"))
        pages_parent = sum(p.stat().st_size for p in (chain / "pre").glob("pages-*.img"))
        live = [(f.tid, f.address) for t in load_model(ck).threads() for f in t.frames.live]
    assert live == [(truth["tid"], truth["frame"])]
    assert pages_here < pages_parent, (pages_here, pages_parent)  # the final dump holds the dirty pages only

    # The frame's page is the parent's (the handler's stack was not touched after the pre-dump): it
    # cannot be rewritten in place (the parent may be the base of other checkpoints) nor flattened.
    before = tree_digest(chain)
    assert main(["apply", str(final), "--dest", here, "--in-place"]) == 2
    assert (
        main(["apply", str(final), "--dest", here, "--out", str(tmp_path / "flat"), "--self-contained"]) == 2
    )
    assert tree_digest(chain) == before and not (tmp_path / "flat").exists()

    fixed = chain / "fixed"
    assert main(["apply", str(final), "--dest", here, "--out", str(fixed)]) == 0
    assert (fixed / "parent").is_symlink()  # fixed -> dump -> pre
    ok = _restore_and_check(fixed)
    assert ok and all(line.endswith(" OK") for line in ok), ok
    lost = _restore_and_check(final)  # the control: the same chain restored as dumped
    assert lost_upper_halves(lost, truth_levels(chain)), lost
