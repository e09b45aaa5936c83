"""Checkpoint sources: an images directory with its ``parent`` chain, or a container checkpoint archive.

Archives (Podman ``--export``, CRI-O, kubelet: ``.tar``, ``.tar.gz``, ``.tar.zst``) keep the CRIU images
under ``checkpoint/``. Only the image files are extracted, into a private temporary directory, and
every member is checked first: no absolute paths, no ``..``, no links, devices or FIFOs, bounded sizes.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from criu_xstate.errors import ImageError
from criu_xstate.images import framing
from criu_xstate.images.addrspace import AddressSpace
from criu_xstate.images.pagemap import PagemapRuns, read_pagemap_runs
from criu_xstate.images.wire import Message

if TYPE_CHECKING:  # archives and container metadata are imported when a command meets them: a plan of
    import tarfile  # an images directory does not pay for tarfile, hashlib and tempfile at start-up

    from criu_xstate.images.container import ContainerMeta

MAX_PARENT_DEPTH = 64
# Linux maps at most vm.max_map_count areas per process (65,530 by default, 262,144 where databases ask
# for more). Each area costs ~450 bytes once decoded and indexed: the limit is ~0.5 GB and ~4 s; a 64 MiB
# mm entry would otherwise hold 2.4 million (1.1 GB, 8 s).
MAX_VMAS = 1 << 20
ARCHIVE_IMAGES = "checkpoint"  # archive.ARCHIVE_IMAGES (a test checks they agree)


class Checkpoint:
    """One images directory (and, through ``parent``, the chain of incremental dumps below it)."""

    def __init__(self, directory: Path, *, source: str | None = None, depth: int = 0) -> None:
        self.dir = directory
        self.source = source or str(directory)
        self._depth = depth
        if not directory.is_dir():
            raise ImageError(directory, "not a directory of CRIU images")
        if not os.path.lexists(directory / "inventory.img"):
            raise ImageError(directory / "inventory.img", "missing: not a CRIU images directory")
        os.close(framing.open_image(directory / "inventory.img"))  # a regular file, not a link or FIFO
        self._mms: dict[int, Message] = {}
        self._spaces: dict[int, AddressSpace] = {}

    def path_of(self, name: str) -> Path:
        return self.dir / name

    @cached_property
    def parent(self) -> Checkpoint | None:
        link = self.dir / "parent"
        if not link.exists() and not link.is_symlink():
            return None
        if self._depth >= MAX_PARENT_DEPTH:
            raise ImageError(link, f"parent chain deeper than {MAX_PARENT_DEPTH} (a loop?)")
        target = link.resolve()
        if not target.is_dir():
            raise ImageError(link, f"parent link points to {target}, which is not a directory")
        return Checkpoint(target, depth=self._depth + 1)

    def inventory(self) -> Message:
        return framing.read_single(self.dir / "inventory.img", framing.INVENTORY, framing.INVENTORY_ENTRY)

    def pstree(self) -> list[Message]:
        img = framing.read_messages(self.dir / "pstree.img", framing.PSTREE, framing.PSTREE_ENTRY)
        if not img.entries:
            raise ImageError(self.dir / "pstree.img", "no processes")
        return list(img.entries)

    def core(self, tid: int, *, compiled: bool = False) -> Message:
        """Read and decoded on every call, not kept: the model reads each core once and keeps what it
        needs; 4000 decoded cores kept alive cost a 4000-thread plan ~90 ms of collector passes.
        ``compiled``: decoded by protobuf's upb instead of wire (the model's choice for a checkpoint of
        many threads, model.COMPILED_CORES_FROM): the same fields and errors, another type."""
        path = self.dir / f"core-{tid}.img"
        if compiled:
            entry: Message = framing.read_single_compiled(path, framing.CORE, framing.CORE_ENTRY)
            return entry
        return framing.read_single(path, framing.CORE, framing.CORE_ENTRY)

    def mm(self, pid: int) -> Message:
        if pid not in self._mms:
            path = self.dir / f"mm-{pid}.img"
            raw = framing.read_raw(path, framing.MM, max_entries=1)
            # An area takes two bytes at least (its tag and its length): only an entry larger than that
            # may hold too many, and they are counted before ~4 s of decoding them (test_image_bombs);
            # count_field counts what decode reads (tests/test_wire.py).
            if len(raw.payloads) == 1 and len(raw.payloads[0]) > 2 * MAX_VMAS:
                areas = framing.field_count(raw.payloads[0], framing.MM_ENTRY, "vmas", raw.path)
                if areas > MAX_VMAS:
                    raise ImageError(path, f"{areas} memory areas (limit {MAX_VMAS})")
            self._mms[pid] = framing.single_entry(raw, framing.MM_ENTRY)
        return self._mms[pid]

    def runs(self, pid: int) -> PagemapRuns:
        """The pagemap as compact runs, decoded once (remembered by content)."""
        return read_pagemap_runs(self.dir / f"pagemap-{pid}.img")

    def cpuinfo(self) -> Message | None:
        path = self.dir / "cpuinfo.img"
        if not os.path.lexists(path):  # a dangling link is refused by open_image, not ignored
            return None
        entry = framing.read_single(path, framing.CPUINFO, framing.CPUINFO_ENTRY)
        return entry.x86_entry[0] if entry.x86_entry else None

    def address_space(self, pid: int, mm: Message | None = None) -> AddressSpace:
        """The process's memory as this checkpoint and its parents hold it. A parent is read with the
        child's mappings (``mm``): CRIU restores the final dump's VMAs and takes only pages from the
        parent, and a pre-dump writes no mm-<pid>.img at all (measured: criu pre-dump in a QEMU guest)."""
        if pid not in self._spaces:
            mm = mm if mm is not None else self.mm(pid)
            parent = self.parent
            parent_space = None
            if parent is not None and os.path.lexists(parent.dir / f"pagemap-{pid}.img"):
                parent_space = parent.address_space(pid, mm)
            self._spaces[pid] = AddressSpace(
                self.dir,
                self.runs(pid),
                mm,
                parent_space,
                pagemap_path=str(self.dir / f"pagemap-{pid}.img"),
            )
        return self._spaces[pid]

    def container(self) -> ContainerMeta | None:
        """Podman / CRI-O metadata (config.dump, spec.dump) when the checkpoint came with it."""
        from criu_xstate.images.container import read_container_meta

        return read_container_meta(self.dir)

    def close(self) -> None:
        for space in self._spaces.values():
            space.close()
        if self.parent is not None:
            self.parent.close()


MAX_ARCHIVE_MEMBERS = 1 << 16  # a container checkpoint has a few hundred; each costs a header to read
FREE_SPACE_MARGIN = 64 << 20


def archive_format(path: Path) -> str:
    """'zstd', 'gzip' or 'tar', from the first bytes (Podman writes zstd whatever the file is named)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(path, f"unreadable: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ImageError(path, "not a regular file")
        head = os.pread(fd, 512, 0)
    finally:
        os.close(fd)
    from criu_xstate.images import archive

    fmt = archive.sniff(head)
    if fmt is None:
        known = next((n for m, n in archive.UNSUPPORTED_MAGICS.items() if head.startswith(m)), None)
        why = f"{known} compression is not supported" if known else "neither zstd, gzip nor tar content"
        raise ImageError(path, f"not a checkpoint archive ({why})")
    return fmt


def _open_archive(path: Path) -> tuple[tarfile.TarFile, IO[bytes]]:
    """A streaming reader (members are read once, in order, and never all kept in memory)."""
    import tarfile

    fmt = archive_format(path)
    raw = path.open("rb")
    try:
        if fmt == "zstd":
            import zstandard

            stream: Any = zstandard.ZstdDecompressor().stream_reader(raw)
            return tarfile.open(fileobj=stream, mode="r|"), raw
        return tarfile.open(fileobj=raw, mode="r|gz" if fmt == "gzip" else "r|"), raw
    except (tarfile.TarError, OSError, EOFError) as exc:
        raw.close()
        raise ImageError(path, f"not a readable checkpoint archive: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _room(into: Path) -> int:
    st = os.statvfs(into)
    return max(0, st.f_bavail * st.f_frsize - FREE_SPACE_MARGIN)


def extract_archive(path: Path, into: Path) -> None:
    """Extract the CRIU images of a checkpoint archive into ``into`` (already created, private).

    One streaming pass (:mod:`criu_xstate.images.archive`): at most MAX_ARCHIVE_MEMBERS headers, and the
    images may not declare more than the free space of ``into``'s filesystem (checked before each member
    is written) nor more than ``CRIU_XSTATE_MAX_EXTRACT`` bytes (64 GiB by default).
    """
    from criu_xstate.images import archive

    fmt = archive_format(path)
    limits = archive.Limits(
        room=_room(into), members=MAX_ARCHIVE_MEMBERS, image_bytes=archive.image_bytes_from_env()
    )
    if not archive.extract(path, fmt, into, limits):
        raise ImageError(path, f"no CRIU images under {ARCHIVE_IMAGES}/ in the archive")


def is_archive(path: Path) -> bool:
    """Any regular file given as a checkpoint is taken for an archive; its content decides the format."""
    return path.is_file()


@contextlib.contextmanager
def open_checkpoint(path: Path) -> Iterator[Checkpoint]:
    """An images directory or a checkpoint archive, as a :class:`Checkpoint` (archives are extracted)."""
    if not path.exists():
        raise ImageError(path, "no such file or directory")
    if path.is_dir():
        ck = Checkpoint(path)
        try:
            yield ck
        finally:
            ck.close()
        return
    if not is_archive(path):
        raise ImageError(path, "neither an images directory nor a checkpoint archive (tar, gzip or zstd)")
    import shutil  # archives only: the hook's directories do without (~3 ms of imports)
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="criu-xstate-"))
    try:
        os.chmod(tmp, stat.S_IRWXU)
        extract_archive(path, tmp)
        ck = Checkpoint(tmp, source=str(path))
        try:
            yield ck
        finally:
            ck.close()
    finally:
        with _signals_held():  # a second SIGTERM must not cut the removal short: it waits for the end
            shutil.rmtree(tmp, ignore_errors=True)


CLEANUP_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGINT}


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Termination signals stay pending (not lost) for the duration, then are delivered as usual."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, CLEANUP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
