"""Leave a checkpoint half-written on purpose: the writer stops at its first ``pwrite`` as if killed
(a BaseException, so no rollback runs), leaving a pending journal behind."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from criu_xstate import fsio


class Crash(BaseException):
    """A simulated kill: not an Exception, so the transaction's rollback does not catch it."""


def interrupt_at_first_pwrite(monkeypatch: pytest.MonkeyPatch, write: Callable[[], object]) -> None:
    def crash(point: str, name: str) -> None:
        if point == "pwrite":
            raise Crash

    monkeypatch.setattr(fsio, "fault_hook", crash)
    with pytest.raises(Crash):
        write()
    monkeypatch.setattr(fsio, "fault_hook", None)
