"""CRIU image framing: ``IMAGE ::= [COMMON|SERVICE magic] TYPE-magic {u32 size, payload}``.

``inventory.img`` has no head magic; raw images (``pages-*.img``) have no header at all and are never
read through this module. Every size is checked against the bytes that are really there, and each
entry is bounded, so a hostile image gives one clear :class:`ImageError` naming the file. Entries are
decoded by :mod:`criu_xstate.images.wire`; :mod:`criu_xstate.images.rewrite` decodes them with protobuf
for the commands that write images.
"""

from __future__ import annotations

import errno
import os
import stat
import struct
from pathlib import Path
from typing import Any, Generic, TypeVar

from criu_xstate.errors import ImageError
from criu_xstate.images import wire
from criu_xstate.records import record

IMG_COMMON_MAGIC = 0x54564319
IMG_SERVICE_MAGIC = 0x55105940
MAX_IMAGE_BYTES = 256 << 20  # no image CRIU writes (pages aside) comes near this
MAX_ENTRY_BYTES = 64 << 20
# Entries per image: a pstree has one per task, a pagemap one per run of pages (a few thousand for
# large processes). Each decoded entry costs ~600 bytes of Python objects: 1,048,576 of them ~0.8 GB
# and ~6 s. Without it, a 40 MB core image of empty entries took 34 s and 5.6 GB before it was refused.
MAX_ENTRIES = 1 << 20
# Pagemap images decoded in this process, either way (tests count the decodes of one command).
PAGEMAP_DECODES = 0


@record
class ImageKind:
    """A kind of image file: its name and the magic numbers it starts with."""

    name: str
    magic: int
    head: int | None  # IMG_COMMON_MAGIC, or None for inventory


INVENTORY = ImageKind("inventory", 0x58313116, None)
PSTREE = ImageKind("pstree", 0x50273030, IMG_COMMON_MAGIC)
CORE = ImageKind("core", 0x55053847, IMG_COMMON_MAGIC)
MM = ImageKind("mm", 0x57492820, IMG_COMMON_MAGIC)
PAGEMAP = ImageKind("pagemap", 0x56084025, IMG_COMMON_MAGIC)
CPUINFO = ImageKind("cpuinfo", 0x61404013, IMG_COMMON_MAGIC)

M = TypeVar("M", bound=wire.Message)


@record
class RawImage:
    """An image split into its framing: the magics and each entry's payload bytes."""

    path: str
    head: int | None
    magic: int
    payloads: tuple[bytes, ...]

    def encode(self) -> bytes:
        return encode_image(self.head, self.magic, self.payloads)


def encode_image(head: int | None, magic: int, payloads: tuple[bytes, ...] | list[bytes]) -> bytes:
    parts = [] if head is None else [struct.pack("<I", head)]
    parts.append(struct.pack("<I", magic))
    for p in payloads:
        parts.append(struct.pack("<I", len(p)))
        parts.append(p)
    return b"".join(parts)


def split_header(data: bytes, kind: ImageKind, path: str) -> tuple[int | None, int, int]:
    """(head magic, image magic, offset of the first entry) of ``data`` as an image of ``kind``."""
    if not data:
        raise ImageError(path, "empty file (not a CRIU image)")
    head: int | None = None
    pos = 0
    if kind.head is not None:
        head = _u32(data, pos, path, "head magic")
        pos += 4
        if head not in (IMG_COMMON_MAGIC, IMG_SERVICE_MAGIC):
            raise ImageError(path, f"head magic 0x{head:08x} is not a CRIU image magic")
    magic = _u32(data, pos, path, "image magic")
    if magic != kind.magic:
        raise ImageError(path, f"magic 0x{magic:08x} is not the {kind.name} image magic 0x{kind.magic:08x}")
    return head, magic, pos + 4


def _u32(data: bytes, pos: int, path: str, what: str) -> int:
    if pos + 4 > len(data):
        raise ImageError(path, f"truncated: {what} at offset {pos} needs 4 bytes, file has {len(data)}")
    return int(_U32.unpack_from(data, pos)[0])


_U32 = struct.Struct("<I")


def next_entry(data: bytes, pos: int, path: str, index: int) -> tuple[bytes | None, int]:
    """The payload of entry ``index`` at ``pos`` and the offset after it; (None, pos) at the end."""
    if pos >= len(data):
        return None, pos
    size = _u32(data, pos, path, f"size of entry {index}")
    if size > MAX_ENTRY_BYTES:
        raise ImageError(path, f"entry {index} at offset {pos} claims {size} bytes (limit {MAX_ENTRY_BYTES})")
    if pos + 4 + size > len(data):
        raise ImageError(
            path, f"entry {index} at offset {pos} claims {size} bytes but only {len(data) - pos - 4} remain"
        )
    return data[pos + 4 : pos + 4 + size], pos + 4 + size


def split_image(data: bytes, kind: ImageKind, path: str, max_entries: int = MAX_ENTRIES) -> RawImage:
    """Parse the framing of ``data`` as an image of ``kind`` with at most ``max_entries`` entries."""
    head, magic, pos = split_header(data, kind, path)
    payloads: list[bytes] = []
    while pos < len(data):
        if len(payloads) == max_entries:
            what = f"expected one {kind.name} entry" if max_entries == 1 else f"limit {max_entries}"
            raise ImageError(path, f"more than {max_entries} entries ({what})")
        payload, pos = next_entry(data, pos, path, len(payloads))
        assert payload is not None
        payloads.append(payload)
    return RawImage(path, head, magic, tuple(payloads))


def open_image(path: Path) -> int:
    """A read-only fd of the regular file ``path``: never through a symlink (only ``parent`` may be one,
    and it is a directory), never blocking on a FIFO or device. Every image is opened here."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ImageError(path, "missing") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ImageError(path, "is a symbolic link; refusing to follow it") from None
        raise ImageError(path, f"unreadable: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise ImageError(path, f"is {_file_kind(mode)}, not an image")
    os.set_blocking(fd, True)  # O_NONBLOCK was only for the open; reads of a regular file block
    return fd


def _file_kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def read_file(path: Path) -> bytes:
    fd = open_image(path)
    try:
        size = os.fstat(fd).st_size
        if size > MAX_IMAGE_BYTES:
            raise ImageError(path, f"{size} bytes: larger than any CRIU image ({MAX_IMAGE_BYTES} limit)")
        chunks: list[bytes] = []
        while True:
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size -= len(chunk)
            if size < -(1 << 20):  # grew while being read
                raise ImageError(path, "changed while being read")
    except OSError as exc:
        raise ImageError(path, f"unreadable: {exc.strerror}") from None
    finally:
        os.close(fd)


def read_raw(path: Path, kind: ImageKind, max_entries: int = MAX_ENTRIES) -> RawImage:
    return split_image(read_file(path), kind, str(path), max_entries)


def decode(payload: bytes, cls: type[M], path: str, index: int) -> M:
    try:
        return wire.decode(cls, payload)
    except wire.DecodeError as exc:
        raise _invalid(path, index, cls, exc) from None


def _invalid(path: str, index: int, cls: type[M], exc: wire.DecodeError) -> ImageError:
    return ImageError(path, f"entry {index}: not a valid {cls.NAME}: {exc}")


@record
class Image(Generic[M]):
    """A decoded image: its framing plus one message per entry."""

    raw: RawImage
    entries: tuple[M, ...]


def read_messages(path: Path, kind: ImageKind, cls: type[M], max_entries: int = MAX_ENTRIES) -> Image[M]:
    raw = read_raw(path, kind, max_entries)
    return Image(raw, tuple(decode(p, cls, raw.path, i) for i, p in enumerate(raw.payloads)))


def read_single(path: Path, kind: ImageKind, cls: type[M]) -> M:
    return single_entry(read_raw(path, kind, max_entries=1), cls)  # a second entry: refused unread


def single_entry(raw: RawImage, cls: type[M]) -> M:
    return decode(_the_entry(raw, cls), cls, raw.path, 0)


def _the_entry(raw: RawImage, cls: type[M]) -> bytes:
    """The payload of an image that holds exactly one entry."""
    if len(raw.payloads) != 1:
        raise ImageError(raw.path, f"expected one {cls.NAME} entry, found {len(raw.payloads)}")
    return raw.payloads[0]


def read_single_compiled(path: Path, kind: ImageKind, cls: type[M]) -> Any:
    """:func:`read_single` with the entry decoded by protobuf's upb (C) instead of :mod:`wire`: the same
    fields behind the same names and ``HasField`` (tests/test_wire.py holds the two decoders to one
    result, or both refusing), for a checkpoint of so many threads that wire's per-field Python loop
    is most of a plan (docs/wire.md, "Many threads"). An entry upb refuses is decoded by wire for the
    error it reports, so the message is the one :func:`read_single` gives."""
    from google.protobuf.message import DecodeError

    from criu_xstate.images.rewrite import PB_TYPES  # protobuf (~20 ms): imported by the first call only

    raw = read_raw(path, kind, max_entries=1)
    payload = _the_entry(raw, cls)
    try:
        return PB_TYPES[cls.NAME].FromString(payload)
    except (DecodeError, RuntimeWarning, ValueError) as exc:  # as rewrite.decode_pb catches
        decode(payload, cls, raw.path, 0)  # raises, with wire's account of what is wrong
        raise ImageError(raw.path, f"entry 0: not a valid {cls.NAME}: protobuf refuses it ({exc})") from None


def field_count(payload: bytes, cls: type[M], name: str, path: str, index: int = 0) -> int:
    """Occurrences of a repeated field in an entry, counted without decoding it (wire.count_field)."""
    try:
        return wire.count_field(cls, payload, name)
    except wire.DecodeError as exc:
        raise _invalid(path, index, cls, exc) from None


# The entry types of protos/ by image kind (wire.message_type(name) reads one, rewrite.PB_TYPES writes it).
INVENTORY_ENTRY = wire.message_type("inventory_entry")
PSTREE_ENTRY = wire.message_type("pstree_entry")
CORE_ENTRY = wire.message_type("core_entry")
MM_ENTRY = wire.message_type("mm_entry")
CPUINFO_ENTRY = wire.message_type("cpuinfo_entry")
PAGEMAP_HEAD = wire.message_type("pagemap_head")
PAGEMAP_ENTRY = wire.message_type("pagemap_entry")


# Kinds with the name of their entries' message, for generic tools (round-trip tests).
MESSAGE_KINDS: dict[str, tuple[ImageKind, str]] = {
    "inventory": (INVENTORY, "inventory_entry"),
    "pstree": (PSTREE, "pstree_entry"),
    "core": (CORE, "core_entry"),
    "mm": (MM, "mm_entry"),
    "cpuinfo": (CPUINFO, "cpuinfo_entry"),
}


def kind_of(name: str) -> str | None:
    """The image kind a file name denotes (``core-12.img`` -> ``core``), or None."""
    if not name.endswith(".img"):
        return None
    stem = name[:-4]
    base = stem.split("-", 1)[0]
    if base in MESSAGE_KINDS or base == "pagemap":
        if base == "pagemap" and stem.startswith("pagemap-shmem"):
            return "pagemap"
        return base
    return None
