"""Extracting container checkpoint archives (Podman ``--export``, CRI-O, kubelet) as hostile input.

The tar stream is parsed here, one 512-byte header at a time, instead of by :mod:`tarfile`, which reads
a pax header or a GNU long name of any declared size into memory (a 98 KB zstd archive declaring a 3 GiB
pax header took 3.2 GB and ended in MemoryError). Nothing is kept per member but a 16-byte digest of its
name (duplicates are refused); every size that steers an allocation is bounded before it is read. Only
regular ``checkpoint/*.img`` (and ``stats-*``) members and the container metadata are written, into a
private directory, with all-zero blocks left as holes: a zero-filled member costs time, not disk.
Refused, with one line naming the member or the limit: absolute paths, ``..``, links, devices and FIFOs
under ``checkpoint/``, sparse members anywhere, duplicate names, more than :attr:`Limits.members`
headers, more image bytes than :attr:`Limits.image_bytes` or than the temporary directory has free.
docs/hostile-input.md gives the reason for each limit.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from criu_xstate.errors import ImageError
from criu_xstate.images.container import ARCHIVE_META_DIR, MAX_META_BYTES, META_FILES
from criu_xstate.records import record

BLOCK = 512
ARCHIVE_IMAGES = "checkpoint"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
GZIP_MAGIC = b"\x1f\x8b"
UNSUPPORTED_MAGICS = {b"\xfd7zXZ\x00": "xz", b"BZh": "bzip2", b"\x04\x22\x4d\x18": "lz4"}
ZSTD_MAX_WINDOW = 1 << 27  # zstd's own default decoder limit: a frame cannot ask for more memory
CHUNK = 1 << 20
ZEROS = bytes(CHUNK)
ENV_IMAGE_BYTES = "CRIU_XSTATE_MAX_EXTRACT"


@record
class Limits:
    """Bounds on what extracting one archive may take."""

    room: int  # bytes the temporary directory's filesystem may take (free space minus a margin)
    members: int = 1 << 16  # headers of every kind; a Podman export has a handful plus the images
    image_bytes: int = 64 << 30  # bytes declared by the image members (see also ``room``)
    meta_bytes: int = 1 << 16  # one GNU long name or pax header
    name_bytes: int = 4096  # PATH_MAX

    @property
    def stream_bytes(self) -> int:
        """The whole unpacked tar stream, skipped members included: bounds the time of a zero bomb
        (16 GiB of zeros are ~0.5 MB of zstd and take ~0.8 s to skip)."""
        return 4 * self.image_bytes


def image_bytes_from_env() -> int:
    """``CRIU_XSTATE_MAX_EXTRACT`` (bytes), else the default image byte budget."""
    raw = os.environ.get(ENV_IMAGE_BYTES)
    if raw is None:
        return Limits.image_bytes
    if not raw.isdigit() or len(raw) > 20:
        raise ImageError(None, f"{ENV_IMAGE_BYTES}={raw[:40]!r} is not a byte count")
    return int(raw)


class _Reader(Protocol):
    def read(self, size: int, /) -> bytes: ...


def sniff(head: bytes) -> str | None:
    """``zstd``, ``gzip`` or ``tar`` from the first bytes of a file, or None."""
    if head.startswith(ZSTD_MAGIC):
        return "zstd"
    if head.startswith(GZIP_MAGIC):
        return "gzip"
    if len(head) >= BLOCK and head[257:262] == b"ustar":
        return "tar"
    return None


class _Stream:
    """The decompressed tar stream: exact reads, skips, and the offset for error messages."""

    def __init__(self, reader: _Reader, path: Path, limit: int) -> None:
        self._reader = reader
        self.path = path
        self.offset = 0
        self.limit = limit

    def read(self, size: int) -> bytes:
        if self.offset + size > self.limit:
            raise ImageError(
                self.path,
                f"the archive unpacks to more than {self.limit} bytes (4 x the extraction limit; "
                f"{ENV_IMAGE_BYTES} raises it)",
            )
        parts: list[bytes] = []
        want = size
        while want:
            chunk = self._reader.read(min(want, CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            want -= len(chunk)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def read_exact(self, size: int, what: str) -> bytes:
        data = self.read(size)
        if len(data) != size:
            raise ImageError(self.path, f"truncated archive: {what} needs {size} bytes, {len(data)} left")
        return data

    def copy(self, size: int, sink: Callable[[bytes], None] | None, what: str) -> None:
        """Pass ``size`` bytes (and the padding to the next block) to ``sink``, or skip them."""
        left = size
        while left:
            chunk = self.read(min(left, CHUNK))
            if not chunk:
                raise ImageError(self.path, f"truncated archive: {what} ends {left} bytes early")
            if sink is not None:
                sink(chunk)
            left -= len(chunk)
        self.read_exact(-size % BLOCK, f"padding of {what}")


def _decompressor(fd: int, path: Path, fmt: str) -> tuple[_Reader, Any]:
    raw = os.fdopen(fd, "rb", buffering=CHUNK)
    if fmt == "tar":
        return raw, raw
    if fmt == "gzip":
        return gzip.GzipFile(fileobj=raw, mode="rb"), raw
    try:
        import zstandard  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        raw.close()
        raise ImageError(
            path, "zstd archive: install the 'zstandard' module (pip install zstandard)"
        ) from None
    dctx = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW)
    return dctx.stream_reader(raw, read_across_frames=True), raw


def _number(field: bytes, what: str, stream: _Stream) -> int:
    """A tar numeric field: octal text, or GNU base-256 (high bit of the first byte set)."""
    if field[:1] == b"\xff":
        raise ImageError(stream.path, f"corrupted archive: negative {what} at offset {stream.offset}")
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip(b" ")
    if not text:
        return 0
    if text.strip(b"01234567"):
        raise ImageError(stream.path, f"corrupted archive: {what} {text[:24]!r} at offset {stream.offset}")
    return int(text, 8)


def _checksum_ok(header: bytes) -> bool:
    stored = header[148:156].split(b"\0", 1)[0].strip(b" ")
    if not stored or stored.strip(b"01234567"):
        return False
    blanked = header[:148] + b" " * 8 + header[156:]
    unsigned = sum(blanked)
    signed = unsigned - 256 * sum(1 for b in blanked if b > 127)
    return int(stored, 8) in (unsigned, signed)


def _pax_records(data: bytes, stream: _Stream) -> dict[str, str]:
    """``"<len> key=value\\n"`` records of a pax extended header."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(data) and data[pos:].strip(b"\0"):
        space = data.find(b" ", pos, pos + 12)
        length_text = data[pos:space] if space > pos else b""
        if not length_text.isdigit() or not 0 < int(length_text) <= len(data) - pos:
            raise ImageError(stream.path, f"corrupted archive: bad pax record near offset {stream.offset}")
        record = data[space + 1 : pos + int(length_text)]
        key, eq, value = record.rstrip(b"\n").partition(b"=")
        if not eq:
            raise ImageError(stream.path, f"corrupted archive: pax record without '=' near {stream.offset}")
        out[key.decode("utf-8", "replace")] = value.decode("utf-8", "surrogateescape")
        pos += int(length_text)
    return out


@record(frozen=False)
class _Member:
    """One tar member as the header walk saw it."""

    name: str
    kind: bytes
    size: int
    sparse: bool


@record(frozen=False)
class _Pending:
    """What GNU ``L`` and pax ``x`` headers say about the next member."""

    name: str | None = None
    size: int | None = None
    sparse: bool = False


def _meta(stream: _Stream, limits: Limits, size: int, what: str) -> bytes:
    if size > limits.meta_bytes:
        raise ImageError(stream.path, f"{what} of {size} bytes (limit {limits.meta_bytes})")
    data = stream.read_exact(size, what)
    stream.read_exact(-size % BLOCK, f"padding of {what}")
    return data


def _apply_meta(kind: bytes, data: bytes, pending: _Pending, stream: _Stream) -> None:
    if kind == b"L":
        pending.name = data.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        return
    if kind == b"K":
        return  # a long link target: links are refused or skipped anyway
    records = _pax_records(data, stream)
    if any(k.startswith("GNU.sparse") for k in records):
        pending.sparse = True
    if kind == b"g" and records.keys() & {"path", "linkpath", "size"}:
        # tarfile (which rewrites archives for apply) would rename or resize every later member
        raise ImageError(stream.path, "a global pax header sets the path or size of every member")
    if kind == b"x":
        if "path" in records:
            pending.name = records["path"]
        if "size" in records:
            text = records["size"]
            if not text.isdigit() or len(text) > 20:
                raise ImageError(stream.path, f"corrupted archive: pax size {text[:24]!r}")
            pending.size = int(text)


def _members(stream: _Stream, limits: Limits) -> Iterator[_Member]:
    """Yield each member (long names and pax headers applied) with its data still to be read."""
    pending = _Pending()
    for count in range(limits.members + 1):
        if count == limits.members:
            raise ImageError(stream.path, f"more than {limits.members} members: not a checkpoint archive")
        at = stream.offset
        header = stream.read(BLOCK)
        if not header or header == ZEROS[:BLOCK]:
            return  # end of archive (a missing end marker is tolerated, like tar does)
        if len(header) < BLOCK:
            raise ImageError(stream.path, f"truncated archive: partial header at offset {at}")
        if not _checksum_ok(header):
            raise ImageError(stream.path, f"corrupted archive: bad header checksum at offset {at}")
        kind = header[156:157]
        size = _number(header[124:136], "size", stream)
        if kind in (b"L", b"K", b"x", b"g"):
            _apply_meta(kind, _meta(stream, limits, size, f"header at offset {at}"), pending, stream)
            continue
        name = pending.name if pending.name is not None else _ustar_name(header)
        member = _Member(name, kind, pending.size if pending.size is not None else size, pending.sparse)
        member.sparse |= kind == b"S"
        pending = _Pending()
        yield member


def _ustar_name(header: bytes) -> str:
    name = header[:100].split(b"\0", 1)[0]
    if header[257:265] == b"ustar\x0000":
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")


REGULAR = (b"0", b"\0", b"7")
LINKS = (b"1", b"2")
DEVICES = {b"3": "a character device", b"4": "a block device", b"6": "a FIFO"}


def _checked_parts(m: _Member, path: Path, limits: Limits, seen: set[bytes]) -> list[str]:
    """The member's path components; refuse long, escaping, duplicate or sparse members."""
    if len(m.name.encode("utf-8", "surrogateescape")) > limits.name_bytes:
        raise ImageError(path, f"member name of more than {limits.name_bytes} bytes")
    name = PurePosixPath(m.name)
    if not m.name or name.is_absolute() or ".." in name.parts:
        raise ImageError(path, f"member {m.name!r} points outside the archive")
    parts = [p for p in name.parts if p != "."]
    digest = hashlib.blake2b("/".join(parts).encode("utf-8", "surrogateescape"), digest_size=16).digest()
    if digest in seen:
        raise ImageError(path, f"archive holds {m.name!r} twice")
    seen.add(digest)
    if m.sparse:
        raise ImageError(path, f"member {m.name!r} is a sparse file: CRIU never writes one")
    return parts


def _target(m: _Member, path: Path, limits: Limits, seen: set[bytes]) -> str | None:
    """Where under the extraction directory ``m`` goes (an image, or container metadata), or None."""
    parts = _checked_parts(m, path, limits, seen)
    if len(parts) == 1 and parts[0] in META_FILES and m.kind in REGULAR and m.size <= MAX_META_BYTES:
        return f"{ARCHIVE_META_DIR}/{parts[0]}"
    if len(parts) < 2 or parts[0] != ARCHIVE_IMAGES:
        return None
    if m.kind in LINKS:
        if parts[-1] == "parent":
            raise ImageError(
                path, f"member {m.name!r}: incremental (parent) images inside archives are not supported"
            )
        raise ImageError(path, f"member {m.name!r} is a link; refusing to follow it")
    if m.kind == b"5":
        return None
    if m.kind not in REGULAR:
        what = DEVICES.get(m.kind, f"of tar type {m.kind!r}")
        raise ImageError(path, f"member {m.name!r} is {what}, not a regular file")
    if len(parts) != 2 or not (parts[1].endswith(".img") or parts[1].startswith("stats-")):
        return None  # nested directories under checkpoint/ hold no images
    return parts[1]


class _Budget:
    """Bytes declared by the extracted members against the limit and the room of the filesystem."""

    def __init__(self, path: Path, limits: Limits) -> None:
        self.path = path
        self.limits = limits
        self.declared = 0

    def reserve(self, m: _Member) -> None:
        total = self.declared + m.size
        if total > self.limits.image_bytes:
            raise ImageError(
                self.path,
                f"member {m.name!r} takes the images past the {self.limits.image_bytes}-byte extraction "
                f"limit ({ENV_IMAGE_BYTES} raises it)",
            )
        if total > self.limits.room:
            left = max(0, self.limits.room - self.declared)
            raise ImageError(
                self.path, f"member {m.name!r} needs {m.size} bytes, {left} are free for extraction"
            )
        self.declared = total


def _write_member(stream: _Stream, dest: Path, m: _Member) -> None:
    try:
        dest.parent.mkdir(exist_ok=True)
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ImageError(dest, f"cannot extract: {exc.strerror}") from None

    def sink(chunk: bytes) -> None:
        if chunk == ZEROS[: len(chunk)]:
            os.lseek(fd, len(chunk), os.SEEK_CUR)  # a hole: zero pages cost no disk
        else:
            os.write(fd, chunk)

    try:
        stream.copy(m.size, sink, f"member {m.name!r}")
        os.ftruncate(fd, m.size)
    except OSError as exc:
        raise ImageError(dest, f"cannot extract: {exc.strerror}") from None
    finally:
        os.close(fd)


def _extract_stream(stream: _Stream, into: Path, limits: Limits) -> int:
    seen: set[bytes] = set()
    budget = _Budget(stream.path, limits)
    images = 0
    for m in _members(stream, limits):
        target = _target(m, stream.path, limits, seen)
        if target is None:
            stream.copy(m.size, None, f"member {m.name!r}")
            continue
        budget.reserve(m)
        _write_member(stream, into / target, m)
        images += "/" not in target
    return images


def _stream_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [OSError, EOFError, zlib.error, ValueError]
    try:
        import zstandard
    except ImportError:
        return tuple(errors)
    return (*errors, zstandard.ZstdError)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def extract(path: Path, fmt: str, into: Path, limits: Limits) -> int:
    """Extract the images (and container metadata) of the ``fmt`` archive ``path`` into ``into``.

    Returns the number of images written. ``into`` must exist and be private."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ImageError(path, f"unreadable: {exc.strerror}") from None
    reader, raw = _decompressor(fd, path, fmt)
    try:
        return _extract_stream(_Stream(reader, path, limits.stream_bytes), into, limits)
    except _stream_errors() as exc:
        raise ImageError(path, f"corrupted {fmt} archive: {_first_line(exc)!r}") from None
    finally:
        if reader is not raw:
            reader.close()  # type: ignore[attr-defined]
        raw.close()
