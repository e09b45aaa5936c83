"""This machine's Python, trimmed to what ``criu-xstate probe`` imports, for a QEMU guest's initramfs.

The guest has no Python: the interpreter, the shared libraries it and its extension modules load
(run through the host's ``ld.so`` with ``--library-path``, as the CRIU prefix is), the standard-library
files the command imports (found by running it here and listing ``sys.modules``), PyYAML and the
``criu_xstate`` package go under ``/py``. In the guest: ``/py/python -m criu_xstate probe ...``.
"""

from __future__ import annotations

import re
import subprocess
import sys
import sysconfig
from pathlib import Path

from tests.realcriu import REPO

_LIST_MODULES = """
import atexit, runpy, sys
listing, out = sys.argv[1], sys.argv[2]
def _files():
    with open(listing, "w") as f:
        f.write("\\n".join(sorted({getattr(m, "__file__", None) or "" for m in list(sys.modules.values())})))
atexit.register(_files)
sys.argv = ["criu_xstate", "probe", "--name", "x", "-o", out]
runpy.run_module("criu_xstate", run_name="__main__")
"""

LAUNCHER = """#!/bin/sh
exec /py/lib/ld.so --library-path /py/lib /py/bin/python3 -S "$@"
"""


def _imported_files(workdir: Path) -> list[Path]:
    listing = workdir / "modules.txt"
    subprocess.run(
        [sys.executable, "-c", _LIST_MODULES, str(listing), str(workdir / "probe.yaml")],
        check=True,
        capture_output=True,
    )
    return [Path(p) for p in listing.read_text().splitlines() if p]


def _needed_libs(objects: list[Path]) -> set[Path]:
    libs: set[Path] = set()
    for obj in objects:
        out = subprocess.run(["ldd", str(obj)], capture_output=True, text=True).stdout
        libs |= {Path(m) for m in re.findall(r"=> (/\S+)", out)}
        libs |= {Path(m) for m in re.findall(r"^\s+(/\S+ld-linux\S*)", out, re.M)}
    return libs


def guest_python(workdir: Path) -> dict[str, Path]:
    """initramfs entries (guest path -> host file or directory) for ``/py`` and its launcher."""
    workdir.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files: dict[str, Path] = {}
    exts: list[Path] = []
    for path in _imported_files(workdir):
        if path.is_relative_to(stdlib):
            files[f"py/lib/python3.{sys.version_info.minor}/{path.relative_to(stdlib)}"] = path
            if path.suffix == ".so":
                exts.append(path)
        elif "site-packages" in path.parts:
            site = Path(*path.parts[: path.parts.index("site-packages") + 1])
            files[f"py/site/{path.relative_to(site)}"] = path
            if path.suffix == ".so":
                exts.append(path)
    files["py/site/criu_xstate"] = REPO / "criu_xstate"
    python = Path(sys.executable).resolve()
    files["py/bin/python3"] = python
    for lib in _needed_libs([python, *exts]):
        files["py/lib/ld.so" if "ld-linux" in lib.name else f"py/lib/{lib.name}"] = lib.resolve()
    launcher = workdir / "python"
    launcher.write_text(LAUNCHER)
    files["py/python"] = launcher
    return files


PYTHON_ENV = "PYTHONHOME=/py PYTHONPATH=/py/site PYTHONDONTWRITEBYTECODE=1 PYTHONPLATLIBDIR=lib"
