"""Cross-check the decoder against pycriu (Debian trixie's python3-pycriu, unpacked by scripts/get-criu).

pycriu's pb2dict needs the protobuf of its own era, so it runs in a subprocess with an isolated path:
the unpacked dist-packages (pycriu + python3-protobuf 4.21) and the pure-Python protobuf backend."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from criu_xstate.images import open_checkpoint

REPO = Path(__file__).parents[1]
FIXTURES = REPO / "tests" / "fixtures"
DIST = REPO / ".cache" / "criu-4.1.1" / "usr" / "lib" / "python3" / "dist-packages"

SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import pycriu
d = sys.argv[2]
def load(name):
    with open(f"{d}/{name}", "rb") as f:
        return pycriu.images.load(f)["entries"]
out = {"pstree": [], "cores": {}, "mm": {}, "pagemap": {}}
for e in load("pstree.img"):
    out["pstree"].append([e["pid"], e["ppid"], e.get("threads", [])])
    pid = e["pid"]
    (mm,) = load(f"mm-{pid}.img")
    out["mm"][pid] = [[v["start"], v["end"], v["status"]] for v in mm["vmas"]]
    pm = load(f"pagemap-{pid}.img")
    out["pagemap"][pid] = [[p["vaddr"], p.get("nr_pages", 0), p.get("flags", 0)] for p in pm[1:]]
    for tid in e.get("threads", [pid]):
        (core,) = load(f"core-{tid}.img")
        ti = core["thread_info"]
        out["cores"][tid] = [ti["gpregs"]["sp"], ti["gpregs"]["ip"], ti["fpregs"]["xsave"]["xstate_bv"]]
print(json.dumps(out))
"""


def _int(v: object) -> int:
    return int(v, 16) if isinstance(v, str) else int(v)  # type: ignore[call-overload]


@pytest.mark.parametrize("mode", ["siginfo", "threads", "altstack", "nested"])
def test_decoder_matches_pycriu(mode: str) -> None:
    if not (DIST / "pycriu").is_dir():
        pytest.skip(f"pycriu not unpacked at {DIST} (run scripts/get-criu)")
    env = {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", SCRIPT, str(DIST), str(FIXTURES / mode)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    ref = json.loads(r.stdout)
    with open_checkpoint(FIXTURES / mode) as ck:
        ours_pstree = [[int(e.pid), int(e.ppid), [int(t) for t in e.threads]] for e in ck.pstree()]
        assert ours_pstree == ref["pstree"]
        for pid_s, vmas in ref["mm"].items():
            pid = int(pid_s)
            assert [[int(v.start), int(v.end), int(v.status)] for v in ck.mm(pid).vmas] == [
                [_int(a), _int(b), _int(c)] for a, b, c in vmas
            ]
            pm = ck.pagemap(pid)
            assert [
                [int(e.vaddr), int(e.nr_pages or e.compat_nr_pages), int(e.flags)] for e in pm.entries
            ] == [[_int(a), _int(b), _int(c)] for a, b, c in ref["pagemap"][pid_s]]
        for tid_s, (sp, ip, bv) in ref["cores"].items():
            ti = ck.core(int(tid_s)).thread_info
            assert [int(ti.gpregs.sp), int(ti.gpregs.ip), int(ti.fpregs.xsave.xstate_bv)] == [
                _int(sp),
                _int(ip),
                _int(bv),
            ]
