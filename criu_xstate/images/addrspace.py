"""A process's address space as the checkpoint holds it: virtual address -> (pages file, offset).

``pagemap-<pid>.img`` lists runs of pages in address order; the data of runs flagged ``PE_PRESENT``
is concatenated in ``pages-<pages_id>.img`` in the same order. ``PE_PARENT`` runs are read from the
parent checkpoint's address space; ``PE_LAZY`` runs without ``PE_PRESENT`` are not in the image at all
(a lazy-pages daemon serves them) and read as unreadable, never as zeros. Anonymous private pages
that no run covers were never touched and read as zeros.

Reads use ``pread`` on the pages file and binary search over the runs (arrays decoded once by
:mod:`criu_xstate.images.pagemap`): the cost of a read depends on its size and ``log(runs)``, never
on the size of the pages file.
"""

from __future__ import annotations

import bisect
import os
from functools import cached_property
from pathlib import Path

from criu_xstate.errors import ImageError, MemoryUnreadable
from criu_xstate.images.framing import open_image
from criu_xstate.images.pagemap import NO_OFFSET, PAGE, PE_LAZY, PE_PARENT, PE_PRESENT, PagemapRuns
from criu_xstate.images.wire import Message
from criu_xstate.records import record

__all__ = ["PAGE", "PE_LAZY", "PE_PARENT", "PE_PRESENT", "AddressSpace", "Run"]
VMA_AREA_REGULAR = 1 << 0
VMA_FILE_PRIVATE = 1 << 6
VMA_FILE_SHARED = 1 << 7
VMA_ANON_SHARED = 1 << 8
VMA_ANON_PRIVATE = 1 << 9
MAX_READ = 64 << 20
USER_SPACE_END = 1 << 47


@record(slots=True)
class Run:
    """Consecutive pages of one pagemap entry: start, count, flags, place in the pages file."""

    start: int
    pages: int
    flags: int
    file_offset: int | None  # offset in the pages file for PE_PRESENT runs

    @property
    def end(self) -> int:
        return self.start + self.pages * PAGE


class AddressSpace:
    def __init__(
        self,
        directory: Path,
        pagemap: PagemapRuns,
        mm: Message,
        parent: AddressSpace | None = None,
        *,
        pagemap_path: str = "pagemap",
    ) -> None:
        self.dir = directory
        self.parent = parent
        self.pages_path = directory / f"pages-{pagemap.pages_id}.img"
        self.pagemap_path = pagemap_path
        self.vmas = sorted((int(v.start), int(v.end), int(v.status)) for v in mm.vmas)
        self.pagemap = pagemap
        self._starts = pagemap.starts
        self._fd: int | None = None
        present_bytes = pagemap.present_bytes
        if present_bytes:
            if not self.pages_path.exists() and not self.pages_path.is_symlink():
                raise ImageError(self.pages_path, f"missing, but {self.pagemap_path} lists present pages")
            self._fd = open_image(self.pages_path)  # a regular file, not through a link: or one clear error
            size = os.fstat(self._fd).st_size
            if present_bytes > size:
                raise ImageError(
                    self.pagemap_path,
                    f"claims {present_bytes // PAGE} present pages but {self.pages_path.name} holds "
                    f"{size // PAGE} ({size} bytes)",
                )

    def _run(self, i: int) -> Run:
        pm = self.pagemap
        offset = pm.offsets[i]
        return Run(pm.starts[i], pm.pages[i], pm.flags[i], None if offset == NO_OFFSET else offset)

    @cached_property
    def runs(self) -> list[Run]:
        """Every run (contiguous pagemap entries with the same flags are one run)."""
        return [self._run(i) for i in range(len(self._starts))]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _pread(self, offset: int, size: int) -> bytes:
        if self._fd is None:
            self._fd = open_image(self.pages_path)
        try:
            data = os.pread(self._fd, size, offset)
        except OSError as exc:
            raise ImageError(self.pages_path, f"unreadable: {exc.strerror}") from None
        if len(data) != size:
            raise ImageError(self.pages_path, f"truncated: {size} bytes at offset {offset} not there")
        return data

    def run_at(self, vaddr: int) -> Run | None:
        i = bisect.bisect_right(self._starts, vaddr) - 1
        if i >= 0 and vaddr < self._starts[i] + self.pagemap.pages[i] * PAGE:
            return self._run(i)
        return None

    def vma_at(self, vaddr: int) -> tuple[int, int, int] | None:
        i = bisect.bisect_right(self.vmas, (vaddr, USER_SPACE_END * 2, 0)) - 1
        if i >= 0 and self.vmas[i][0] <= vaddr < self.vmas[i][1]:
            return self.vmas[i]
        return None

    def _unreadable(self, vaddr: int, size: int, reason: str) -> MemoryUnreadable:
        return MemoryUnreadable(self.pagemap_path, vaddr, size, reason)

    def read(self, vaddr: int, size: int) -> bytes:
        if size < 0 or size > MAX_READ:
            raise self._unreadable(vaddr, size, f"read of {size} bytes refused (limit {MAX_READ})")
        run = self.run_at(vaddr)
        if run is not None and run.file_offset is not None and vaddr + size <= run.end:
            return self._pread(run.file_offset + (vaddr - run.start), size)  # one run: no copy
        out = bytearray()
        pos = vaddr
        end = vaddr + size
        while pos < end:
            run = self.run_at(pos)
            if run is None:
                nxt = bisect.bisect_right(self._starts, pos)
                chunk_end = min(end, self._starts[nxt] if nxt < len(self._starts) else end)
                chunk_end = max(chunk_end, min(end, (pos // PAGE + 1) * PAGE))
                out += self._hole(pos, chunk_end - pos)
                pos = chunk_end
                continue
            chunk_end = min(end, run.end)
            n = chunk_end - pos
            if run.file_offset is not None:
                out += self._pread(run.file_offset + (pos - run.start), n)
            elif run.flags & PE_PARENT:
                if self.parent is None:
                    raise self._unreadable(pos, n, "page is in the parent images, but there is no parent")
                out += self.parent.read(pos, n)
            elif run.flags & PE_LAZY:
                raise self._unreadable(pos, n, "lazy page not in the image")
            else:
                raise self._unreadable(pos, n, f"pagemap flags 0x{run.flags:x} say the page has no data")
            pos = chunk_end
        return bytes(out)

    def _hole(self, vaddr: int, size: int) -> bytes:
        vma = self.vma_at(vaddr)
        if vma is None or vaddr + size > vma[1]:
            raise self._unreadable(vaddr, size, "not mapped")
        status = vma[2]
        if status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED | VMA_ANON_SHARED):
            raise self._unreadable(vaddr, size, "file-backed or shared page not in the image")
        return bytes(size)  # anonymous private, never touched

    def region_of(self, vaddr: int) -> tuple[int, int] | None:
        vma = self.vma_at(vaddr)
        return (vma[0], vma[1]) if vma else None

    def locate(self, vaddr: int, size: int) -> list[tuple[Path, int, int]]:
        """Where the bytes live in *this* directory's pages file: ``[(path, offset, length)]``.

        Only ``PE_PRESENT`` data can be edited in place; anything else raises.
        """
        out: list[tuple[Path, int, int]] = []
        pos = vaddr
        end = vaddr + size
        while pos < end:
            run = self.run_at(pos)
            if run is None or run.file_offset is None:
                why = "not in this checkpoint's pages file" if run is None else "in the parent images"
                raise self._unreadable(pos, end - pos, f"cannot edit in place: {why}")
            n = min(end, run.end) - pos
            out.append((self.pages_path, run.file_offset + (pos - run.start), n))
            pos += n
        return out

    @property
    def present_bytes(self) -> int:
        return self.pagemap.present_bytes
