"""Checkpoint sources: an images directory with its ``parent`` chain, or a container checkpoint archive.

Archives (Podman ``--export``, CRI-O, kubelet: ``.tar``, ``.tar.gz``, ``.tar.zst``) keep the CRIU images
under ``checkpoint/``. Only the image files are extracted, into a private temporary directory, and
every member is checked first: no absolute paths, no ``..``, no links, devices or FIFOs, bounded sizes.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path, PurePosixPath
from typing import IO, Any

from criu_xstate.errors import ImageError
from criu_xstate.images import framing
from criu_xstate.images.addrspace import AddressSpace
from criu_xstate.images.pb import core_pb2, cpuinfo_pb2, inventory_pb2, mm_pb2, pstree_pb2

MAX_PARENT_DEPTH = 64
ARCHIVE_IMAGES = "checkpoint"
MAX_ARCHIVE_MEMBER = 64 << 30


class Checkpoint:
    """One images directory (and, through ``parent``, the chain of incremental dumps below it)."""

    def __init__(self, directory: Path, *, source: str | None = None, depth: int = 0) -> None:
        self.dir = directory
        self.source = source or str(directory)
        self._depth = depth
        if not directory.is_dir():
            raise ImageError(directory, "not a directory of CRIU images")
        if not (directory / "inventory.img").is_file():
            raise ImageError(directory / "inventory.img", "missing: not a CRIU images directory")
        self._cores: dict[int, core_pb2.core_entry] = {}
        self._mms: dict[int, mm_pb2.mm_entry] = {}
        self._pagemaps: dict[int, framing.Pagemap] = {}
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

    def inventory(self) -> inventory_pb2.inventory_entry:
        return framing.read_single(
            self.dir / "inventory.img", framing.INVENTORY, inventory_pb2.inventory_entry
        )

    def pstree(self) -> list[pstree_pb2.pstree_entry]:
        img = framing.read_messages(self.dir / "pstree.img", framing.PSTREE, pstree_pb2.pstree_entry)
        if not img.entries:
            raise ImageError(self.dir / "pstree.img", "no processes")
        return list(img.entries)

    def core(self, tid: int) -> core_pb2.core_entry:
        if tid not in self._cores:
            path = self.dir / f"core-{tid}.img"
            self._cores[tid] = framing.read_single(path, framing.CORE, core_pb2.core_entry)
        return self._cores[tid]

    def mm(self, pid: int) -> mm_pb2.mm_entry:
        if pid not in self._mms:
            self._mms[pid] = framing.read_single(self.dir / f"mm-{pid}.img", framing.MM, mm_pb2.mm_entry)
        return self._mms[pid]

    def pagemap(self, pid: int) -> framing.Pagemap:
        if pid not in self._pagemaps:
            self._pagemaps[pid] = framing.read_pagemap(self.dir / f"pagemap-{pid}.img")
        return self._pagemaps[pid]

    def cpuinfo(self) -> cpuinfo_pb2.cpuinfo_x86_entry | None:
        path = self.dir / "cpuinfo.img"
        if not path.exists():
            return None
        entry = framing.read_single(path, framing.CPUINFO, cpuinfo_pb2.cpuinfo_entry)
        return entry.x86_entry[0] if entry.x86_entry else None

    def address_space(self, pid: int) -> AddressSpace:
        if pid not in self._spaces:
            parent = self.parent
            parent_space = None
            if parent is not None and (parent.dir / f"pagemap-{pid}.img").exists():
                parent_space = parent.address_space(pid)
            self._spaces[pid] = AddressSpace(self.dir, self.pagemap(pid), self.mm(pid), parent_space)
        return self._spaces[pid]

    def close(self) -> None:
        for space in self._spaces.values():
            space.close()
        if self.parent is not None:
            self.parent.close()


def _safe_member(m: tarfile.TarInfo, archive: str) -> PurePosixPath | None:
    """The member's path under ``checkpoint/`` if it is an image file we need; refuse hostile ones."""
    name = PurePosixPath(m.name)
    if name.is_absolute() or ".." in name.parts:
        raise ImageError(archive, f"member {m.name!r} points outside the archive")
    parts = [p for p in name.parts if p != "."]
    if not parts or parts[0] != ARCHIVE_IMAGES or len(parts) < 2:
        return None
    rel = PurePosixPath(*parts[1:])
    if m.issym() or m.islnk():
        if rel.name == "parent":
            raise ImageError(
                archive, f"member {m.name!r}: incremental (parent) images inside archives are not supported"
            )
        raise ImageError(archive, f"member {m.name!r} is a link; refusing to follow it")
    if m.isdir():
        return None
    if not m.isreg():
        raise ImageError(archive, f"member {m.name!r} is not a regular file")
    if len(rel.parts) != 1:
        return None  # nested directories under checkpoint/ are not images
    if m.size > MAX_ARCHIVE_MEMBER:
        raise ImageError(archive, f"member {m.name!r} is {m.size} bytes")
    if not (rel.name.endswith(".img") or rel.name.startswith("stats-")):
        return None
    return rel


def _open_archive(path: Path) -> tuple[tarfile.TarFile, IO[bytes] | None]:
    name = path.name
    try:
        if name.endswith((".tar.zst", ".tzst")):
            try:
                import zstandard  # type: ignore[import-not-found,unused-ignore]
            except ImportError:
                raise ImageError(
                    path, "zstd archive: install the 'zstandard' module (pip install zstandard)"
                ) from None
            raw = path.open("rb")
            stream: Any = zstandard.ZstdDecompressor().stream_reader(raw)
            return tarfile.open(fileobj=stream, mode="r|"), raw
        return tarfile.open(path, mode="r:*"), None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ImageError(path, f"not a readable checkpoint archive: {exc}") from None


def extract_archive(path: Path, into: Path) -> None:
    """Extract the CRIU images of a checkpoint archive into ``into`` (already created, private)."""
    tar, raw = _open_archive(path)
    found = 0
    try:
        with tar:
            for m in tar:
                rel = _safe_member(m, str(path))
                if rel is None:
                    continue
                src = tar.extractfile(m)
                if src is None:
                    continue
                dest = into / rel.name
                with src, dest.open("xb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                found += 1
    except (tarfile.TarError, OSError, EOFError, io.UnsupportedOperation) as exc:
        if isinstance(exc, FileExistsError):
            raise ImageError(path, f"archive holds {exc.filename} twice") from None
        raise ImageError(path, f"corrupted archive: {exc}") from None
    finally:
        if raw is not None:
            raw.close()
    if not found:
        raise ImageError(path, f"no CRIU images under {ARCHIVE_IMAGES}/ in the archive")


def is_archive(path: Path) -> bool:
    return path.is_file() and path.name.endswith((".tar", ".tar.gz", ".tgz", ".tar.zst", ".tzst"))


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
        raise ImageError(path, "neither an images directory nor a .tar/.tar.gz/.tar.zst checkpoint archive")
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
        shutil.rmtree(tmp, ignore_errors=True)
