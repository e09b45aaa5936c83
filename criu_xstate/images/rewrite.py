"""Image entries decoded with the protobuf runtime, for the code that writes images (apply, the hook
when it translates, the tests' image builders).

:mod:`criu_xstate.images.wire` only reads; protobuf re-serializes an entry byte-identically, unknown
fields included (tested on every fixture image), so a rewritten image differs from the original in
exactly the fields that were changed. Importing protobuf costs ~20 ms: only writers import this module.
"""

from __future__ import annotations

from pathlib import Path
from typing import Generic, TypeVar

from google.protobuf.message import DecodeError, Message

from criu_xstate.errors import ImageError
from criu_xstate.images import framing
from criu_xstate.images.framing import MAX_ENTRIES, PAGEMAP, ImageKind, RawImage, encode_image, read_raw
from criu_xstate.images.pb import (
    core_pb2,
    core_x86_pb2,
    cpuinfo_pb2,
    files_pb2,
    inventory_pb2,
    mm_pb2,
    pagemap_pb2,
    pstree_pb2,
    sa_pb2,
)
from criu_xstate.records import record

M = TypeVar("M", bound=Message)

# Every message of protos/ by name, as wire.TYPES has them (tests/test_wire.py checks the two agree).
PB_TYPES: dict[str, type[Message]] = {
    name: getattr(module, name)
    for module in (
        core_pb2,
        core_x86_pb2,
        cpuinfo_pb2,
        files_pb2,
        inventory_pb2,
        mm_pb2,
        pagemap_pb2,
        pstree_pb2,
        sa_pb2,
    )
    for name in module.DESCRIPTOR.message_types_by_name
}


def decode_pb(payload: bytes, cls: type[M], path: str, index: int) -> M:
    msg = cls()
    try:
        msg.ParseFromString(payload)
    except (DecodeError, RuntimeWarning, ValueError) as exc:
        raise ImageError(path, f"entry {index}: not a valid {cls.DESCRIPTOR.name}: {exc}") from None
    return msg


@record
class PbImage(Generic[M]):
    """An image with its entries as protobuf messages, to be changed and encoded again."""

    raw: RawImage
    entries: tuple[M, ...]

    def encode(self) -> bytes:
        return encode_image(self.raw.head, self.raw.magic, [e.SerializeToString() for e in self.entries])


def read_pb_messages(path: Path, kind: ImageKind, cls: type[M], max_entries: int = MAX_ENTRIES) -> PbImage[M]:
    raw = read_raw(path, kind, max_entries)
    return PbImage(raw, tuple(decode_pb(p, cls, raw.path, i) for i, p in enumerate(raw.payloads)))


def single_pb(data: bytes, kind: ImageKind, cls: type[M], path: Path) -> M:
    """The one entry of image bytes ``data`` (read by the caller, who keeps them as the old contents)."""
    raw = framing.split_image(data, kind, str(path), max_entries=1)
    if len(raw.payloads) != 1:
        raise ImageError(path, f"expected one {cls.DESCRIPTOR.name} entry, found {len(raw.payloads)}")
    return decode_pb(raw.payloads[0], cls, raw.path, 0)


@record
class Pagemap:
    """A pagemap image decoded by protobuf, for the writers and tests that re-encode it."""

    raw: RawImage
    head: pagemap_pb2.pagemap_head
    entries: tuple[pagemap_pb2.pagemap_entry, ...]

    def encode(self) -> bytes:
        payloads = [self.head.SerializeToString(), *(e.SerializeToString() for e in self.entries)]
        return encode_image(self.raw.head, self.raw.magic, payloads)


def read_pagemap(path: Path) -> Pagemap:
    """Every entry as a message (for rewriting it); lookups use :mod:`criu_xstate.images.pagemap`."""
    framing.PAGEMAP_DECODES += 1
    raw = read_raw(path, PAGEMAP)
    if not raw.payloads:
        raise ImageError(path, "pagemap has no head entry")
    head = decode_pb(raw.payloads[0], pagemap_pb2.pagemap_head, raw.path, 0)
    entries = tuple(
        decode_pb(p, pagemap_pb2.pagemap_entry, raw.path, i + 1) for i, p in enumerate(raw.payloads[1:])
    )
    return Pagemap(raw, head, entries)
