"""Shared by the commands: open a checkpoint and its model, and whether output may use colour."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from criu_xstate.images import open_checkpoint
from criu_xstate.model import CheckpointModel, load_model
from criu_xstate.transaction import INTERRUPTED, journal_state, refuse_if_interrupted


def journal_of(path: str) -> str | None:
    """The state of criu-xstate's journal in an images directory ('pending': half-written images)."""
    p = Path(path)
    return journal_state(p) if p.is_dir() else None


__all__ = ["INTERRUPTED", "journal_of", "opened_model", "refuse_if_interrupted", "use_colour"]


@contextmanager
def opened_model(path: str) -> Iterator[CheckpointModel]:
    with open_checkpoint(Path(path)) as ck:
        yield load_model(ck)


def use_colour(stream: object | None = None) -> bool:
    isatty = getattr(stream if stream is not None else sys.stdout, "isatty", None)
    return bool(isatty and isatty())
