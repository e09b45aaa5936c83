"""The only file operations that write into a checkpoint, each relative to the directory's file descriptor.

Every write path (apply --in-place, the hook, undo, apply --out) goes through these few functions so
that one place enforces what docs/journal.md promises:

- names are plain file names of the directory: never a path, never followed through a symlink
  (``O_NOFOLLOW``), never anything but a regular file (a FIFO or device is refused before it can block);
- a file that is also linked elsewhere (``apply --out`` hard-links unchanged images) is copied before
  its first in-place write, so that writing never reaches another checkpoint;
- every syscall that changes the disk passes a named fault point first (:data:`fault_hook`), which the
  crash-test harness uses to kill the writer or inject ENOSPC/EIO at each of them.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress

from criu_xstate.errors import ApplyError

FaultHook = Callable[[str, str], None]

#: Called as ``fault_hook(point, name)`` before every disk-changing syscall; tests install one.
fault_hook: FaultHook | None = None

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+-]{0,254}")
JOURNAL = ".criu-xstate-journal.json"  # the one hidden file criu-xstate keeps (docs/journal.md)
_COPY_CHUNK = 1 << 20
TMP_PREFIX = ".criu-xstate-tmp-"


def _point(point: str, name: str) -> None:
    if fault_hook is not None:
        fault_hook(point, name)


def check_name(name: str) -> str:
    """A plain file name of the directory, or ApplyError: never a path, never hidden, never ``..``."""
    if name != JOURNAL and (not _PLAIN_NAME.fullmatch(name) or name in (".", "..")):
        raise ApplyError(f"refusing to write {name!r}: not an image file of the checkpoint directory")
    return name


class Directory:
    """A checkpoint directory held open (and locked) while it is written."""

    def __init__(self, fd: int, path: str) -> None:
        self.fd = fd
        self.path = path

    def _regular(self, fd: int, name: str) -> os.stat_result:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise ApplyError(f"{self.path}/{name}: not a regular file; refusing to use it")
        return st

    def open_read(self, name: str) -> int | None:
        """fd of a regular file ``name`` for reading, None if it does not exist. Never follows links,
        never blocks on a FIFO."""
        try:
            fd = os.open(check_name(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self.fd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ApplyError(f"{self.path}/{name}: is a symbolic link; refusing to use it") from None
            raise
        self._regular(fd, name)
        return fd

    def exists(self, name: str) -> bool:
        fd = self.open_read(name)
        if fd is None:
            return False
        os.close(fd)
        return True

    def read(self, name: str, max_size: int | None = None) -> bytes | None:
        fd = self.open_read(name)
        if fd is None:
            return None
        try:
            if max_size is not None and os.fstat(fd).st_size > max_size:
                raise ApplyError(f"{self.path}/{name}: larger than {max_size} bytes; refusing to read it")
            return _read_all(fd)
        finally:
            os.close(fd)

    def pread(self, name: str, offset: int, size: int) -> bytes:
        fd = self.open_read(name)
        if fd is None:
            return b""
        try:
            return os.pread(fd, size, offset)
        finally:
            os.close(fd)

    def size(self, name: str) -> int | None:
        fd = self.open_read(name)
        if fd is None:
            return None
        try:
            return os.fstat(fd).st_size
        finally:
            os.close(fd)

    def sha256(self, name: str) -> str | None:
        data = self.read(name)
        if data is None:
            return None
        import hashlib  # OpenSSL's ~3 ms, paid only when a journal is checked or written

        return hashlib.sha256(data).hexdigest()

    def _open_write(self, name: str) -> int:
        """fd for in-place writes; a file linked elsewhere is first replaced by a private copy."""
        fd = os.open(check_name(name), os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=self.fd)
        st = self._regular(fd, name)
        if st.st_nlink > 1:
            os.close(fd)
            self._unshare(name, st)
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW, dir_fd=self.fd)
            self._regular(fd, name)
        return fd

    def _unshare(self, name: str, st: os.stat_result) -> None:
        src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=self.fd)
        try:
            tmp, out = self._create_tmp(name)
            try:
                remaining = st.st_size
                offset = 0
                while remaining > 0:
                    _point("write", tmp)
                    n = os.copy_file_range(src, out, min(remaining, _COPY_CHUNK), offset, offset)
                    if n == 0:
                        break
                    offset += n
                    remaining -= n
                os.fchmod(out, st.st_mode & 0o7777)
                _point("fsync", tmp)
                os.fsync(out)
            except BaseException:
                os.close(out)
                self._discard(tmp)
                raise
            os.close(out)
        finally:
            os.close(src)
        self._rename(tmp, name)

    def _create_tmp(self, name: str) -> tuple[str, int]:
        for _ in range(16):
            tmp = f"{TMP_PREFIX}{os.urandom(6).hex()}-{name}"[:255]
            _point("create", tmp)
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=self.fd)
            except FileExistsError:
                continue
            return tmp, fd
        raise ApplyError(f"{self.path}: cannot create a temporary file")

    def _discard(self, tmp: str) -> None:
        with suppress(OSError):
            os.unlink(tmp, dir_fd=self.fd)

    def _rename(self, tmp: str, name: str) -> None:
        try:
            _point("rename", name)
            os.replace(tmp, name, src_dir_fd=self.fd, dst_dir_fd=self.fd)
        except Exception:
            self._discard(tmp)
            raise
        self.fsync()

    def fsync(self) -> None:
        _point("fsync", ".")
        os.fsync(self.fd)

    def pwrite(self, name: str, offset: int, data: bytes) -> None:
        fd = self._open_write(name)
        try:
            view = memoryview(data)
            pos = offset
            while view:
                _point("pwrite", name)
                n = os.pwrite(fd, view, pos)
                view = view[n:]
                pos += n
            _point("fsync", name)
            os.fsync(fd)
        finally:
            os.close(fd)

    def truncate(self, name: str, size: int) -> None:
        fd = self._open_write(name)
        try:
            _point("truncate", name)
            os.ftruncate(fd, size)
            _point("fsync", name)
            os.fsync(fd)
        finally:
            os.close(fd)

    def replace(self, name: str, data: bytes) -> None:
        """Atomically give ``name`` the content ``data`` (temporary file, fsync, rename, fsync dir)."""
        check_name(name)
        mode = 0o644
        fd = self.open_read(name)
        if fd is not None:
            mode = os.fstat(fd).st_mode & 0o7777
            os.close(fd)
        tmp, out = self._create_tmp(name)
        try:
            view = memoryview(data)
            while view:
                _point("write", tmp)
                n = os.write(out, view)
                view = view[n:]
            os.fchmod(out, mode)
            _point("fsync", tmp)
            os.fsync(out)
        except BaseException:
            os.close(out)
            self._discard(tmp)  # a full disk must not leave half-written files behind
            raise
        os.close(out)
        self._rename(tmp, name)

    def unlink(self, name: str) -> None:
        check_name(name)
        fd = self.open_read(name)  # refuses a non-regular file; a symlink is refused too
        if fd is None:
            return
        os.close(fd)
        _point("unlink", name)
        os.unlink(name, dir_fd=self.fd)
        self.fsync()

    def remove_stale_temporaries(self) -> None:
        """Temporary files of a writer that was killed: never part of the checkpoint."""
        for entry in os.scandir(self.fd):
            if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
                self._discard(entry.name)


def _read_all(fd: int) -> bytes:
    chunks: list[bytes] = []
    while True:
        chunk = os.read(fd, _COPY_CHUNK)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


@contextmanager
def opened_directory(path: str | os.PathLike[str], *, lock: bool) -> Iterator[Directory]:
    """Open ``path`` as a directory; with ``lock``, hold an exclusive ``flock`` on it for the block.

    The lock is on the directory itself: no lock file is left in the user's images directory. A second
    writer (apply, the hook, undo) fails at once with a clear error instead of waiting.
    """
    where = os.fspath(path)
    try:
        fd = os.open(where, os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        raise ApplyError(f"{where}: no such directory") from None
    except NotADirectoryError:
        raise ApplyError(f"{where}: not a directory") from None
    except OSError as exc:
        raise ApplyError(f"{where}: cannot open: {exc.strerror}") from None
    try:
        if lock:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ApplyError(
                    f"{where}: another criu-xstate apply, undo or hook is working on it"
                ) from None
            except OSError as exc:
                raise ApplyError(f"{where}: cannot lock the directory: {exc.strerror}") from None
        yield Directory(fd, where)
    finally:
        os.close(fd)
