"""``pagemap-<pid>.img`` decoded once into compact arrays of runs, without a message per entry.

CRIU 4.1.1 writes one pagemap entry per MiB of a large mapping (8,192 for 8 GiB). Decoding each with
protobuf and keeping a Python object per entry cost ~4.6 us per entry, so plan and apply grew with the
checkpoint's memory. Here an entry is decoded by a small varint reader, and a stretch of entries of
the same shape (same size, same fields, only ``vaddr`` varying: what CRIU writes for one big mapping)
is matched by one regular expression and checked with byte-column operations: 4.2 ms for the
32,868 entries of a 32 GiB process (0.13 us an entry, against 4.6). Contiguous entries with the
same flags become one run: what lookups and the overlay need is the address range, the flags and
where the data starts in the pages file.

Anything unusual (unknown fields, another wire type, a varint longer than 10 bytes) is decoded by
protobuf instead, entry by entry, with the same result (``tests/test_perf_invariants.py`` checks the
two against each other with hypothesis). Input is hostile: every size is bounded, every error is an
:class:`ImageError`, and the runs are validated (aligned, in order, not overlapping, below the end of
user space) exactly as before.

A decoded pagemap is remembered by its bytes (a pure function of them, so never stale): ``plan``,
``apply``'s overlay and its verification, and the hook decode each pagemap once per command.
"""

from __future__ import annotations

import operator
import re
import struct
import sys
from array import array
from itertools import islice
from pathlib import Path

from criu_xstate.errors import ImageError
from criu_xstate.images import framing
from criu_xstate.records import record

PAGE = 4096
PE_PARENT = 1 << 0
PE_LAZY = 1 << 1
PE_PRESENT = 1 << 2
USER_SPACE_END = 1 << 47
NO_OFFSET = (1 << 64) - 1  # offsets[] of a run whose data is not in this pages file
MIN_BLOCK = 8  # shorter stretches of same-shaped entries are decoded entry by entry
MEMO_BYTES = 64 << 20  # pagemap bytes remembered (a 64 GiB process writes ~1 MB of pagemap)


@record(slots=True)
class Entry:
    """One pagemap entry, normalized as criu/pagemap.c reads it."""

    vaddr: int
    pages: int
    flags: int
    modern: bool  # the entry uses nr_pages (CRIU >= 4.2) with a non-zero count


@record
class PagemapRuns:
    """The runs of one pagemap, merged where contiguous, as parallel arrays in address order."""

    head: int | None  # image head magic
    magic: int
    head_payload: bytes  # the pagemap_head entry, kept byte for byte
    pages_id: int
    starts: array[int]
    pages: array[int]
    flags: array[int]
    offsets: array[int]  # offset in the pages file, or NO_OFFSET
    entries: int  # entries in the image (not runs)
    modern: bool

    @property
    def present_bytes(self) -> int:
        return sum(p for p, o in zip(self.pages, self.offsets, strict=True) if o != NO_OFFSET) * PAGE

    @property
    def end(self) -> int:
        """The end of the highest run (0 without runs)."""
        return self.starts[-1] + self.pages[-1] * PAGE if self.starts else 0


# --- one entry ------------------------------------------------------------------------------------

_FIELDS = {0x08: 0, 0x10: 1, 0x18: 2, 0x20: 3, 0x28: 4}  # vaddr, compat_nr_pages, in_parent, flags, nr_pages


def decode_entry_fast(p: bytes) -> tuple[int | None, ...] | None:
    """(vaddr, compat_nr_pages, in_parent, flags, nr_pages) of a pagemap_entry with only known varint
    fields, each None when absent, as protobuf reads them (last value wins, uint32 truncated); None
    for anything else, which the caller gives to protobuf."""
    vals: list[int | None] = [None, None, None, None, None]
    i, n = 0, len(p)
    while i < n:
        field = _FIELDS.get(p[i])
        if field is None:
            return None
        i += 1
        value = shift = 0
        while True:
            if i >= n or shift > 63 or (shift == 63 and p[i] > 1):
                return None  # truncated, or past 64 bits: protobuf decides
            b = p[i]
            i += 1
            value |= (b & 0x7F) << shift
            shift += 7
            if b < 0x80:
                break
        if field == 2:
            value = 1 if value else 0  # bool
        elif field in (1, 3):
            value &= 0xFFFFFFFF  # uint32
        vals[field] = value
    return tuple(vals)


def _decode_entry_pb(p: bytes, path: str, index: int) -> tuple[int | None, ...]:
    e = framing.decode(p, framing.PAGEMAP_ENTRY, path, index)
    names = ("vaddr", "compat_nr_pages", "in_parent", "flags", "nr_pages")
    return tuple(int(getattr(e, f)) if e.HasField(f) else None for f in names)


def normalize(fields: tuple[int | None, ...]) -> Entry:
    """criu/pagemap.c: nr_pages if given, else compat_nr_pages; flags absent -> present or parent."""
    vaddr, compat, in_parent, flags, nr_pages = fields
    pages = nr_pages if nr_pages is not None else (compat or 0)
    if flags is None:
        flags = PE_PARENT if in_parent else PE_PRESENT
    if in_parent:
        flags |= PE_PARENT
    return Entry(vaddr or 0, pages, flags, bool(nr_pages))


def entry_at(p: bytes, path: str, index: int) -> Entry:
    fields = decode_entry_fast(p)
    return normalize(fields if fields is not None else _decode_entry_pb(p, path, index))


# --- stretches of same-shaped entries -------------------------------------------------------------

_PATTERNS: dict[bytes, re.Pattern[bytes]] = {}
_MASKS: dict[int, bytes] = {}


def _block_pattern(record: bytes, at: int, length: int) -> re.Pattern[bytes]:
    """Records equal to ``record`` except for the vaddr varint at ``record[at:at+length]``."""
    key = record[:at] + bytes([length]) + record[at + length :]
    pat = _PATTERNS.get(key)
    if pat is None:
        if len(_PATTERNS) > 256:
            _PATTERNS.clear()
        varint = b"[\\x80-\\xff]" + (b"{%d}" % (length - 1)) + b"[\\x00-\\x7f]"
        pat = re.compile(
            b"(?:" + re.escape(record[:at]) + varint + re.escape(record[at + length :]) + b")+", re.S
        )
        _PATTERNS[key] = pat
    return pat


def _low_bits_table(mask: int) -> bytes:
    table = _MASKS.get(mask)
    if table is None:
        table = _MASKS[mask] = bytes(b & mask for b in range(256))
    return table


def _varint(b: bytes) -> int:
    return sum((c & 0x7F) << (7 * k) for k, c in enumerate(b))


def _contiguous(block: bytes, stride: int, at: int, length: int, count: int, step: int) -> bool:
    """Whether the ``count`` records of ``block`` have vaddrs v0, v0 + step, v0 + 2 step, ...

    ``step`` is a power of two: the vaddr bits below it must be equal in every record (byte columns
    reduced by a translate table), the vaddrs strictly increasing, and the last one (count - 1) steps
    above the first.
    """
    low = step.bit_length() - 1
    for k in range(length):
        mask = (1 << max(0, min(7, low - 7 * k))) - 1
        if mask:
            column = block[at + k :: stride].translate(_low_bits_table(mask))
            if column.count(column[:1]) != count:
                return False
    first = _varint(block[at : at + length])
    last = _varint(block[(count - 1) * stride + at : (count - 1) * stride + at + length])
    if last - first != (count - 1) * step:
        return False
    # Each varint as a big-endian 8-byte word (its bytes reversed; equal lengths, so the words order
    # like the values), gathered column by column, then compared as native integers.
    words = bytearray(8 * count)
    for k in range(length):
        words[8 - length + k :: 8] = block[at + length - 1 - k :: stride]
    keys = array("Q")
    keys.frombytes(words)
    if sys.byteorder == "little":
        keys.byteswap()
    return all(map(operator.lt, keys, islice(keys, 1, None)))


def _vaddr_field(p: bytes) -> tuple[int, int] | None:
    """(offset, length) of the only vaddr varint in a fast-decodable payload, or None."""
    i, n, found = 0, len(p), None
    while i < n:
        tag = p[i]
        j = i + 1
        while p[j] >= 0x80:
            j += 1
        if tag == 0x08:
            if found is not None:
                return None
            found = (i + 1, j + 1 - (i + 1))
        i = j + 1
    return found


# --- the image ------------------------------------------------------------------------------------


class _Builder:
    def __init__(self, path: str) -> None:
        self.path = path
        self.starts: array[int] = array("Q")
        self.pages: array[int] = array("Q")
        self.flags: array[int] = array("Q")
        self.offsets: array[int] = array("Q")
        self.offset = 0
        self.prev_end = 0
        self.modern = False

    def add(self, e: Entry, index: int) -> None:
        where = f"entry {index} (vaddr 0x{e.vaddr:x})"
        if e.vaddr % PAGE:
            raise ImageError(self.path, f"{where} is not page aligned")
        if e.pages <= 0 or e.pages > USER_SPACE_END // PAGE or e.vaddr + e.pages * PAGE > USER_SPACE_END:
            raise ImageError(self.path, f"{where} has an impossible page count {e.pages}")
        if e.vaddr < self.prev_end:
            raise ImageError(self.path, f"{where} overlaps or precedes the previous run")
        self.modern |= e.modern
        present = bool(e.flags & PE_PRESENT)
        if self.starts and e.vaddr == self.prev_end and self.flags[-1] == e.flags:
            self.pages[-1] += e.pages  # contiguous, same flags: one run (present data is contiguous too)
        else:
            self.starts.append(e.vaddr)
            self.pages.append(e.pages)
            self.flags.append(e.flags)
            self.offsets.append(self.offset if present else NO_OFFSET)
        if present:
            self.offset += e.pages * PAGE
        self.prev_end = e.vaddr + e.pages * PAGE


def decode_pagemap(data: bytes, path: str) -> PagemapRuns:
    """Decode a whole pagemap image (framing, head, entries) into :class:`PagemapRuns`."""
    framing.PAGEMAP_DECODES += 1
    head, magic, pos = framing.split_header(data, framing.PAGEMAP, path)
    payload, pos = framing.next_entry(data, pos, path, 0)
    if payload is None:
        raise ImageError(path, "pagemap has no head entry")
    pages_id = int(framing.decode(payload, framing.PAGEMAP_HEAD, path, 0).pages_id)
    b = _Builder(path)
    index = _decode_entries(b, data, pos, 0)
    return PagemapRuns(head, magic, payload, pages_id, b.starts, b.pages, b.flags, b.offsets, index, b.modern)


def decode_appended(base: PagemapRuns, base_len: int, data: bytes, path: str) -> PagemapRuns:
    """``data`` is the image ``base`` was decoded from (``base_len`` bytes) with entries appended (a
    relocation adds one): only the new entries are decoded."""
    b = _Builder(path)
    b.starts, b.pages, b.flags, b.offsets = (
        array("Q", a) for a in (base.starts, base.pages, base.flags, base.offsets)
    )
    b.offset, b.prev_end, b.modern = base.present_bytes, base.end, base.modern
    index = _decode_entries(b, data, base_len, base.entries)
    return PagemapRuns(
        base.head,
        base.magic,
        base.head_payload,
        base.pages_id,
        b.starts,
        b.pages,
        b.flags,
        b.offsets,
        index,
        b.modern,
    )


def _decode_entries(b: _Builder, data: bytes, pos: int, index: int) -> int:
    """Add the entries from ``pos`` on to ``b``; the number of entries decoded in all."""
    path, n = b.path, len(data)
    plain_until = 0  # a stretch of same-shaped entries that are not contiguous: entry by entry
    while pos < n:
        at = pos
        p, pos = framing.next_entry(data, pos, path, index + 1)
        assert p is not None
        index += 1
        if index > framing.MAX_ENTRIES:
            raise ImageError(path, f"more than {framing.MAX_ENTRIES} entries (limit {framing.MAX_ENTRIES})")
        fields = decode_entry_fast(p)
        if fields is None:
            b.add(normalize(_decode_entry_pb(p, path, index)), index)
            continue
        e = normalize(fields)
        b.add(e, index)
        if pos < plain_until:
            continue
        vf = _vaddr_field(p)
        if vf is None or vf[1] > 7 or e.pages & (e.pages - 1):
            continue
        stride = pos - at
        m = _block_pattern(data[at:pos], 4 + vf[0], vf[1]).match(data, pos)
        if m is None:
            continue
        count = min((m.end() - pos) // stride, framing.MAX_ENTRIES - index)
        if count < MIN_BLOCK:
            continue
        block = data[at : pos + count * stride]  # the first record and the ones that follow it
        if not _contiguous(block, stride, 4 + vf[0], vf[1], count + 1, e.pages * PAGE):
            plain_until = pos + count * stride  # never matched again from inside it (quadratic)
            continue
        b.add(Entry(e.vaddr + e.pages * PAGE, count * e.pages, e.flags, e.modern), index + 1)
        index += count
        pos += count * stride
    return index


_MEMO: dict[bytes, PagemapRuns] = {}


def read_pagemap_runs(path: Path) -> PagemapRuns:
    """The runs of the pagemap image at ``path``, decoded once per content."""
    return runs_of(framing.read_file(path), str(path))


def runs_of(data: bytes, path: str) -> PagemapRuns:
    """The runs of pagemap image ``data``, decoded once per content (``path`` names it in errors)."""
    runs = _MEMO.get(data)
    if runs is None:
        runs = decode_pagemap(data, path)
        _remember(data, runs)
    return runs


def _remember(data: bytes, runs: PagemapRuns) -> None:
    if len(data) <= MEMO_BYTES:
        while _MEMO and sum(map(len, _MEMO)) + len(data) > MEMO_BYTES:
            del _MEMO[next(iter(_MEMO))]
        _MEMO[data] = runs


def read_pages_id(path: Path) -> int:
    """``pages_id`` from the head entry alone (the entries are not decoded)."""
    data = framing.read_file(path)
    _, _, pos = framing.split_header(data, framing.PAGEMAP, str(path))
    payload, _ = framing.next_entry(data, pos, str(path), 0)
    if payload is None:
        raise ImageError(path, "pagemap has no head entry")
    return int(framing.decode(payload, framing.PAGEMAP_HEAD, str(path), 0).pages_id)


def append_run(image: bytes, runs: PagemapRuns, vaddr: int, pages: int, flags: int = PE_PRESENT) -> bytes:
    """``image`` (the pagemap ``runs`` was decoded from) with one entry appended, its other bytes
    unchanged; the count goes where the image's entries keep theirs (nr_pages from CRIU 4.2)."""
    from criu_xstate.images.pb import pagemap_pb2

    e = pagemap_pb2.pagemap_entry(vaddr=vaddr, flags=flags)
    e.compat_nr_pages = 0 if runs.modern else pages
    if runs.modern:
        e.nr_pages = pages
    payload: bytes = e.SerializeToString()
    new = image + struct.pack("<I", len(payload)) + payload
    _remember(new, decode_appended(runs, len(image), new, "pagemap"))  # what verification will read
    return new
