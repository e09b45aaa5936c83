"""pycriu as an independent decoder oracle (Debian trixie's python3-pycriu, unpacked by scripts/get-criu).

pycriu's pb2dict needs the protobuf of its own era, so it runs in a subprocess with an isolated path:
the unpacked dist-packages (pycriu + python3-protobuf 4.21) and the pure-Python protobuf backend.
:func:`pycriu_decode` gives its decoded fields of a checkpoint as pycriu prints them; scripts/pin-pycriu
stores that per fixture (``pycriu.json``) so the fast suite compares against it without pycriu;
:func:`normalized` and :func:`ours` put both sides in one form.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from criu_xstate.images import open_checkpoint

REPO = Path(__file__).parents[1]
FIXTURES = REPO / "tests" / "fixtures"
DIST = REPO / ".cache" / "criu-4.1.1" / "usr" / "lib" / "python3" / "dist-packages"
PINNED = "pycriu.json"

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
print(json.dumps(out, indent=1, sort_keys=True))
"""


def pycriu_available() -> bool:
    return (DIST / "pycriu").is_dir()


def pycriu_decode(images: Path) -> dict[str, Any]:
    """pycriu's decoding of ``images`` (raises if pycriu fails)."""
    env = {"PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION": "python", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-I", "-S", "-c", SCRIPT, str(DIST), str(images)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    if r.returncode != 0:
        raise RuntimeError(f"pycriu failed on {images}: {r.stderr[-2000:]}")
    decoded: dict[str, Any] = json.loads(r.stdout)
    return decoded


def _int(v: object) -> int:
    return int(v, 16) if isinstance(v, str) else int(v)  # type: ignore[call-overload]


def _rows(table: dict[str, list[list[object]]]) -> dict[int, list[list[int]]]:
    return {int(k): [[_int(x) for x in row] for row in v] for k, v in table.items()}


def normalized(ref: dict[str, Any]) -> dict[str, Any]:
    """pycriu's output with every number an int (it prints some fields as hex strings)."""
    return {
        "pstree": [[_int(p), _int(pp), [_int(t) for t in ts]] for p, pp, ts in ref["pstree"]],
        "mm": _rows(ref["mm"]),
        "pagemap": _rows(ref["pagemap"]),
        "cores": {int(t): [_int(x) for x in v] for t, v in ref["cores"].items()},
    }


def _pagemap_entries(path: Path) -> list[Any]:
    from criu_xstate.images import framing

    raw = framing.read_raw(path, framing.PAGEMAP)
    return [framing.decode(p, framing.PAGEMAP_ENTRY, raw.path, i) for i, p in enumerate(raw.payloads) if i]


def ours(images: Path) -> dict[str, Any]:
    """The same fields as criu-xstate's decoder reads them."""
    with open_checkpoint(images) as ck:
        pstree = [[int(e.pid), int(e.ppid), [int(t) for t in e.threads]] for e in ck.pstree()]
        pids = [p for p, _, _ in pstree]
        mm = {p: [[int(v.start), int(v.end), int(v.status)] for v in ck.mm(p).vmas] for p in pids}
        pagemap = {
            p: [
                [int(e.vaddr), int(e.nr_pages or e.compat_nr_pages), int(e.flags)]
                for e in _pagemap_entries(ck.path_of(f"pagemap-{p}.img"))
            ]
            for p in pids
        }
        cores = {}
        for pid, _, threads in pstree:
            for tid in threads or [pid]:
                ti = ck.core(tid).thread_info
                cores[tid] = [int(ti.gpregs.sp), int(ti.gpregs.ip), int(ti.fpregs.xsave.xstate_bv)]
    return {"pstree": pstree, "mm": mm, "pagemap": pagemap, "cores": cores}
