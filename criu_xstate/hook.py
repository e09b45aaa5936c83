"""CRIU action script: at ``pre-restore``, translate the images for this host or abort the restore.

CRIU runs action scripts with ``CRTOOLS_SCRIPT_ACTION`` set; at ``pre-restore`` no task has been
forked and no core, mm or pages image has been read yet, so rewriting them takes effect, and a
non-zero exit aborts the restore (research/criu.md §0.10, §5.1). Every other action returns before
anything heavy is imported. The write itself is :func:`criu_xstate.applying.apply_in_place`, the same
code path as ``apply --in-place`` (plan under the lock, journal, read back, re-plan).

Environment:
  CRTOOLS_SCRIPT_ACTION, CRTOOLS_IMAGE_DIR   set by CRIU
  CRIU_XSTATE_DEST      destination profile (default: probe this machine)
  CRIU_XSTATE_MODE      "apply" (default: translate in place, journaled) or "check" (refuse, never write)

Files left in the images directory: the journal, only after a translation (docs/journal.md).
"""

from __future__ import annotations

import argparse
import os
import sys

from criu_xstate.errors import ApplyError, ExitCode


def _say(msg: str) -> None:
    print(f"criu-xstate hook: {msg}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    if os.environ.get("CRTOOLS_SCRIPT_ACTION") != "pre-restore":
        return ExitCode.OK
    image_dir = os.environ.get("CRTOOLS_IMAGE_DIR")
    if not image_dir:
        raise ApplyError("CRTOOLS_IMAGE_DIR is not set (not run by CRIU?)")
    mode = os.environ.get("CRIU_XSTATE_MODE", "apply")
    if mode not in ("apply", "check"):
        raise ApplyError(f"CRIU_XSTATE_MODE must be apply or check, not {mode!r}")
    return _pre_restore(os.path.realpath(image_dir), os.environ.get("CRIU_XSTATE_DEST"), mode)


def _pre_restore(image_dir: str, dest_path: str | None, mode: str) -> int:
    import socket
    from pathlib import Path

    from criu_xstate import hosts
    from criu_xstate.applying import Options, apply_in_place
    from criu_xstate.commands.planning import Destination, facts_from_profile
    from criu_xstate.plan import Severity, Verdict

    profile = hosts.load_profile(Path(dest_path)) if dest_path else hosts.probe_local(socket.gethostname())
    dest = Destination(profile.name, facts_from_profile(profile))
    images = Path(image_dir)
    outcome = apply_in_place(
        images, dest, Options(), f"criu-xstate hook for {dest.name}", write=mode == "apply"
    )
    plan = outcome.plan
    if plan.verdict is Verdict.REFUSE:
        for f in plan.all_findings():
            if f.severity is Severity.REFUSE:
                _say(f"{f.code}: {f.subject}: {f.detail}")
        _say(f"refusing the restore on {dest.name}")
        return ExitCode.REFUSED
    if plan.verdict is Verdict.COMPATIBLE:
        return ExitCode.OK
    if not outcome.changed:
        _say(f"the images need `criu-xstate apply` for {dest.name}; CRIU_XSTATE_MODE=check: refusing")
        return ExitCode.REFUSED
    assert outcome.changeset is not None
    _say(
        f"rewrote {outcome.changeset.frames_rewritten} signal frame(s) for {dest.name} "
        f"(undo: criu-xstate undo {images})"
    )
    return ExitCode.OK
