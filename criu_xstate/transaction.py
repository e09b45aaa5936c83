"""Apply a change set to an images directory crash-safely, and undo it.

A change set is a list of small edits: bytes replaced at an offset of a file (a frame in a pages
file), bytes appended to a file (relocated XSAVE images), and whole small files rewritten (core, mm,
pagemap images). Before anything is written, a journal with the original bytes of every region the
change touches is written and fsync'ed (write-ahead). A crash at any point therefore leaves either the
original checkpoint, or a journal from which ``undo`` restores it exactly; the CRIU hook refuses to
restore while a journal is pending. After a complete apply the journal stays as the undo record.

Concurrent applies are excluded with ``flock`` on a lock file in the images directory.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from criu_xstate.errors import ApplyError

JOURNAL = ".criu-xstate-journal.json"
LOCK = ".criu-xstate.lock"
JOURNAL_SCHEMA = "criu-xstate/journal/v1"


@dataclass(frozen=True)
class ByteEdit:
    """Replace ``old`` by ``new`` (same length) at ``offset`` of file ``name``."""

    name: str
    offset: int
    old: bytes
    new: bytes

    def __post_init__(self) -> None:
        if len(self.old) != len(self.new):
            raise ValueError("ByteEdit old and new must have the same length")


@dataclass(frozen=True)
class Append:
    """Append ``data`` to file ``name``, whose size must be ``at`` when applied."""

    name: str
    at: int
    data: bytes


@dataclass(frozen=True)
class FileWrite:
    """Replace the whole (small) file ``name``: ``old`` is its expected content, None if it must not exist."""

    name: str
    old: bytes | None
    new: bytes


Change = ByteEdit | Append | FileWrite


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.criu-xstate-tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)  # a full disk must not leave half-written files behind
        raise
    os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.chmod(tmp, os.stat(path).st_mode & 0o7777)
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _pwrite_all(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(fd, view, pos)
            view = view[n:]
            pos += n
        os.fsync(fd)
    finally:
        os.close(fd)


def _pread(path: Path, offset: int, size: int) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


@contextlib.contextmanager
def locked(images: Path) -> Iterator[None]:
    """Hold the directory's apply lock, or fail at once if another apply holds it."""
    try:
        fd = os.open(images / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise ApplyError(f"{images}: cannot create the lock file: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise ApplyError(f"{images}: another criu-xstate apply or undo is running on it") from exc
        yield
    finally:
        os.close(fd)


def journal_state(images: Path) -> str | None:
    """'pending' (an apply was interrupted), 'complete' (an undo record), or None."""
    path = images / JOURNAL
    if not path.exists():
        return None
    try:
        state = json.loads(path.read_text())["state"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApplyError(f"{path}: unreadable journal: {exc}") from exc
    if state not in ("pending", "complete"):
        raise ApplyError(f"{path}: unknown journal state {state!r}")
    return str(state)


def _verify(images: Path, changes: Sequence[Change]) -> None:
    """Every change must find the bytes it was computed from: else the checkpoint changed since plan."""
    for c in changes:
        path = images / c.name
        if isinstance(c, ByteEdit):
            if not path.is_file():
                raise ApplyError(f"{path}: missing (the checkpoint changed since it was planned)")
            if _pread(path, c.offset, len(c.old)) != c.old:
                raise ApplyError(f"{path}: bytes at offset {c.offset} changed since the plan; re-run plan")
        elif isinstance(c, Append):
            if not path.is_file() or path.stat().st_size != c.at:
                raise ApplyError(f"{path}: size changed since the plan (expected {c.at}); re-run plan")
        else:
            current = path.read_bytes() if path.exists() else None
            if current != c.old:
                raise ApplyError(f"{path}: content changed since the plan; re-run plan")


def _journal_entry(c: Change) -> dict[str, object]:
    if isinstance(c, ByteEdit):
        return {"op": "edit", "name": c.name, "offset": c.offset, "old": _b64(c.old)}
    if isinstance(c, Append):
        return {"op": "append", "name": c.name, "at": c.at}
    return {"op": "write", "name": c.name, "old": None if c.old is None else _b64(c.old)}


def apply_changes(images: Path, changes: Sequence[Change], *, description: str = "") -> int:
    """Write ``changes`` into ``images`` with a write-ahead journal; returns the number of bytes written."""
    if not changes:
        return 0
    if not os.access(images, os.W_OK):
        raise ApplyError(f"{images}: not writable (use --out DIR to write a translated copy)")
    for c in changes:
        if "/" in c.name or c.name.startswith("."):
            raise ApplyError(f"refusing to write {c.name!r}: not an image file of this directory")
    with locked(images):
        state = journal_state(images)
        if state == "pending":
            raise ApplyError(
                f"{images}: an interrupted apply left a journal; run `criu-xstate undo {images}` first"
            )
        _verify(images, changes)
        journal = {
            "schema": JOURNAL_SCHEMA,
            "state": "pending",
            "description": description,
            "entries": [_journal_entry(c) for c in changes],
        }
        try:
            _atomic_write(images / JOURNAL, json.dumps(journal).encode())
        except OSError as exc:
            (images / JOURNAL).unlink(missing_ok=True)
            raise ApplyError(
                f"{images}: cannot write the journal ({exc.strerror}); nothing was changed"
            ) from exc
        written = 0
        try:
            for c in changes:
                path = images / c.name
                if isinstance(c, ByteEdit):
                    _pwrite_all(path, c.offset, c.new)
                    written += len(c.new)
                elif isinstance(c, Append):
                    _pwrite_all(path, c.at, c.data)
                    written += len(c.data)
                else:
                    _atomic_write(path, c.new)
                    written += len(c.new)
        except OSError as exc:
            try:
                _rollback(images)
            except (OSError, ApplyError) as exc2:
                raise ApplyError(
                    f"{images}: write failed ({exc.strerror}) and so did the rollback ({exc2}); the journal "
                    f"{JOURNAL} holds the original bytes: run `criu-xstate undo` when the disk is fixed"
                ) from exc
            raise ApplyError(
                f"{images}: write failed ({exc.strerror}); rolled back, nothing changed"
            ) from exc
        journal["state"] = "complete"
        _atomic_write(images / JOURNAL, json.dumps(journal).encode())
        return written


def _rollback(images: Path) -> int:
    path = images / JOURNAL
    try:
        journal = json.loads(path.read_text())
        entries = journal["entries"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ApplyError(f"{path}: unreadable journal: {exc}") from exc
    restored = 0
    for e in reversed(entries):
        target = images / str(e["name"])
        if "/" in str(e["name"]):
            raise ApplyError(f"{path}: journal names a file outside the directory: {e['name']!r}")
        if e["op"] == "edit":
            old = _unb64(e["old"])
            if target.exists():
                _pwrite_all(target, int(e["offset"]), old)
                restored += 1
        elif e["op"] == "append":
            if target.exists() and target.stat().st_size > int(e["at"]):
                os.truncate(target, int(e["at"]))
                fd = os.open(target, os.O_WRONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                restored += 1
        elif e["op"] == "write":
            if e["old"] is None:
                target.unlink(missing_ok=True)
                _fsync_dir(images)
            else:
                _atomic_write(target, _unb64(e["old"]))
            restored += 1
        else:
            raise ApplyError(f"{path}: unknown journal operation {e['op']!r}")
    path.unlink()
    _fsync_dir(images)
    return restored


def undo(images: Path) -> int:
    """Restore the checkpoint from its journal (interrupted or complete apply); returns files restored."""
    with locked(images):
        if journal_state(images) is None:
            raise ApplyError(f"{images}: no criu-xstate journal: nothing to undo")
        try:
            return _rollback(images)
        except OSError as exc:
            raise ApplyError(f"{images}: undo failed: {exc.strerror}; the journal is kept") from exc
