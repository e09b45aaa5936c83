"""The project's own checks: ruff and mypy --strict are part of the suite, so CI enforces them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "cmd", [["ruff", "check", "criu_xstate", "tests"], ["mypy", "criu_xstate"]], ids=["ruff", "mypy"]
)
def test_clean(cmd: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
