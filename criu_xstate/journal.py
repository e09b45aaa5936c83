"""The undo journal: what the checkpoint held before criu-xstate first wrote into it, and what it holds now.

One file, ``.criu-xstate-journal.json``, in the images directory (docs/journal.md). It keeps, for every
file criu-xstate ever changed there, the ORIGINAL state (the first apply's ``old`` bytes; later applies
only add regions not covered yet), and the EXPECTED state after the last complete apply (``expect``),
plus, while an apply is in progress (``state: pending``), the state it is writing (``next``). So:

- ``undo`` always returns the original dump, after any number of applies by hand or by the hook;
- ``undo`` and every later apply first check that the files still hold what criu-xstate wrote: a
  re-dump or a foreign edit is never overwritten with old bytes;
- a crash leaves each byte as before, as after, or (during undo) original: all three are accepted.

The file is parsed as hostile input: bounded size, exact types, plain file names.
"""

from __future__ import annotations

import binascii
import itertools
from collections.abc import Iterable, Mapping
from typing import Literal

from criu_xstate.errors import ApplyError
from criu_xstate.fsio import JOURNAL, check_name
from criu_xstate.records import field, record, replace

SCHEMA = "criu-xstate/journal/v2"
MAX_JOURNAL_BYTES = 256 << 20
MAX_OFFSET = 1 << 48
State = Literal["pending", "complete"]


@record
class FileView:
    """What one file holds: its size (None: absent), its whole content's sha256 (whole-file writes),
    and the bytes of the regions criu-xstate touched, by offset (sorted, disjoint)."""

    size: int | None
    sha256: str | None = None
    regions: tuple[tuple[int, bytes], ...] = ()


@record
class Original:
    """A file before criu-xstate first changed it: its size (None: absent), its whole content when it
    was replaced whole, and the original bytes of every edited region."""

    size: int | None
    content: bytes | None = None
    regions: tuple[tuple[int, bytes], ...] = ()


@record
class Journal:
    """The journal file's content: its state, the original and expected files, the history."""

    state: State
    originals: Mapping[str, Original]
    expect: Mapping[str, FileView]
    next: Mapping[str, FileView] = field(default_factory=dict)
    history: tuple[str, ...] = ()

    def with_state(self, state: State, **kw: object) -> Journal:
        return replace(self, state=state, **kw)


# -- regions --------------------------------------------------------------------------------------


def add_region(
    regions: Iterable[tuple[int, bytes]], offset: int, data: bytes
) -> tuple[tuple[int, bytes], ...]:
    """Merge ``data`` at ``offset`` into disjoint ``regions``; bytes already held win (the first
    recorded original of a byte is kept)."""
    keep: list[tuple[int, bytes]] = []
    hit: list[tuple[int, bytes]] = []
    for off, old in regions:
        touches = off <= offset + len(data) and off + len(old) >= offset
        (hit if touches else keep).append((off, old))
    start = min([offset, *(off for off, _ in hit)])
    end = max([offset + len(data), *(off + len(old) for off, old in hit)])
    buf = bytearray(end - start)
    buf[offset - start : offset - start + len(data)] = data
    for off, old in hit:
        buf[off - start : off - start + len(old)] = old
    return tuple(sorted([*keep, (start, bytes(buf))]))


def overlay(regions: Iterable[tuple[int, bytes]], offset: int, data: bytes) -> tuple[tuple[int, bytes], ...]:
    """``regions`` with ``data`` written at ``offset`` where they overlap it (what a write changes)."""
    out = []
    for off, old in regions:
        buf = bytearray(old)
        lo, hi = max(off, offset), min(off + len(old), offset + len(data))
        if lo < hi:
            buf[lo - off : hi - off] = data[lo - offset : hi - offset]
        out.append((off, bytes(buf)))
    return tuple(out)


def sha256(data: bytes) -> str:
    import hashlib  # only when a journal is written or checked (not by the hook's common case)

    return hashlib.sha256(data).hexdigest()


# -- encoding -------------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii")


def _regions_json(regions: tuple[tuple[int, bytes], ...]) -> list[list[object]]:
    return [[off, _b64(data)] for off, data in regions]


def dumps(j: Journal) -> bytes:
    doc = {
        "schema": SCHEMA,
        "state": j.state,
        "history": list(j.history),
        "originals": {
            n: {
                "size": o.size,
                "content": None if o.content is None else _b64(o.content),
                "regions": _regions_json(o.regions),
            }
            for n, o in sorted(j.originals.items())
        },
        "expect": _views_json(j.expect),
        "next": _views_json(j.next),
    }
    import json  # with the journal's other readers and writers: not in a hook with nothing to write

    return json.dumps(doc, separators=(",", ":")).encode()


def _views_json(views: Mapping[str, FileView]) -> dict[str, object]:
    return {
        n: {"size": v.size, "sha256": v.sha256, "regions": _regions_json(v.regions)}
        for n, v in sorted(views.items())
    }


class _Bad(Exception):
    pass


def _int(v: object, *, nullable: bool = False) -> int | None:
    if v is None and nullable:
        return None
    if type(v) is not int or not 0 <= v < MAX_OFFSET:
        raise _Bad(f"expected a size or offset, got {str(v)[:40]!r}")
    return v


def _bytes(v: object) -> bytes:
    if not isinstance(v, str):
        raise _Bad("expected base64 text")
    try:
        return _b64decode(v.encode("ascii"))
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise _Bad(f"bad base64: {exc}") from None


def _b64decode(text: bytes) -> bytes:
    """``base64.b64decode(text, validate=True)``: standard alphabet and padding only, else binascii.Error
    (binascii is built in; the base64 module costs ~0.5 ms of a hook's start-up)."""
    return binascii.a2b_base64(text, strict_mode=True)


def _dict(v: object) -> dict[str, object]:
    if not isinstance(v, dict):
        raise _Bad("expected an object")
    return v


def _regions(v: object) -> tuple[tuple[int, bytes], ...]:
    if not isinstance(v, list):
        raise _Bad("regions must be a list")
    out: list[tuple[int, bytes]] = []
    for item in v:
        if not isinstance(item, list) or len(item) != 2:
            raise _Bad("a region is [offset, base64]")
        off = _int(item[0])
        assert off is not None
        out.append((off, _bytes(item[1])))
    out.sort()
    for (a, da), (b, _) in itertools.pairwise(out):
        if a + len(da) > b:
            raise _Bad("overlapping regions")
    return tuple(out)


def _sha(v: object) -> str | None:
    if v is None:
        return None
    if not isinstance(v, str) or len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
        raise _Bad("bad sha256")
    return v


def _file_name(n: str) -> str:
    if n == JOURNAL:
        raise _Bad("the journal names itself")
    return check_name(n)


def _views(v: object) -> dict[str, FileView]:
    return {
        _file_name(n): FileView(
            _int(d.get("size"), nullable=True), _sha(d.get("sha256")), _regions(d.get("regions"))
        )
        for n, d in ((n, _dict(d)) for n, d in _dict(v).items())
    }


def loads(raw: bytes, where: str) -> Journal:
    """Parse a journal; every defect is one ApplyError line naming the file."""
    if len(raw) > MAX_JOURNAL_BYTES:
        raise ApplyError(f"{where}: journal larger than {MAX_JOURNAL_BYTES} bytes; not a criu-xstate journal")
    import json

    try:
        doc = _dict(json.loads(raw))
        if doc.get("schema") != SCHEMA:
            raise _Bad(f"unknown schema {str(doc.get('schema'))[:60]!r} (expected {SCHEMA})")
        state = doc.get("state")
        if state not in ("pending", "complete"):
            raise _Bad(f"unknown state {str(state)[:40]!r}")
        history = doc.get("history", [])
        if not isinstance(history, list) or not all(isinstance(h, str) for h in history):
            raise _Bad("history must be a list of strings")
        originals = {
            _file_name(n): Original(
                _int(d.get("size"), nullable=True),
                None if d.get("content") is None else _bytes(d.get("content")),
                _regions(d.get("regions")),
            )
            for n, d in ((n, _dict(d)) for n, d in _dict(doc.get("originals")).items())
        }
        journal = Journal(
            state,
            originals,
            _views(doc.get("expect")),
            _views(doc.get("next", {})),
            tuple(history),
        )
    except (_Bad, ValueError, RecursionError) as exc:
        raise ApplyError(f"{where}: unreadable journal: {str(exc).splitlines()[0][:200]}") from None
    except ApplyError as exc:
        raise ApplyError(f"{where}: journal names {exc}") from None
    if set(journal.expect) - set(journal.originals) or set(journal.next) - set(journal.originals):
        raise ApplyError(f"{where}: unreadable journal: a view names a file without its original")
    return journal
