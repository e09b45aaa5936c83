"""The README's command list ("## Commands") is what the CLI accepts: the same commands, and for each
one the same options as its ``--help`` (the README is fixed when they drift, not this test)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
OPTION = re.compile(r"(?<![\w-])(--?[a-zA-Z][\w-]*)")


def readme_commands() -> dict[str, set[str]]:
    section = (REPO / "README.md").read_text().split("## Commands", 1)[1]
    block = section.split("```", 2)[1]
    out: dict[str, set[str]] = {}
    for line in block.splitlines():
        if line.startswith("criu-xstate "):
            usage = line.split("#", 1)[0]
            out[usage.split()[1]] = set(OPTION.findall(usage))
    return out


def help_text(*args: str) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "criu_xstate.cli", *args, "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_readme_lists_every_command() -> None:
    listed = re.findall(r"^    ([\w-]+)(?:\s|$)", help_text().split("COMMAND", 2)[2], re.MULTILINE)
    assert sorted(readme_commands()) == sorted(listed)


def help_options(command: str) -> list[set[str]]:
    """Each option of the command's --help, as the set of its spellings (``-o``, ``--output``)."""
    section = help_text(command).split("options:", 1)[1]
    out = []
    for line in section.splitlines():
        if line.startswith("  -"):
            names = set(OPTION.findall(line.strip().split("  ", 1)[0]))
            if names != {"-h", "--help"}:
                out.append(names)
    return out


@pytest.mark.parametrize("command", sorted(readme_commands()))
def test_readme_options_match_help(command: str) -> None:
    listed = readme_commands()[command]
    options = help_options(command)
    assert [sorted(o) for o in options if not o & listed] == [], "in --help, not in the README"
    assert sorted(listed - set().union(*options)) == [], "in the README, not in --help"
