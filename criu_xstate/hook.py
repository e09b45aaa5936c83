"""CRIU action script: at ``pre-restore``, translate the images for this host or abort the restore.

CRIU runs action scripts with ``CRTOOLS_SCRIPT_ACTION`` set; at ``pre-restore`` no task has been
forked and no core, mm or pages image has been read yet, so rewriting them takes effect, and a
non-zero exit aborts the restore (research/criu.md §0.10, §5.1). Every other action is a no-op.

Environment:
  CRTOOLS_SCRIPT_ACTION, CRTOOLS_IMAGE_DIR   set by CRIU
  CRIU_XSTATE_DEST      destination profile (default: probe this machine)
  CRIU_XSTATE_MODE      "apply" (default: translate in place, journaled) or "check" (refuse, never write)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from criu_xstate import hosts
from criu_xstate.changeset import build_changeset
from criu_xstate.commands.planning import facts_from_profile, load_source, plan_for
from criu_xstate.errors import ApplyError
from criu_xstate.images import open_checkpoint
from criu_xstate.model import load_model
from criu_xstate.plan import Severity, Verdict
from criu_xstate.transaction import apply_changes, journal_state


def _say(msg: str) -> None:
    print(f"criu-xstate hook: {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    action = os.environ.get("CRTOOLS_SCRIPT_ACTION")
    if action != "pre-restore":
        return 0
    image_dir = os.environ.get("CRTOOLS_IMAGE_DIR")
    if not image_dir:
        raise ApplyError("CRTOOLS_IMAGE_DIR is not set (not run by CRIU?)")
    images = Path(os.path.realpath(image_dir))
    mode = os.environ.get("CRIU_XSTATE_MODE", "apply")
    if mode not in ("apply", "check"):
        raise ApplyError(f"CRIU_XSTATE_MODE must be apply or check, not {mode!r}")
    if journal_state(images) == "pending":
        raise ApplyError(f"{images}: an interrupted criu-xstate apply left a journal: run `criu-xstate undo`")
    dest_path = os.environ.get("CRIU_XSTATE_DEST")
    profile = hosts.load_profile(Path(dest_path)) if dest_path else hosts.probe_local(socket.gethostname())
    dest = facts_from_profile(profile)
    with open_checkpoint(images) as ck:
        model = load_model(ck)
        plan = plan_for(model, dest, load_source(None, model))
        if plan.verdict is Verdict.REFUSE:
            for f in plan.all_findings():
                if f.severity is Severity.REFUSE:
                    _say(f"{f.code}: {f.subject}: {f.detail}")
            _say(f"refusing the restore on {dest.name}")
            return 1
        if plan.verdict is Verdict.COMPATIBLE:
            return 0
        if mode == "check":
            _say(f"the images need `criu-xstate apply` for {dest.name}; CRIU_XSTATE_MODE=check: refusing")
            return 1
        cs = build_changeset(model, plan, dest)
    apply_changes(images, cs.changes, description=f"criu-xstate hook for {dest.name}")
    _say(f"rewrote {cs.frames_rewritten} signal frame(s) for {dest.name} (undo: criu-xstate undo {images})")
    return 0
