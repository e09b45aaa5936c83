"""`criu-xstate apply` and `criu-xstate undo`.

apply = plan, refuse or compute the change set, write it (``--out DIR``: a translated copy whose
unchanged files are hard links; ``--in-place``: journaled), then re-read and re-plan: the result must
be ``compatible``, else the write is undone and the command fails.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from criu_xstate.changeset import ChangeSet, build_changeset
from criu_xstate.commands.common import opened_model, use_colour
from criu_xstate.commands.planning import Destination, load_destinations, load_source, plan_for
from criu_xstate.errors import ApplyError, CriuXstateError
from criu_xstate.images import open_checkpoint
from criu_xstate.images.checkpoint import is_archive
from criu_xstate.model import load_model
from criu_xstate.overlay import write_overlay
from criu_xstate.plan import Plan, Severity, Verdict
from criu_xstate.report import dumps, render_plan_text
from criu_xstate.transaction import JOURNAL, LOCK, Change, apply_changes, journal_state, undo


class VerifyError(CriuXstateError):
    exit_code = 3


def _copy_for_out(src: Path, out: Path, changes: list[Change]) -> None:
    """Hard-link every image into ``out`` except files edited in place, which are copied (archives:
    their extracted images are temporary, so the output cannot refer back to them)."""
    edited = {c.name for c in changes}  # ByteEdit/Append write into the file: never into a shared inode
    if out.exists() and any(out.iterdir()):
        raise ApplyError(f"{out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    for entry in sorted(src.iterdir()):
        if entry.name in (JOURNAL, LOCK) or entry.name.startswith(".criu-xstate"):
            continue
        dest = out / entry.name
        if entry.is_symlink():
            target = entry.resolve()  # `parent`: keep pointing at the original chain
            os.symlink(target, dest)
        elif entry.is_file():
            if entry.name in edited:
                shutil.copyfile(entry, dest)  # copy_file_range: reflinks where the filesystem can
                shutil.copymode(entry, dest)
            else:
                try:
                    os.link(entry, dest)
                except OSError:
                    shutil.copy2(entry, dest)


def _single_dest(args: argparse.Namespace) -> Destination:
    dests = load_destinations(args.dest)
    if len(dests) != 1:
        raise ApplyError(
            f"apply needs exactly one destination profile, got {len(dests)} (use a fleet baseline)"
        )
    return dests[0]


def _summary(plan: Plan, cs: ChangeSet | None, target: str) -> dict[str, object]:
    out = plan.to_json()
    out["applied"] = {
        "target": target,
        "frames_rewritten": cs.frames_rewritten if cs else 0,
        "frames_relocated": cs.frames_relocated if cs else 0,
        "new_mappings": [
            {"pid": p, "start": hex(s), "end": hex(e)} for p, s, e in (cs.relocation_vmas if cs else [])
        ],
        "files_changed": sorted({c.name for c in cs.changes}) if cs else [],
    }
    return out


def run_apply(args: argparse.Namespace) -> int:
    dest = _single_dest(args)
    src_path = Path(args.checkpoint)
    if args.in_place and is_archive(src_path):
        raise ApplyError(f"{src_path}: an archive cannot be changed in place; use --out DIR")
    if args.in_place and journal_state(src_path) == "pending":
        raise ApplyError(
            f"{src_path}: an interrupted apply left a journal; run `criu-xstate undo {src_path}` first"
        )
    with opened_model(args.checkpoint) as model:
        source = load_source(args.src, model)
        plan = plan_for(
            model, dest.facts, source, allow_relocation=not args.no_relocate, strict_isa=args.strict_isa
        )
        if plan.verdict is Verdict.REFUSE:
            _report(args, plan, None, "refused: nothing written")
            return 1
        cs = build_changeset(model, plan, dest.facts) if plan.verdict is Verdict.TRANSLATE else None
        target = Path(args.out) if args.out else src_path
        if (
            args.out
            and cs is not None
            and cs.changes
            and not is_archive(src_path)
            and not args.self_contained
        ):
            # An incremental image over the original: only the changed pages are written.
            write_overlay(model.checkpoint.dir, target, cs.changes)
            cs_written = True
        elif args.out:
            _copy_for_out(model.checkpoint.dir, target, cs.changes if cs else [])
            cs_written = False
        else:
            cs_written = False
    if cs is not None and cs.changes and not cs_written:
        apply_changes(target, cs.changes, description=f"criu-xstate apply for {dest.name}")
        if args.out:
            (target / JOURNAL).unlink(missing_ok=True)  # the original is untouched: nothing to undo
            (target / LOCK).unlink(missing_ok=True)
    _verify(target, dest, args, in_place=bool(args.in_place and cs is not None and cs.changes))
    note = "nothing to change" if cs is None or not cs.changes else f"rewrote {cs.frames_rewritten} frame(s)"
    _report(args, plan, cs, f"{note}; {target} is compatible with {dest.name}")
    return 0


def _verify(target: Path, dest: Destination, args: argparse.Namespace, *, in_place: bool) -> None:
    with open_checkpoint(target) as ck:
        model = load_model(ck)
        again = plan_for(model, dest.facts, load_source(args.src, model), allow_relocation=False)
    if again.verdict is not Verdict.COMPATIBLE:
        codes = sorted({f.code for f in again.all_findings() if f.severity >= Severity.TRANSLATE})
        if in_place:
            undo(target)
        raise VerifyError(
            f"{target}: after writing, the plan is still {again.verdict.value} ({', '.join(codes)}); "
            + ("the change was undone" if in_place else "the output is not usable")
        )


def _report(args: argparse.Namespace, plan: Plan, cs: ChangeSet | None, line: str) -> None:
    if args.json:
        sys.stdout.write(dumps(_summary(plan, cs, args.out or args.checkpoint)))
        return
    sys.stdout.write(render_plan_text(plan, checkpoint=args.checkpoint, colour=use_colour()))
    print(f"apply: {line}")


def run_undo(args: argparse.Namespace) -> int:
    path = Path(args.checkpoint)
    state = journal_state(path)
    restored = undo(path)
    what = "interrupted" if state == "pending" else "applied"
    print(f"undo: {path}: {what} change reverted ({restored} region(s))")
    return 0
