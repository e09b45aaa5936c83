"""The committed generated modules (pb2 and schema.py) must be exactly what scripts/gen-protos makes from
protos/."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]


def test_generated_modules_match_protos(tmp_path: Path) -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpcio-tools not installed (pip install -e '.[test]')")
    env_py = {"PYTHON": sys.executable}
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen-protos"), str(tmp_path)],
        check=True,
        env={**env_py, "PATH": "/usr/bin:/bin"},
        capture_output=True,
    )
    committed = REPO / "criu_xstate" / "images" / "pb"
    made = {p.name: p.read_text() for p in [*tmp_path.glob("*_pb2.py"), tmp_path / "schema.py"]}
    have = {p.name: p.read_text() for p in [*committed.glob("*_pb2.py"), committed / "schema.py"]}
    assert made.keys() == have.keys(), "a .proto was added or removed: run scripts/gen-protos"
    stale = sorted(name for name in made if made[name] != have[name])
    assert not stale, f"generated modules drifted from protos/: {stale}; run scripts/gen-protos"
    assert len(made) == len(list((REPO / "protos").glob("*.proto"))) + 1
