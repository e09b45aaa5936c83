"""The protocol-buffer wire format, read side: image entries (the messages of protos/, listed in
pb/schema.py) decoded from hostile bytes without the protobuf runtime.

protobuf stays the writer (changeset, overlay, the tests' image builders); the readers (plan, show,
the pre-restore hook) never import it: its Python package costs ~30 ms to import, a quarter of the
hook that CRIU waits for in every restore (docs/wire.md). What this reads is what protobuf reads,
proto2 parsing as upb does it; tests/test_wire.py holds both to the same result on every fixture and
on arbitrary bytes:

- a field of a known number with its type's wire type is decoded; with any other wire type it is an
  unknown field, skipped like every unknown field (upb keeps them; nothing here re-serializes);
- a varint has at most 10 bytes, bits above 64 are dropped; uint32, int32 and sint32 take the low 32;
  a tag has at most 5 bytes and 32 bits;
- a singular field seen twice: the last scalar wins, messages merge; repeated fields append, and a
  repeated varint field takes packed and unpacked elements in any mix;
- unknown groups are skipped to their matching end, at most ``MAX_DEPTH`` deep; a stray end of group,
  field number 0 (outside a group), wire types 6 and 7 and anything running past the end are errors.

A repeated varint field (one XSAVE component is up to 128 elements, and most are never looked at) is
checked in full while its message is read, by one regular-expression match per run of elements, and
turned into integers when it is first read. Every decoding error is raised by :func:`decode`, none later.
Decoded messages are read-only: an absent field reads as its default (0, False, b"", an empty message
shared by all, an empty tuple) and ``HasField`` tells absent from present, as in protobuf's API.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from criu_xstate.images.pb.schema import MESSAGES
from criu_xstate.records import record

MAX_DEPTH = 100  # upb's default nesting limit (messages and groups)
_M32 = (1 << 32) - 1
_M64 = (1 << 64) - 1


class DecodeError(ValueError):
    pass


def _int32(v: int) -> int:
    v &= _M32
    return v - (1 << 32) if v >> 31 else v


def _int64(v: int) -> int:
    v &= _M64
    return v - (1 << 64) if v >> 63 else v


def _sint32(v: int) -> int:
    v &= _M32
    return (v >> 1) ^ -(v & 1)


def _sint64(v: int) -> int:
    v &= _M64
    return (v >> 1) ^ -(v & 1)


# A varint's value (any width up to 70 bits) as each varint type reads it.
VARINT_TYPES: dict[str, Callable[[int], int]] = {
    "uint32": lambda v: v & _M32,
    "uint64": lambda v: v & _M64,
    "int32": _int32,
    "int64": _int64,
    "sint32": _sint32,
    "sint64": _sint64,
    "bool": lambda v: v != 0,
}

_VARINT = rb"[\x80-\xff]{0,9}[\x00-\x7f]"  # continuation bytes then a last one: at most 10 bytes
_MASKS = {"uint64": _M64, "uint32": _M32}
_PACKED = re.compile(b"(?:" + _VARINT + rb")*\Z")
_PACKED_ELEMENT = re.compile(_VARINT)


class _Pattern:
    """A regular expression compiled when first used: each repeated varint field has two (a run of its
    unpacked elements, one element), and compiling the 28 of protos/ up front was ~1.5 ms of every
    hook's start-up, for fields a real core mostly never holds. After the first use ``match`` and
    ``findall`` are plain attributes (the compiled pattern's methods): no cost per use."""

    __slots__ = ("findall", "match", "source")

    def __init__(self, source: bytes) -> None:
        self.source = source

    def __getattr__(self, name: str) -> Any:  # only while the attribute is unset: compile, then keep
        if name not in ("match", "findall"):
            raise AttributeError(name)
        compiled = re.compile(self.source)
        self.match, self.findall = compiled.match, compiled.findall
        return getattr(self, name)


# Operations, by the tag (field number and wire type) that selects them.
# _U64 and _U32 are the common unsigned types, masked only when the value is wider than they are.
_U64, _U32, _SCALAR, _RUN, _PACKED_RUN, _BYTES, _REPEATED_BYTES, _MESSAGE, _REPEATED_MESSAGE = range(9)
# Raw segments of a repeated varint field, in wire order.
_SEG_ONE, _SEG_RUN, _SEG_PACKED = range(3)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the offset after it."""
    try:
        b = data[pos]
        value, i, shift = b & 0x7F, pos + 1, 7
        while b & 0x80:
            if shift == 70:
                raise DecodeError(f"varint at offset {pos} is longer than 10 bytes")
            b = data[i]
            value |= (b & 0x7F) << shift
            i += 1
            shift += 7
        return value, i
    except IndexError:
        raise DecodeError(f"truncated varint at offset {pos}") from None


def _tag(data: bytes, pos: int) -> tuple[int, int]:
    """A field's tag: a varint of at most 5 bytes and 32 bits, as upb reads one."""
    tag, end = _varint(data, pos)
    if end - pos > 5 or tag > _M32:
        raise DecodeError(f"tag at offset {pos} is longer than 5 bytes or wider than 32 bits")
    return tag, end


def _value(b: bytes) -> int:
    """A varint the patterns above matched (so well-formed)."""
    if len(b) == 1:
        return b[0]
    v = 0
    for i, c in enumerate(b):
        v |= (c & 0x7F) << (7 * i)
    return v


def _tag_bytes(number: int, wire_type: int) -> bytes:
    v, out = number << 3 | wire_type, bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


@record
class Field:
    """One field of a message as pb/schema.py declares it (a record, not a NamedTuple: typing's
    NamedTuple costs ~1 ms of each hook's start-up)."""

    name: str
    number: int
    type: str  # a key of VARINT_TYPES, "bytes" or "message"
    repeated: bool
    message: str  # the message type of a message field, else ""


class Message:
    """A decoded message of type ``NAME``: fields as attributes, ``HasField`` as in protobuf."""

    NAME: ClassVar[str] = ""
    FIELDS: ClassVar[tuple[Field, ...]] = ()
    _TAGS: ClassVar[dict[int, tuple[int, str, Any]]] = {}
    _SINGULAR: ClassVar[frozenset[str]] = frozenset()

    def HasField(self, name: str) -> bool:  # protobuf's name: the call sites read either type
        if name not in self._SINGULAR:
            raise ValueError(f"{self.NAME} has no singular field {name!r}")
        return name in self.__dict__

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{self.NAME} is a decoded image entry: read-only")

    def __repr__(self) -> str:
        shown = ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in self.FIELDS if self._present(f))
        return f"{self.NAME}({shown})"

    def _present(self, f: Field) -> bool:
        return f.name in self.__dict__ or _raw_key(f.name) in self.__dict__

    if TYPE_CHECKING:

        def __getattr__(self, name: str) -> Any: ...


def _raw_key(name: str) -> str:
    return "raw " + name  # never a field name


class _LazyVarints:
    """A repeated varint field: its raw segments, turned into integers on the first read (and then
    cached in the instance, which this non-data descriptor then no longer sees)."""

    def __init__(self, name: str, convert: Callable[[int], int], element: _Pattern) -> None:
        self.name, self.key, self.convert, self.element = name, _raw_key(name), convert, element

    def __get__(self, obj: Message | None, owner: type | None = None) -> Any:
        if obj is None:
            return self
        d = obj.__dict__
        segments = d.get(self.key)
        if segments is None:
            return ()
        values = [self.convert(v) for v in self.raw_values(segments)]
        d[self.name] = values
        return values

    def raw_values(self, segments: list[tuple[int, Any]]) -> Iterator[int]:
        """The elements as varints, unconverted, in wire order (the segments were checked when read)."""
        for kind, x in segments:
            if kind == _SEG_ONE:
                yield x
            else:
                for b in (self.element if kind == _SEG_RUN else _PACKED_ELEMENT).findall(x):
                    yield b[0] if len(b) == 1 else _value(b)


def any_nonzero(msg: Message, name: str) -> bool:
    """Whether the repeated varint field ``name`` of ``msg`` holds a non-zero element: ``any(getattr(msg,
    name))`` without converting the elements after the first non-zero one (an XSAVE component in use
    has one among its first few; the model asks this of every thread's components). ``msg`` may also be
    protobuf's (a core read with ``compiled=True``), whose elements are integers already."""
    if not isinstance(msg, Message):
        return any(getattr(msg, name))
    d = msg.__dict__
    if name in d:
        return any(d[name])
    lazy = getattr(type(msg), name)
    if not isinstance(lazy, _LazyVarints):
        raise ValueError(f"{msg.NAME}.{name} is not a repeated varint field")
    segments = d.get(lazy.key)
    return segments is not None and any(map(lazy.convert, lazy.raw_values(segments)))


M = TypeVar("M", bound=Message)


def decode(cls: type[M], data: bytes) -> M:
    """``data`` as a message of ``cls``; :class:`DecodeError` saying where it is malformed."""
    msg = cls()
    _parse(msg, bytes(data), 0)
    return msg


def count_field(cls: type[Message], data: bytes, name: str) -> int:
    """How many times the repeated message or bytes field ``name`` occurs in ``data`` at the top level,
    each occurrence skipped, not decoded: a bound a caller checks before decoding a large entry (an
    mm image's areas). Refuses with :class:`DecodeError` what :func:`decode` refuses at the top level."""
    (number,) = (
        f.number for f in cls.FIELDS if f.name == name and f.repeated and f.type in ("message", "bytes")
    )
    wanted, count, pos, end = number << 3 | 2, 0, 0, len(data)
    while pos < end:
        start = pos
        tag, pos = _tag(data, pos)
        count += tag == wanted
        pos = _skip(data, pos, tag, start, 0)
    return count


def _length(data: bytes, pos: int, start: int) -> tuple[int, int]:
    if pos >= len(data):
        raise DecodeError(f"truncated field at offset {start}")
    n, pos = _varint(data, pos)
    if pos + n > len(data):
        raise DecodeError(f"field at offset {start} claims {n} bytes, {len(data) - pos} remain")
    return n, pos


def _parse(msg: Message, data: bytes, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise DecodeError(f"nested more than {MAX_DEPTH} deep")
    tags, d = msg._TAGS, msg.__dict__
    pos, end = 0, len(data)
    while pos < end:
        start = pos
        b = data[pos]
        if b < 0x80:
            tag, pos = b, pos + 1
        else:
            tag, pos = _tag(data, pos)
        op = tags.get(tag)
        if op is None:
            pos = _skip(data, pos, tag, start, depth)
            continue
        kind, name, arg = op
        if kind <= _SCALAR:  # _U64, _U32, _SCALAR
            try:
                b = data[pos]
            except IndexError:
                raise DecodeError(f"truncated field at offset {start}") from None
            if b < 0x80:
                v, pos = b, pos + 1
            else:
                v, pos = _varint(data, pos)
            if kind == _SCALAR:
                d[name] = arg(v)
            else:
                d[name] = v if v <= arg else v & arg  # a 10-byte varint can exceed 64 bits
        elif kind == _RUN:
            segments = d.setdefault(_raw_key(name), [])
            m = arg.match(data, start)  # this element and the canonically tagged ones after it
            if m is not None:
                segments.append((_SEG_RUN, data[start : m.end()]))
                pos = m.end()
            else:  # a tag written in more bytes than it needs, or a malformed element
                if pos >= end:
                    raise DecodeError(f"truncated field at offset {start}")
                v, pos = _varint(data, pos)
                segments.append((_SEG_ONE, v))
        else:
            n, pos = _length(data, pos, start)
            chunk = data[pos : pos + n]
            pos += n
            if kind == _BYTES:
                d[name] = chunk
            elif kind == _REPEATED_BYTES:
                d.setdefault(name, []).append(chunk)
            elif kind == _PACKED_RUN:
                if _PACKED.match(chunk) is None:
                    raise DecodeError(f"{name}: malformed packed varints at offset {start}")
                d.setdefault(_raw_key(name), []).append((_SEG_PACKED, chunk))
            else:
                sub = d.get(name) if kind == _MESSAGE else None
                if sub is None:
                    sub = arg()
                    if kind == _MESSAGE:
                        d[name] = sub
                    else:
                        d.setdefault(name, []).append(sub)
                try:
                    _parse(sub, chunk, depth + 1)
                except DecodeError as exc:
                    raise DecodeError(f"{name}: {exc}") from None


def _skip(data: bytes, pos: int, tag: int, start: int, depth: int, in_group: bool = False) -> int:
    """The offset after the unknown field whose tag ended at ``pos``. Field number 0 is refused in a
    message, not inside an unknown group (upb skips a group without looking at its numbers)."""
    number, wire_type = tag >> 3, tag & 7
    if number == 0 and not in_group:
        raise DecodeError(f"field number 0 at offset {start}")
    if wire_type == 0:
        if pos >= len(data):
            raise DecodeError(f"truncated field at offset {start}")
        return _varint(data, pos)[1]
    if wire_type == 2:
        n, pos = _length(data, pos, start)
        return pos + n
    if wire_type in (1, 5):
        pos += 8 if wire_type == 1 else 4
        if pos > len(data):
            raise DecodeError(f"truncated field at offset {start}")
        return pos
    if wire_type == 3:
        return _skip_group(data, pos, number, depth + 1)
    if wire_type == 4:
        raise DecodeError(f"end of group {number} at offset {start} outside that group")
    raise DecodeError(f"wire type {wire_type} at offset {start}")


def _skip_group(data: bytes, pos: int, number: int, depth: int) -> int:
    if depth > MAX_DEPTH:
        raise DecodeError(f"nested more than {MAX_DEPTH} deep")
    while pos < len(data):
        start = pos
        tag, pos = _tag(data, pos)
        if tag & 7 == 4:
            if tag >> 3 != number:
                raise DecodeError(f"end of group {tag >> 3} at offset {start} inside group {number}")
            return pos
        pos = _skip(data, pos, tag, start, depth, in_group=True)
    raise DecodeError(f"group {number} has no end")


def _build(schema: dict[str, tuple[tuple[str, int, str, bool, str], ...]]) -> dict[str, type[Message]]:
    classes: dict[str, type[Message]] = {
        name: type(name, (Message,), {"NAME": name, "__slots__": ()}) for name in schema
    }
    for name, rows in schema.items():
        cls = classes[name]
        fields = tuple(Field(*row) for row in rows)
        tags: dict[int, tuple[int, str, Any]] = {}
        defaults: dict[str, object] = {}
        for f in fields:
            if f.type in VARINT_TYPES:
                convert = VARINT_TYPES[f.type]
                if f.repeated:
                    tag = re.escape(_tag_bytes(f.number, 0))
                    element = _Pattern(tag + b"(" + _VARINT + b")")
                    defaults[f.name] = _LazyVarints(f.name, convert, element)
                    tags[f.number << 3] = (_RUN, f.name, _Pattern(b"(?:" + tag + _VARINT + b")+"))
                    tags[f.number << 3 | 2] = (_PACKED_RUN, f.name, None)
                else:
                    defaults[f.name] = convert(0)
                    if f.type in ("uint64", "uint32"):
                        tags[f.number << 3] = (_U64 if f.type == "uint64" else _U32, f.name, _MASKS[f.type])
                    else:
                        tags[f.number << 3] = (_SCALAR, f.name, convert)
            elif f.type == "bytes":
                defaults[f.name] = () if f.repeated else b""
                tags[f.number << 3 | 2] = (_REPEATED_BYTES if f.repeated else _BYTES, f.name, None)
            elif f.type == "message" and f.message in classes:
                defaults[f.name] = () if f.repeated else classes[f.message]()
                op = _REPEATED_MESSAGE if f.repeated else _MESSAGE
                tags[f.number << 3 | 2] = (op, f.name, classes[f.message])
            else:
                raise AssertionError(f"pb/schema.py: {name}.{f.name}: {f.type} {f.message} cannot be read")
        for key, value in defaults.items():
            type.__setattr__(cls, key, value)
        type.__setattr__(cls, "FIELDS", fields)
        type.__setattr__(cls, "_TAGS", tags)
        type.__setattr__(cls, "_SINGULAR", frozenset(f.name for f in fields if not f.repeated))
    return classes


TYPES = _build(MESSAGES)


def message_type(name: str) -> type[Message]:
    """The decoded type of message ``name`` of protos/ (``core_entry``)."""
    return TYPES[name]


__all__ = [
    "MAX_DEPTH",
    "TYPES",
    "DecodeError",
    "Field",
    "Message",
    "any_nonzero",
    "count_field",
    "decode",
    "message_type",
]
