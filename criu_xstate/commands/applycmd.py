"""`criu-xstate apply` and `criu-xstate undo`: argument handling and output; the write path itself is
:mod:`criu_xstate.applying` (shared with the CRIU hook) and :mod:`criu_xstate.transaction`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from criu_xstate.applying import Options, Outcome, apply_in_place, apply_to_copy
from criu_xstate.commands.common import use_colour
from criu_xstate.commands.planning import load_destinations
from criu_xstate.errors import ApplyError, ExitCode
from criu_xstate.images.checkpoint import is_archive
from criu_xstate.plan import HostFacts, Verdict
from criu_xstate.report import dumps, plan_json, render_plan_text
from criu_xstate.transaction import transaction


def _single_dest(args: argparse.Namespace) -> HostFacts:
    dests = load_destinations(args.dest)
    if len(dests) != 1:
        raise ApplyError(
            f"apply needs exactly one destination profile, got {len(dests)} (use a fleet baseline)"
        )
    return dests[0]


def _summary(outcome: Outcome, target: str) -> dict[str, object]:
    out = plan_json(outcome.plan)
    cs = outcome.changeset
    out["applied"] = {
        "target": target,
        "frames_rewritten": cs.frames_rewritten if cs else 0,
        "frames_relocated": cs.frames_relocated if cs else 0,
        "threads_rewritten": cs.cores_rewritten if cs else 0,
        "glibc_sizes_rewritten": cs.glibc_sizes_rewritten if cs else 0,
        "new_mappings": [
            {"pid": p, "start": hex(s), "end": hex(e)} for p, s, e in (cs.relocation_vmas if cs else [])
        ],
        "files_changed": sorted({c.name for c in cs.changes}) if cs else [],
        "bytes_written": outcome.written,
    }
    return out


def run_apply(args: argparse.Namespace) -> int:
    dest = _single_dest(args)
    src = Path(args.checkpoint)
    opts = Options(
        src=args.src, allow_relocation=not args.no_relocate, strict_isa=args.strict_isa, root=Path(args.root)
    )
    if args.in_place:
        if is_archive(src):
            raise ApplyError(f"{src}: an archive cannot be changed in place; use --out DIR")
        outcome = apply_in_place(src, dest, opts, f"criu-xstate apply for {dest.name}")
        target = src
    else:
        target = Path(args.out)
        outcome = apply_to_copy(src, target, dest, opts, self_contained=args.self_contained)
    if outcome.plan.verdict is Verdict.REFUSE:
        _report(args, outcome, "refused: nothing written")
        return ExitCode.REFUSED
    cs = outcome.changeset
    note = "nothing to change"
    if cs is not None and cs.changes:
        note = (
            f"rewrote {cs.frames_rewritten} frame(s), {cs.cores_rewritten} thread state(s), "
            f"{cs.glibc_sizes_rewritten} glibc save-area size(s)"
        )
    _report(args, outcome, f"{note}; {target} is compatible with {dest.name}")
    return ExitCode.OK


def _report(args: argparse.Namespace, outcome: Outcome, line: str) -> None:
    if args.json:
        sys.stdout.write(dumps(_summary(outcome, args.out or args.checkpoint)))
        return
    sys.stdout.write(render_plan_text(outcome.plan, checkpoint=args.checkpoint, colour=use_colour()))
    print(f"apply: {line}")


def run_undo(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    with transaction(path) as tx:
        if args.forget:
            if not tx.forget():
                raise ApplyError(f"{path}: no criu-xstate journal: nothing to forget")
            print(f"undo: {path}: journal dropped; the images were not changed")
            return ExitCode.OK
        state = tx.state()
        restored = tx.undo()
    what = "interrupted" if state == "pending" else "applied"
    print(f"undo: {path}: {what} change(s) reverted, the original dump is back ({restored} file(s) restored)")
    return ExitCode.OK
