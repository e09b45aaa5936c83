"""The one write path of ``apply`` and the CRIU hook: plan, write, re-read and re-plan.

In place, the whole sequence runs under the images directory's lock (:mod:`criu_xstate.transaction`):
the change set is computed from what is on disk, written journaled, read back, and re-planned; the
journal only says ``complete`` once the re-plan is ``compatible``, and any failure rolls back. To a
copy (``--out``), the result is built in a private sibling directory, verified the same way, and
renamed into place: a killed run never leaves a half-written output that plan or CRIU would take.
docs/journal.md has the argument.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from criu_xstate.commands.planning import load_source, plan_for
from criu_xstate.errors import ApplyError, VerifyError
from criu_xstate.images import open_checkpoint
from criu_xstate.images.checkpoint import is_archive
from criu_xstate.model import CheckpointModel, load_model
from criu_xstate.plan import HostFacts, Plan, Severity, Verdict
from criu_xstate.records import record
from criu_xstate.transaction import JOURNAL, Change, refuse_if_interrupted, transaction

if TYPE_CHECKING:  # the writers are imported when something is written: the hook's common case is not
    from criu_xstate.changeset import ChangeSet


@record
class Options:
    """How to plan: the source profile, whether frames may move, ISA strictness, where the files are."""

    src: str | None = None
    allow_relocation: bool = True
    strict_isa: bool = False
    root: Path = Path("/")  # where the processes' files are (glibc.py reads their loader there)


@record
class Outcome:
    """What an apply did: the plan it carried out, its changes, and the bytes it wrote."""

    plan: Plan
    changeset: ChangeSet | None = None
    written: int = 0

    @property
    def changed(self) -> bool:
        return self.changeset is not None and bool(self.changeset.changes)


def _plan(model: CheckpointModel, dest: HostFacts, opts: Options, *, relocate: bool) -> Plan:
    source = load_source(opts.src, model)
    strict = opts.strict_isa
    return plan_for(model, dest, source, allow_relocation=relocate, strict_isa=strict, root=opts.root)


def verify_compatible(images: Path, dest: HostFacts, opts: Options) -> None:
    """Re-read ``images`` from disk and re-plan: anything but ``compatible`` is a failed translation."""
    with open_checkpoint(images) as ck:
        again = _plan(load_model(ck), dest, opts, relocate=False)
    if again.verdict is not Verdict.COMPATIBLE:
        codes = sorted({f.code for f in again.all_findings() if f.severity >= Severity.TRANSLATE})
        raise VerifyError(
            f"{images}: after writing, the plan is still {again.verdict.value} ({', '.join(codes)})"
        )


def apply_in_place(
    images: Path,
    dest: HostFacts | Callable[[CheckpointModel], HostFacts],
    opts: Options,
    description: str,
    *,
    write: bool = True,
) -> Outcome:
    """Plan ``images`` for ``dest`` and, if it needs translating and ``write``, translate it in place.
    ``dest`` may be a function of the checkpoint read under the lock (the hook probes only what the
    checkpoint needs judged: hook._probed)."""
    with transaction(images) as tx:
        tx.check_unchanged()
        with open_checkpoint(images) as ck:
            model = load_model(ck)
            if callable(dest):
                dest = dest(model)
            plan = _plan(model, dest, opts, relocate=opts.allow_relocation)
            if plan.verdict is not Verdict.TRANSLATE or not write:
                return Outcome(plan)
            from criu_xstate.changeset import build_changeset

            cs = build_changeset(model, plan, dest)
        _refuse_parent_pages(cs, "in place")
        written = tx.apply(cs.changes, description, verify=lambda: verify_compatible(images, dest, opts))
        return Outcome(plan, cs, written)


def _refuse_parent_pages(cs: ChangeSet, how: str) -> None:
    """A page the checkpoint takes from its parent images can be rewritten only in an incremental copy:
    the parent may be the base of other checkpoints, and this directory holds no bytes of that page."""
    if cs.parent_pages:
        p = cs.parent_pages[0]
        raise ApplyError(
            f"{p.pagemap}: the page at 0x{p.vaddr:x} that must change is in the parent images "
            f"({len(cs.parent_pages)} such page(s)); it cannot be rewritten {how}: use "
            "`criu-xstate apply CHECKPOINT --out NEW` (an incremental copy over this checkpoint)"
        )


def _check_out(out: Path, archive: bool) -> None:
    if out.is_symlink():
        raise ApplyError(f"{out}: is a symbolic link; give a new path for --out")
    if archive and out.exists():
        raise ApplyError(f"{out}: exists; give a new file name for the translated archive")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ApplyError(f"{out}: exists and is not an empty directory")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ApplyError(f"{out.parent}: cannot create: {exc.strerror}") from None


def apply_to_copy(src: Path, out: Path, dest: HostFacts, opts: Options, *, self_contained: bool) -> Outcome:
    """Write a translated copy of ``src`` to ``out``; ``src`` is never written.

    A directory gives a directory: an incremental image over ``src`` unless ``self_contained``. An
    archive gives an archive of the same kind with every other member carried over byte for byte.
    """
    archive = is_archive(src)
    _check_out(out, archive)
    refuse_if_interrupted(src)
    with open_checkpoint(src) as ck:
        model = load_model(ck)
        plan = _plan(model, dest, opts, relocate=opts.allow_relocation)
        if plan.verdict is Verdict.REFUSE:
            return Outcome(plan)
        import shutil  # only copies use it (~3 ms of imports the hook, in place, does without)

        from criu_xstate.changeset import build_changeset
        from criu_xstate.images.archive_out import write_archive
        from criu_xstate.overlay import write_overlay

        cs = build_changeset(model, plan, dest) if plan.verdict is Verdict.TRANSLATE else None
        changes = cs.changes if cs is not None else []
        import tempfile  # not at import time: the hook's common case writes nothing

        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.criu-xstate-tmp-", dir=out.parent))
        try:
            if cs is not None and (changes or cs.parent_pages) and not archive and not self_contained:
                written = write_overlay(ck.dir, staging, changes, _by_pagemap(cs))
            else:
                if cs is not None:
                    _refuse_parent_pages(cs, "as an archive" if archive else "into a self-contained copy")
                _copy_images(ck.dir, staging, changes)
                with transaction(staging) as tx:
                    written = tx.apply(changes, "criu-xstate apply --out")
                    tx.forget()  # the original is untouched: nothing to undo in the copy
            verify_compatible(staging, dest, opts)
            if archive:
                write_archive(src, staging, {c.name for c in changes}, out)
                shutil.rmtree(staging)
            else:
                _sync_tree(staging)
                os.rename(staging, out)  # replaces an empty `out`; atomic for plan, show and CRIU
            _fsync(out.parent)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
    return Outcome(plan, cs, written)


def _by_pagemap(cs: ChangeSet) -> dict[str, dict[int, bytes]]:
    out: dict[str, dict[int, bytes]] = {}
    for p in cs.parent_pages:
        out.setdefault(p.pagemap, {})[p.vaddr] = p.new
    return out


def _copy_images(src: Path, out: Path, changes: list[Change]) -> None:
    """Every file of ``src`` into ``out``: hard links where possible (in-place writes later unshare
    them, see fsio), copies for the files about to be edited and when linking fails."""
    import shutil

    edited = {c.name for c in changes}
    for entry in sorted(src.iterdir()):
        if entry.name == JOURNAL or entry.name.startswith(".criu-xstate"):
            continue
        dest = out / entry.name
        if entry.is_symlink():
            if entry.name != "parent":
                raise ApplyError(f"{entry}: is a symbolic link; refusing to copy what it points to")
            os.symlink(entry.resolve(), dest)  # `parent`: keep pointing at the original chain
        elif entry.is_file():
            if entry.name in edited:
                shutil.copyfile(entry, dest)
                shutil.copymode(entry, dest)
            else:
                try:
                    os.link(entry, dest)
                except OSError:
                    shutil.copy2(entry, dest)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_tree(d: Path) -> None:
    for entry in d.iterdir():
        if entry.is_file() and not entry.is_symlink():
            _fsync(entry)
    _fsync(d)
