"""``apply --out DIR`` for big checkpoints: the translated copy is an incremental image on top of the
original, so a multi-GiB pages file is never copied.

The output directory holds every image of the original (hard links), except that each pagemap whose
pages change is rewritten: the pages the change set touches (and relocated XSAVE images) are
``PE_PRESENT`` in a new, small ``pages-<id>.img``, every other present page becomes ``PE_PARENT``, and
a ``parent`` link points at the original directory — the same structure ``criu dump
--prev-images-dir`` writes, which ``criu restore`` reads through (criu.md §1.4). Runs that were
already ``PE_PARENT`` or lazy keep their flags and resolve through the original's own chain.
"""

from __future__ import annotations

import bisect
import os
import shutil
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from criu_xstate.errors import ApplyError
from criu_xstate.images.framing import encode_image
from criu_xstate.images.pagemap import (
    NO_OFFSET,
    PAGE,
    PE_LAZY,
    PE_PARENT,
    PE_PRESENT,
    PagemapRuns,
    read_pagemap_runs,
    read_pages_id,
    runs_of,
)
from criu_xstate.images.pb import pagemap_pb2
from criu_xstate.records import field, record
from criu_xstate.transaction import Append, ByteEdit, Change, FileWrite


def _entry(vaddr: int, pages: int, flags: int, modern: bool) -> bytes:
    e = pagemap_pb2.pagemap_entry(vaddr=vaddr, flags=flags)
    e.compat_nr_pages = 0 if modern else pages
    if modern:
        e.nr_pages = pages
    data: bytes = e.SerializeToString()
    return data


def _runs(pm: PagemapRuns) -> Iterator[tuple[int, int, int, int | None]]:
    """(vaddr, pages, flags, offset in the pages file or None) per run (contiguous entries merged)."""
    for vaddr, pages, flags, offset in zip(pm.starts, pm.pages, pm.flags, pm.offsets, strict=True):
        yield vaddr, pages, flags, None if offset == NO_OFFSET else offset


@record(frozen=False)
class _Split:
    """A change set sorted by what it does: whole-file writes, edits and appends per pages file."""

    writes: dict[str, FileWrite] = field(default_factory=dict)
    edits: dict[str, list[ByteEdit]] = field(default_factory=lambda: defaultdict(list))
    appends: dict[str, Append] = field(default_factory=dict)

    @classmethod
    def of(cls, changes: list[Change]) -> _Split:
        split = cls()
        for c in changes:
            if isinstance(c, FileWrite):
                split.writes[c.name] = c
            elif isinstance(c, ByteEdit):
                split.edits[c.name].append(c)
            else:
                split.appends[c.name] = c
        return split

    @property
    def touched_pages(self) -> set[str]:
        return set(self.edits) | set(self.appends)


def _owners(src: Path, touched: set[str]) -> dict[str, str]:
    """The pagemap that owns each touched pages file."""
    owners: dict[str, str] = {}
    for pm_path in src.glob("pagemap-*.img"):
        name = f"pages-{read_pages_id(pm_path)}.img"
        if name in touched:
            owners[name] = pm_path.name
    missing = touched - owners.keys()
    if missing:
        raise ApplyError(f"{src}: no pagemap owns {sorted(missing)}")
    return owners


def _link_unchanged(src: Path, out: Path, skip: set[str]) -> None:
    """Every other file of ``src`` into ``out`` (hard links where possible), and ``parent`` -> ``src``."""
    for entry in sorted(src.iterdir()):
        if entry.name in skip or entry.name.startswith(".criu-xstate"):
            continue
        if entry.is_symlink():
            raise ApplyError(f"{entry}: is a symbolic link; refusing to copy what it points to")
        if not entry.is_file():
            continue
        try:
            os.link(entry, out / entry.name)
        except OSError:
            shutil.copy2(entry, out / entry.name)
    os.symlink(os.path.relpath(src.resolve(), out.resolve()), out / "parent")


def _dirty_pages(src_pages: Path, edits: list[ByteEdit], app: Append | None) -> dict[int, bytearray]:
    """File offset of each changed page of the original pages file -> its new bytes."""
    dirty: dict[int, bytearray] = {}
    fd = os.open(src_pages, os.O_RDONLY)
    try:
        original_size = os.fstat(fd).st_size
        for e in edits:
            pos, data = e.offset, memoryview(e.new)
            while data:
                page_off = pos // PAGE * PAGE
                if page_off not in dirty:
                    dirty[page_off] = bytearray(os.pread(fd, PAGE, page_off).ljust(PAGE, b"\0"))
                n = min(len(data), page_off + PAGE - pos)
                dirty[page_off][pos - page_off : pos - page_off + n] = data[:n]
                data, pos = data[n:], pos + n
    finally:
        os.close(fd)
    if app is not None:
        if app.at != original_size:
            raise ApplyError(f"{src_pages}: size changed since the plan")
        for i in range(0, len(app.data), PAGE):
            dirty[original_size + i] = bytearray(app.data[i : i + PAGE].ljust(PAGE, b"\0"))
    return dirty


def _overlay_entries(
    pm: PagemapRuns, dirty: dict[int, bytearray], parent_dirty: Mapping[int, bytes]
) -> tuple[list[bytes], bytearray]:
    """The incremental pagemap's entries and its pages: changed pages PE_PRESENT, the rest PE_PARENT.
    ``parent_dirty`` (page address -> bytes) are changed pages that ``src`` itself takes from its parent.

    Only the changed pages are visited, and contiguous entries were merged into runs when the pagemap
    was decoded: a clean stretch between changed pages is one PE_PARENT entry however many MiB-sized
    entries CRIU wrote for it (``criu restore`` reads a parent's pages across its entry boundaries).
    Work and output grow with the change and the number of mappings, not with the memory."""
    out: list[list[int]] = []  # [vaddr, pages, flags]
    blob = bytearray()
    dirty_offsets = sorted(dirty)
    parent_vaddrs = sorted(parent_dirty)
    for vaddr, pages, flags, offset in _runs(pm):
        if offset is not None:  # present here: changed pages stay, the rest come from `src`
            lo = bisect.bisect_left(dirty_offsets, offset)
            hi = bisect.bisect_left(dirty_offsets, offset + pages * PAGE)
            here = [((o - offset) // PAGE, dirty[o]) for o in dirty_offsets[lo:hi]]
            _split_run(out, blob, vaddr, pages, (PE_PARENT, PE_PRESENT | (flags & PE_LAZY)), here)
        elif flags & PE_PARENT:  # in src's parent: changed pages become present here
            lo = bisect.bisect_left(parent_vaddrs, vaddr)
            hi = bisect.bisect_left(parent_vaddrs, vaddr + pages * PAGE)
            from_parent = [((v - vaddr) // PAGE, parent_dirty[v]) for v in parent_vaddrs[lo:hi]]
            _split_run(out, blob, vaddr, pages, (flags, PE_PRESENT), from_parent)
        else:
            out.append([vaddr, pages, flags])
    return [_entry(v, n, f, pm.modern) for v, n, f in out], blob


def _split_run(
    out: list[list[int]],
    blob: bytearray,
    vaddr: int,
    pages: int,
    flags: tuple[int, int],
    changed: Sequence[tuple[int, bytes | bytearray]],
) -> None:
    """One run of ``pages`` at ``vaddr`` as overlay entries: the pages at the (ascending) indexes of
    ``changed`` with the second flags and their bytes appended to ``blob``, the others with the first."""
    clean, present = flags
    i = 0
    for j, data in changed:
        if j > i:
            out.append([vaddr + i * PAGE, j - i, clean])
        if j == i and i > 0 and out[-1][2] & PE_PRESENT:
            out[-1][1] += 1  # the page right after a changed page of this run
        else:
            out.append([vaddr + j * PAGE, 1, present])
        blob += data
        i = j + 1
    if i < pages:
        out.append([vaddr + i * PAGE, pages - i, clean])


def _pagemap_after(src: Path, pm_name: str, writes: dict[str, FileWrite]) -> PagemapRuns:
    """The pagemap the overlay describes: the change set's (relocation appended a run), or the original.
    Both were decoded already and are remembered by their content."""
    if pm_name not in writes:
        return read_pagemap_runs(src / pm_name)
    return runs_of(writes.pop(pm_name).new, str(src / pm_name))  # append_run remembered it


def write_overlay(
    src: Path, out: Path, changes: list[Change], parent_pages: Mapping[str, Mapping[int, bytes]] = {}
) -> int:
    """Write the translated checkpoint into ``out`` as an incremental image over ``src``.
    ``parent_pages``: pagemap name -> page address -> new bytes of pages ``src`` takes from its parent.

    Returns the number of page bytes written. ``out`` must not exist or be empty.
    """
    if out.exists() and any(out.iterdir()):
        raise ApplyError(f"{out}: exists and is not empty")
    if (src / "parent").exists() is False and (src / "parent").is_symlink():
        raise ApplyError(f"{src}/parent: dangling parent link")
    split = _Split.of(changes)
    owners = _owners(src, split.touched_pages)
    for pm_name in parent_pages:
        owners.setdefault(f"pages-{read_pages_id(src / pm_name)}.img", pm_name)
    out.mkdir(parents=True, exist_ok=True)
    _link_unchanged(src, out, {"parent", *owners, *owners.values(), *split.writes})  # owners: pages files
    written = 0
    for pages_name, pm_name in owners.items():
        pm = _pagemap_after(src, pm_name, split.writes)
        edits, app = split.edits.get(pages_name, []), split.appends.get(pages_name)
        dirty = _dirty_pages(src / pages_name, edits, app) if edits or app else {}
        entries, blob = _overlay_entries(pm, dirty, parent_pages.get(pm_name, {}))
        (out / pm_name).write_bytes(encode_image(pm.head, pm.magic, [pm.head_payload, *entries]))
        (out / pages_name).write_bytes(bytes(blob))
        written += len(blob)
    for name, w in split.writes.items():
        (out / name).write_bytes(w.new)
    return written
