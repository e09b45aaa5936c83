"""Write a change set into a checkpoint crash-safely, verify it, and undo back to the original dump.

A change set is a list of small edits: bytes replaced at an offset of a file (a frame in a pages file),
bytes appended to a file (relocated XSAVE images), and whole small files rewritten (core, mm, pagemap).
:class:`Transaction` holds the directory's lock for the whole plan -> write -> verify sequence, so the
change set it writes was computed from what is on disk; the journal (:mod:`criu_xstate.journal`) is
written and fsync'ed before any image byte changes and keeps the original dump's bytes from the first
apply on. The argument that no crash or error loses the checkpoint is in docs/journal.md.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from criu_xstate.errors import ApplyError, CriuXstateError
from criu_xstate.fsio import JOURNAL, Directory, check_name, opened_directory
from criu_xstate.journal import (
    MAX_JOURNAL_BYTES,
    FileView,
    Journal,
    Original,
    add_region,
    dumps,
    loads,
    overlay,
    sha256,
)
from criu_xstate.records import record, replace

__all__ = [
    "JOURNAL",
    "Append",
    "ByteEdit",
    "Change",
    "FileWrite",
    "Transaction",
    "apply_changes",
    "journal_state",
    "refuse_if_interrupted",
    "transaction",
    "undo",
]


@record
class ByteEdit:
    """Replace ``old`` by ``new`` (same length) at ``offset`` of file ``name``."""

    name: str
    offset: int
    old: bytes
    new: bytes

    def __post_init__(self) -> None:
        if len(self.old) != len(self.new):
            raise ValueError("ByteEdit old and new must have the same length")


@record
class Append:
    """Append ``data`` to file ``name``, whose size must be ``at`` when applied."""

    name: str
    at: int
    data: bytes


@record
class FileWrite:
    """Replace the whole (small) file ``name``: ``old`` is its expected content, None if it must not exist."""

    name: str
    old: bytes | None
    new: bytes


Change = ByteEdit | Append | FileWrite
Verify = Callable[[], None]


# -- the journal's views of a change set -------------------------------------------------------------


def _extend(
    j: Journal, changes: Sequence[Change], d: Directory
) -> tuple[dict[str, Original], dict[str, FileView]]:
    """The journal's originals and expected views, grown to cover every region ``changes`` touch.

    A region not covered yet was never written by criu-xstate, so its current bytes (``old``, checked
    against the disk before) are the original dump's.
    """
    originals = dict(j.originals)
    expect = dict(j.expect)
    for c in changes:
        if c.name not in originals:
            size = d.size(c.name)
            originals[c.name] = Original(size)
            expect[c.name] = FileView(size)
        o, e = originals[c.name], expect[c.name]
        if isinstance(c, ByteEdit):
            o = replace(o, regions=add_region(o.regions, c.offset, c.old))
            e = replace(e, regions=add_region(e.regions, c.offset, c.old))
        elif isinstance(c, FileWrite):
            if o.content is None and o.size is not None and c.old is not None:
                o = replace(o, content=_original_content(o, c.old))
            e = replace(e, sha256=None if c.old is None else sha256(c.old))
        originals[c.name], expect[c.name] = o, e
    return originals, expect


def _original_content(o: Original, current: bytes) -> bytes:
    buf = bytearray(current)
    for off, data in o.regions:
        part = data[: max(0, len(buf) - off)]
        buf[off : off + len(part)] = part
    return bytes(buf[: o.size])


def _project(expect: Mapping[str, FileView], changes: Sequence[Change]) -> dict[str, FileView]:
    """What every touched file holds once ``changes`` are written."""
    nxt = dict(expect)
    for c in changes:
        v = nxt[c.name]
        if isinstance(c, ByteEdit):
            v = replace(v, regions=overlay(v.regions, c.offset, c.new))
        elif isinstance(c, Append):
            v = replace(v, size=c.at + len(c.data), regions=overlay(v.regions, c.at, c.data))
        else:
            v = replace(v, size=len(c.new), sha256=sha256(c.new))
        nxt[c.name] = v
    return nxt


def _original_view(o: Original) -> FileView:
    """The original file as a view; regions past its size (in data that an apply appended) are cut."""
    size = o.size or 0
    regions = tuple((off, data[: size - off]) for off, data in o.regions if off < size)
    return FileView(o.size, None if o.content is None else sha256(o.content), regions)


# -- comparing the disk with views ---------------------------------------------------------------------


def _holds(d: Directory, name: str, views: Sequence[FileView], *, mixed: bool) -> bool:
    """Does ``name`` hold one of ``views`` (``mixed``: or, byte by byte, a mixture of them, as a write
    or an undo interrupted anywhere leaves it)?"""
    size = d.size(name)
    sizes = [v.size for v in views]
    if size not in sizes:
        known = [s for s in sizes if s is not None]
        if not (mixed and size is not None and known and min(known) <= size <= max(known)):
            return False
    if size is None:
        return True
    shas = {v.sha256 for v in views if v.sha256 is not None}
    if shas:
        return d.sha256(name) in shas
    by_offset = [dict(v.regions) for v in views]
    for off in sorted({off for regions in by_offset for off in regions}):
        want = [r[off] for r in by_offset if off in r]
        got = d.pread(name, off, max(len(w) for w in want))
        if not mixed:
            if all(got != w for w in want):
                return False
        elif not all(any(k < len(w) and b == w[k] for w in want) for k, b in enumerate(got)):
            return False
    return True


def _mismatch(d: Directory, views: Mapping[str, Sequence[FileView]], *, mixed: bool) -> str | None:
    for name, alternatives in sorted(views.items()):
        if not _holds(d, name, alternatives, mixed=mixed):
            return name
    return None


# -- the transaction -----------------------------------------------------------------------------------


class Transaction:
    """The directory, locked; apply, undo and the journal's state, all under that one lock."""

    def __init__(self, d: Directory) -> None:
        self.d = d

    @property
    def path(self) -> str:
        return self.d.path

    def journal(self) -> Journal | None:
        raw = self.d.read(JOURNAL, max_size=MAX_JOURNAL_BYTES)
        return None if raw is None else loads(raw, f"{self.path}/{JOURNAL}")

    def state(self) -> str | None:
        j = self.journal()
        return None if j is None else j.state

    def check_unchanged(self) -> Journal | None:
        """The journal of earlier applies, after checking the images still hold what they wrote."""
        j = self.journal()
        if j is None:
            return None
        if j.state == "pending":
            raise ApplyError(f"{self.path}: {INTERRUPTED}; run `criu-xstate undo {self.path}` first")
        bad = _mismatch(self.d, {n: [v] for n, v in j.expect.items()}, mixed=False)
        if bad is not None:
            raise ApplyError(
                f"{self.path}/{bad}: not what criu-xstate last wrote there (re-dumped or edited since?); "
                f"refusing to write. `criu-xstate undo {self.path}` returns the original dump, "
                "`criu-xstate undo --forget` drops the journal if these images are a new dump"
            )
        return j

    def apply(self, changes: Sequence[Change], description: str, verify: Verify | None = None) -> int:
        """Write ``changes``; ``verify`` (re-read and re-plan) runs before the journal says complete.

        Any error (a write, the read-back, ``verify``) rolls back to the state before this call;
        returns the number of bytes written.
        """
        if not changes:
            return 0
        for c in changes:
            if check_name(c.name) == JOURNAL:
                raise ApplyError(f"refusing to write {c.name!r}: it is criu-xstate's journal")
        previous = self.check_unchanged()
        self._preconditions(changes)
        base = previous or Journal("complete", {}, {})
        originals, expect = _extend(base, changes, self.d)
        nxt = _project(expect, changes)
        pending = Journal("pending", originals, expect, nxt, (*base.history, description))
        try:
            self.d.replace(JOURNAL, dumps(pending))
        except OSError as exc:
            raise ApplyError(
                f"{self.path}: cannot write the journal ({exc.strerror}); nothing was changed"
            ) from None
        try:
            written = self._write(changes)
            bad = _mismatch(self.d, {n: [v] for n, v in nxt.items()}, mixed=False)
            if bad is not None:
                raise ApplyError(f"{self.path}/{bad}: reads back differently from what was written")
            if verify is not None:
                verify()
            self.d.replace(JOURNAL, dumps(pending.with_state("complete", expect=nxt, next={})))
        except (OSError, CriuXstateError) as exc:
            self._rollback(changes, previous, exc)
            raise  # not reached: _rollback raises
        return written

    def _preconditions(self, changes: Sequence[Change]) -> None:
        """Every change must find the bytes it was computed from."""
        for c in changes:
            where = f"{self.path}/{c.name}"
            if isinstance(c, ByteEdit):
                if self.d.pread(c.name, c.offset, len(c.old)) != c.old:
                    raise ApplyError(
                        f"{where}: bytes at offset {c.offset} changed since the plan; re-run plan"
                    )
            elif isinstance(c, Append):
                if self.d.size(c.name) != c.at:
                    raise ApplyError(f"{where}: size changed since the plan (expected {c.at}); re-run plan")
            elif self.d.read(c.name) != c.old:
                raise ApplyError(f"{where}: content changed since the plan; re-run plan")

    def _write(self, changes: Sequence[Change]) -> int:
        written = 0
        for c in changes:
            if isinstance(c, ByteEdit):
                self.d.pwrite(c.name, c.offset, c.new)
                written += len(c.new)
            elif isinstance(c, Append):
                self.d.pwrite(c.name, c.at, c.data)
                written += len(c.data)
            else:
                self.d.replace(c.name, c.new)
                written += len(c.new)
        return written

    def _rollback(self, changes: Sequence[Change], previous: Journal | None, cause: BaseException) -> None:
        why = _reason(cause)
        try:
            for c in reversed(changes):  # only what differs is written: a full disk can still roll back
                if isinstance(c, ByteEdit):
                    if self.d.pread(c.name, c.offset, len(c.old)) != c.old:
                        self.d.pwrite(c.name, c.offset, c.old)
                elif isinstance(c, Append):
                    if (self.d.size(c.name) or 0) > c.at:
                        self.d.truncate(c.name, c.at)
                elif c.old is None:
                    self.d.unlink(c.name)
                elif self.d.read(c.name) != c.old:
                    self.d.replace(c.name, c.old)
        except (OSError, CriuXstateError) as exc:
            raise ApplyError(
                f"{self.path}: {why}; the rollback failed too ({_reason(exc)}): the journal keeps the "
                f"original bytes, run `criu-xstate undo {self.path}` once the disk is fixed"
            ) from None
        try:
            if previous is None:
                self.d.unlink(JOURNAL)
            else:
                self.d.replace(JOURNAL, dumps(previous))
        except OSError as exc:
            raise ApplyError(
                f"{self.path}: {why}; the images were rolled back but the journal could not be reset "
                f"({exc.strerror}): `criu-xstate undo {self.path}` returns the original dump"
            ) from None
        if isinstance(cause, CriuXstateError) and not isinstance(cause, ApplyError):
            cause.args = (f"{cause}; rolled back, the checkpoint is as it was",)
            raise cause
        raise ApplyError(f"{self.path}: {why}; rolled back, the checkpoint is as it was") from None

    def undo(self) -> int:
        """Return every file criu-xstate changed to the original dump; returns the files restored."""
        j = self.journal()
        if j is None:
            raise ApplyError(f"{self.path}: no criu-xstate journal: nothing to undo")
        alternatives = {
            n: [j.expect[n], *([j.next[n]] if n in j.next else []), _original_view(o)]
            for n, o in j.originals.items()
        }
        bad = _mismatch(self.d, alternatives, mixed=True)
        if bad is not None:
            raise ApplyError(
                f"{self.path}/{bad}: holds neither what criu-xstate wrote nor the original (re-dumped or "
                "edited since?); undo would overwrite it, so nothing was changed. If these images are a "
                f"new dump, `criu-xstate undo --forget {self.path}` drops the stale journal"
            )
        try:
            restored = sum(self._restore(n, o) for n, o in sorted(j.originals.items()))
            bad = _mismatch(self.d, {n: [_original_view(o)] for n, o in j.originals.items()}, mixed=False)
            if bad is not None:
                raise ApplyError(f"{self.path}/{bad}: reads back differently from the original")
            self.d.unlink(JOURNAL)
        except OSError as exc:
            raise ApplyError(
                f"{self.path}: undo failed ({exc.strerror}); the journal is kept: run undo again"
            ) from None
        return restored

    def _restore(self, name: str, o: Original) -> int:
        if o.size is None:
            if self.d.exists(name):
                self.d.unlink(name)
                return 1
            return 0
        if o.content is not None:
            if self.d.read(name) != o.content:
                self.d.replace(name, o.content)
                return 1
            return 0
        changed = 0
        for off, data in o.regions:
            part = data[: max(0, o.size - off)]
            if part and self.d.pread(name, off, len(part)) != part:
                self.d.pwrite(name, off, part)
                changed = 1
        if self.d.size(name) != o.size:
            self.d.truncate(name, o.size)
            changed = 1
        return changed

    def forget(self) -> bool:
        """Drop the journal without touching the images (they are a new dump)."""
        if not self.d.exists(JOURNAL):
            return False
        self.d.unlink(JOURNAL)
        return True


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"write failed ({exc.strerror or exc})"
    return str(exc)


@contextmanager
def transaction(images: Path | str) -> Iterator[Transaction]:
    """Lock ``images`` and yield its transaction; temporary files of a killed writer are removed."""
    try:
        with opened_directory(images, lock=True) as d:
            d.remove_stale_temporaries()
            yield Transaction(d)
    except OSError as exc:
        raise ApplyError(f"{images}: {exc.strerror or exc}") from None


INTERRUPTED = "an interrupted criu-xstate apply left its journal: the images may be half-written"


def refuse_if_interrupted(images: Path | str) -> None:
    """Refuse to read (plan, copy) or write a directory that a pending journal says is half-written."""
    if Path(images).is_dir() and journal_state(images) == "pending":
        raise ApplyError(f"{images}: {INTERRUPTED}; run `criu-xstate undo {images}` first")


def journal_state(images: Path | str) -> str | None:
    """'pending' (an apply was interrupted), 'complete' (an undo record), or None; without locking."""
    try:
        with opened_directory(images, lock=False) as d:
            return Transaction(d).state()
    except OSError as exc:
        raise ApplyError(f"{images}: {exc.strerror or exc}") from None


def apply_changes(images: Path | str, changes: Sequence[Change], *, description: str = "") -> int:
    """Lock, write ``changes`` journaled, unlock (tests and simple callers)."""
    with transaction(images) as tx:
        return tx.apply(changes, description)


def undo(images: Path | str) -> int:
    with transaction(images) as tx:
        return tx.undo()
