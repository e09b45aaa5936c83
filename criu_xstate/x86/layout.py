"""Declared C structures: named little-endian fields at fixed offsets, parsed from and built into bytes.

The signal-frame structs (:mod:`criu_xstate.x86.sigframe`) and the XSAVE image's parts
(:mod:`criu_xstate.x86.xsave`) are declared with these, once, and used both to read checkpoints and
to build frames in tests. Only the fields criu-xstate reads or writes are named; the rest is opaque.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from functools import cached_property

from criu_xstate.records import record


@record
class Field:
    """One little-endian field of a C structure."""

    name: str
    offset: int
    fmt: str  # struct format of one little-endian value: "Q", "I", "H", "i"


@record
class Struct:
    """A C structure's size and fields: declared once, read and written from the same table."""

    name: str
    size: int
    fields: tuple[Field, ...]

    def field(self, name: str) -> Field:
        for f in self.fields:
            if f.name == name:
                return f
        raise KeyError(f"{self.name} has no field {name}")

    def offset(self, name: str) -> int:
        return self.field(name).offset

    @cached_property
    def _packed(self) -> tuple[struct.Struct, tuple[str, ...]]:
        """One compiled format for every named field in offset order, the gaps as pad bytes."""
        fmt, pos, names = "<", 0, []
        for f in sorted(self.fields, key=lambda f: f.offset):
            if f.offset < pos:
                raise ValueError(f"{self.name}: field {f.name} overlaps the one before it")
            fmt += f"{f.offset - pos}x{f.fmt}"
            pos = f.offset + struct.calcsize("<" + f.fmt)
            names.append(f.name)
        return struct.Struct(fmt), tuple(names)

    def parse(self, buf: bytes, at: int = 0) -> dict[str, int]:
        """The named fields of the struct at ``buf[at:]``."""
        if len(buf) - at < self.size:
            raise ValueError(f"{self.name}: {len(buf) - at} bytes, need {self.size}")
        packed, names = self._packed
        return dict(zip(names, packed.unpack_from(buf, at), strict=True))

    def build(self, values: Mapping[str, int], base: bytes | None = None) -> bytes:
        out = bytearray(base if base is not None else bytes(self.size))
        for name, value in values.items():
            f = self.field(name)
            struct.pack_into("<" + f.fmt, out, f.offset, value)
        return bytes(out)
