"""Shared by the commands: open a checkpoint and its model, load destination profiles, output."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from criu_xstate.errors import ApplyError
from criu_xstate.frames import SignalFrame
from criu_xstate.images import open_checkpoint
from criu_xstate.model import CheckpointModel, load_model
from criu_xstate.transaction import journal_state
from criu_xstate.x86.xfeatures import component_name


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


def mask_names(mask: int) -> list[str]:
    return [component_name(n) for n in range(64) if mask >> n & 1]


def frame_json(f: SignalFrame) -> dict[str, object]:
    out: dict[str, object] = {
        "frame": hex(f.address),
        "abi": f.abi.value,
        "stack": f.stack.value,
        "liveness": f.liveness.value,
        "live": f.live,
        "depth": f.depth,
        "signo": f.signo,
        "interrupted_ip": hex(f.interrupted_ip),
        "interrupted_sp": hex(f.interrupted_sp),
        "fpstate": hex(f.fpstate) if f.fpstate is not None else None,
        "kernel_layout": f.kernel_layout,
        "end": hex(f.end),
    }
    if f.sw is not None:
        out["sw_bytes"] = {
            "xfeatures": hex(f.sw.xfeatures),
            "xstate_size": f.sw.xstate_size,
            "extended_size": f.sw.extended_size,
        }
        out["xstate_bv"] = hex(f.xstate_bv or 0)
        out["xcomp_bv"] = hex(f.xcomp_bv or 0)
        out["mxcsr"] = hex(f.mxcsr or 0)
    out["checks"] = [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in f.checks]
    return out
