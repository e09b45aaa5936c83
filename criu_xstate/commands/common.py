"""Shared by the commands: open a checkpoint and its model, and whether output may use colour."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from criu_xstate.errors import ApplyError
from criu_xstate.images import open_checkpoint
from criu_xstate.model import CheckpointModel, load_model
from criu_xstate.transaction import journal_state


def journal_of(path: str) -> str | None:
    """The state of criu-xstate's journal in an images directory ('pending': half-written images)."""
    p = Path(path)
    return journal_state(p) if p.is_dir() else None


INTERRUPTED = "an interrupted criu-xstate apply left its journal: the images may be half-written"


def refuse_if_interrupted(path: str) -> None:
    if journal_of(path) == "pending":
        raise ApplyError(f"{path}: {INTERRUPTED}; run `criu-xstate undo {path}` first")


@contextmanager
def opened_model(path: str) -> Iterator[CheckpointModel]:
    with open_checkpoint(Path(path)) as ck:
        yield load_model(ck)


def use_colour(stream: object | None = None) -> bool:
    isatty = getattr(stream if stream is not None else sys.stdout, "isatty", None)
    return bool(isatty and isatty())
