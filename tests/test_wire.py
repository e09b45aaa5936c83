"""criu_xstate.images.wire against protobuf (upb): the same fields, or both refusing, on every fixture
entry, on entries protobuf builds with every shape the wire format allows, and on hostile bytes."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message as PbMessage
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from criu_xstate.images import framing, wire
from criu_xstate.images.files import FILES
from criu_xstate.images.pb.schema import MESSAGES
from criu_xstate.images.rewrite import PB_TYPES

FIXTURES = Path(__file__).parent / "fixtures"
PB: dict[str, type[PbMessage]] = PB_TYPES
TYPE_NAMES = {
    FieldDescriptor.TYPE_UINT32: "uint32",
    FieldDescriptor.TYPE_UINT64: "uint64",
    FieldDescriptor.TYPE_INT32: "int32",
    FieldDescriptor.TYPE_INT64: "int64",
    FieldDescriptor.TYPE_SINT32: "sint32",
    FieldDescriptor.TYPE_SINT64: "sint64",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_BYTES: "bytes",
    FieldDescriptor.TYPE_MESSAGE: "message",
}


def pb_tree(m: PbMessage) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in m.DESCRIPTOR.fields:
        v = getattr(m, f.name)
        msg = f.type == FieldDescriptor.TYPE_MESSAGE
        if f.is_repeated:
            out[f.name] = [pb_tree(x) if msg else x for x in v]
        elif m.HasField(f.name):
            out[f.name] = pb_tree(v) if msg else v
    return out


def wire_tree(m: wire.Message) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in m.FIELDS:
        v = getattr(m, f.name)
        msg = f.type == "message"
        if f.repeated:
            out[f.name] = [wire_tree(x) if msg else x for x in v]
        elif m.HasField(f.name):
            out[f.name] = wire_tree(v) if msg else v
    return out


def outcome_pb(name: str, data: bytes) -> dict[str, Any] | str:
    m = PB[name]()
    try:
        m.ParseFromString(data)
    except Exception:
        return "refused"
    return pb_tree(m)


def outcome_wire(name: str, data: bytes) -> dict[str, Any] | str:
    try:
        m = wire.decode(wire.message_type(name), data)
    except wire.DecodeError:
        return "refused"
    return wire_tree(m)


def same(name: str, data: bytes) -> None:
    assert outcome_wire(name, data) == outcome_pb(name, data), (name, data.hex())


def test_the_schema_is_what_the_protobuf_modules_were_generated_from() -> None:
    assert set(MESSAGES) == set(PB)
    for name, rows in MESSAGES.items():
        d = PB[name].DESCRIPTOR
        pb_rows = tuple(
            (
                f.name,
                f.number,
                TYPE_NAMES[f.type],
                f.is_repeated,
                f.message_type.name if f.message_type else "",
            )
            for f in d.fields
        )
        assert rows == pb_rows, name


def _fixture_entries() -> list[tuple[str, bytes, str]]:
    kinds = framing.MESSAGE_KINDS
    out = []
    for path in sorted(FIXTURES.glob("*/*.img")):
        kind = framing.kind_of(path.name)
        if kind == "pagemap":
            raw = framing.read_raw(path, framing.PAGEMAP)
            out.append(("pagemap_head", raw.payloads[0], path.name))
            out += [("pagemap_entry", p, path.name) for p in raw.payloads[1:]]
        elif kind in kinds:
            img_kind, name = kinds[kind]
            out += [(name, p, path.name) for p in framing.read_raw(path, img_kind).payloads]
        elif path.name == "files.img":
            out += [("file_entry", p, path.name) for p in framing.read_raw(path, FILES).payloads]
    return out


FIXTURE_ENTRIES = _fixture_entries()


def test_every_fixture_entry_decodes_to_the_same_fields() -> None:
    names = {name for name, _, _ in FIXTURE_ENTRIES}
    assert {
        "core_entry",
        "mm_entry",
        "pstree_entry",
        "pagemap_entry",
        "file_entry",
        "inventory_entry",
    } <= names
    for name, payload, where in FIXTURE_ENTRIES:
        got = outcome_wire(name, payload)
        assert got != "refused", where
        assert got == outcome_pb(name, payload), where


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        if v:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _values(f: FieldDescriptor, draw: Any) -> Any:
    limits = {
        FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
        FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
        FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
        FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
        FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
        FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    }
    if f.type == FieldDescriptor.TYPE_BOOL:
        return draw(st.booleans())
    if f.type == FieldDescriptor.TYPE_BYTES:
        return draw(st.binary(max_size=12))
    lo, hi = limits[f.type]
    return draw(st.one_of(st.integers(lo, hi), st.sampled_from([lo, hi, 0, 1, 127, 128])))


@st.composite
def built(draw: Any, name: str, depth: int = 0) -> PbMessage:
    """A message of ``name`` with a random subset of its fields set (sub-messages to depth 3)."""
    m = PB[name]()
    for f in m.DESCRIPTOR.fields:
        if not draw(st.booleans()):
            continue
        n = draw(st.integers(0, 4)) if f.is_repeated else 1
        for _ in range(n):
            if f.type == FieldDescriptor.TYPE_MESSAGE:
                if depth >= 3:
                    break
                sub = draw(built(f.message_type.name, depth + 1))
                if f.is_repeated:
                    getattr(m, f.name).add().CopyFrom(sub)
                else:
                    getattr(m, f.name).CopyFrom(sub)
            elif f.is_repeated:
                getattr(m, f.name).append(_values(f, draw))
            else:
                setattr(m, f.name, _values(f, draw))
    return m


def _fields(data: bytes) -> list[tuple[int, bytes]]:
    """Top-level (tag, whole field bytes) of a well-formed serialization."""
    out, pos = [], 0
    while pos < len(data):
        start = pos
        tag, pos = wire._varint(data, pos)
        if tag & 7 == 0:
            _, pos = wire._varint(data, pos)
        elif tag & 7 == 2:
            n, pos = wire._varint(data, pos)
            pos += n
        else:
            pos += 8 if tag & 7 == 1 else 4
        out.append((tag, data[start:pos]))
    return out


def _reshape(data: bytes, rng: random.Random) -> bytes:
    """The same message as the wire format may also carry it: fields reordered and repeated, runs of
    varints packed, tags in more bytes than needed, unknown fields of every wire type (and groups)."""
    fields = _fields(data)
    out = bytearray()
    i = 0
    while i < len(fields):
        tag, raw = fields[i]
        choice = rng.randrange(6)
        if choice == 0 and tag & 7 == 0:  # pack this element with the same-tag ones after it
            j, payload = i, bytearray()
            while j < len(fields) and fields[j][0] == tag:
                payload += fields[j][1][len(_varint(tag)) :]
                j += 1
            out += _varint(tag | 2) + _varint(len(payload)) + payload
            i = j
            continue
        if choice == 1:  # the tag in one byte more than it needs
            t = _varint(tag)
            out += bytes(b | 0x80 for b in t) + b"\x00" + raw[len(t) :]
        elif choice == 2:  # an unknown field first
            number = rng.choice([100, 1000, 2**29 - 1])  # no message of protos/ has these
            wt = rng.choice([0, 1, 2, 5, 3])
            body = {0: _varint(rng.getrandbits(64)), 1: bytes(8), 2: b"\x03abc", 5: bytes(4)}
            if wt == 3:
                out += _varint(number << 3 | 3) + _varint(1 << 3) + b"\x05" + _varint(number << 3 | 4)
            else:
                out += _varint(number << 3 | wt) + body[wt]
            out += raw
        elif choice == 3:  # said twice: the last scalar wins, messages merge
            out += raw + raw
        else:
            out += raw
        i += 1
    return bytes(out)


NAMES = sorted(MESSAGES)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_every_shape_of_a_message_decodes_to_the_same_fields(data: Any) -> None:
    name = data.draw(st.sampled_from(NAMES))
    m = data.draw(built(name))
    rng = random.Random(data.draw(st.integers(0, 2**32)))
    payload = _reshape(m.SerializeToString(), rng)
    assert outcome_wire(name, payload) != "refused"
    same(name, payload)


@settings(max_examples=1500, deadline=None)
@given(st.sampled_from(NAMES), st.binary(max_size=64))
def test_arbitrary_bytes_decode_alike(name: str, data: bytes) -> None:
    same(name, data)


@settings(max_examples=800, deadline=None)
@given(
    st.integers(0, len(FIXTURE_ENTRIES) - 1),
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 2**16), st.integers(0, 255)), min_size=1, max_size=4
    ),
)
def test_mutated_fixture_entries_decode_alike(index: int, edits: list[tuple[int, int, int]]) -> None:
    name, payload, _ = FIXTURE_ENTRIES[index]
    b = bytearray(payload)
    for op, at, value in edits:
        at %= len(b) + 1
        if op == 0 and at < len(b):
            b[at] = value
        elif op == 1:
            b.insert(at, value)
        elif op == 2 and at < len(b):
            del b[at]
        else:
            del b[at:]
    same(name, bytes(b))


@pytest.mark.parametrize(
    "name, data",
    [
        ("user_x86_regs_entry", b"\x08" + b"\xff" * 9 + b"\x7f"),  # 10 bytes, bits above 64 dropped
        ("user_x86_regs_entry", b"\x08" + b"\xff" * 10 + b"\x01"),  # 11 bytes
        ("user_x86_regs_entry", b"\x08\x80"),  # truncated
        ("user_x86_regs_entry", bytes.fromhex("888080800005")),  # a tag in five bytes
        ("user_x86_regs_entry", bytes.fromhex("88808080800005")),  # in six
        ("user_x86_regs_entry", bytes.fromhex("0b888080808000050c")),  # in six, inside a group
        ("user_x86_regs_entry", b"\x00\x01"),  # field number 0
        ("user_x86_regs_entry", b"\x0e"),  # wire type 6
        ("user_x86_regs_entry", b"\x0c"),  # end of a group never opened
        ("user_x86_regs_entry", b"\x0b\x08\x01\x0c"),  # field 1 as a group: unknown, skipped
        ("user_x86_regs_entry", b"\x0b\x08\x01\x14"),  # a group closed by another number
        ("user_x86_regs_entry", bytes.fromhex("6b00056c")),  # field number 0 inside a group: skipped
        ("user_x86_regs_entry", bytes.fromhex("6b03046c")),  # a group numbered 0 inside a group
        ("user_x86_regs_entry", bytes.fromhex("6b046c")),  # a group closed by another number
        ("user_x86_regs_entry", b"\x0b" * 99 + b"\x0c" * 99),  # nested groups
        ("user_x86_regs_entry", b"\x0b" * 101 + b"\x0c" * 101),
        ("user_x86_regs_entry", b"\x0a\x01\x05"),  # a varint field sent length-delimited: unknown
        ("user_x86_fpregs_entry", b"\x4a\x03\x01\x02\x03\x48\x04"),  # packed, then unpacked
        ("user_x86_fpregs_entry", b"\x4a\x02\x01\x80"),  # packed, its last varint cut short
        ("thread_info_x86", b"\x12\x02\x08\x01\x12\x02\xa0\x01\x01"),  # a message said twice: merged
        ("thread_core_entry", b"\x18\x03"),  # sint32 -2
        ("task_core_entry", b"\x70" + b"\xff" * 9 + b"\x01"),  # int32 -1 in ten bytes
        ("sa_entry", b"\x08\x01\x08\x02"),  # the last scalar wins
        ("pstree_entry", b"\x2a\x00"),  # an empty packed list
    ],
)
def test_edge_cases_decode_alike(name: str, data: bytes) -> None:
    same(name, data)


def test_decoded_messages_are_read_only_and_say_what_is_absent() -> None:
    core = wire.decode(framing.CORE_ENTRY, bytes.fromhex("0801"))
    assert core.mtype == 1 and core.HasField("mtype") and not core.HasField("tc")
    assert core.tc.comm == b"" and list(core.tc.sigactions) == [] and not core.tc.HasField("comm")
    with pytest.raises(AttributeError, match="read-only"):
        core.mtype = 2
    with pytest.raises(ValueError, match="no singular field"):
        core.tc.HasField("sigactions")


def test_a_repeated_field_is_checked_when_read_and_converted_when_used() -> None:
    fp = wire.message_type("user_x86_fpregs_entry")
    with pytest.raises(wire.DecodeError, match="truncated"):
        wire.decode(fp, b"\x48\x01\x48\x80")  # the second element's varint is cut short
    m = wire.decode(fp, b"\x48\x01\x48\x80\x01" + bytes([0x48, 5]) * 3)
    assert "st_space" not in m.__dict__  # not converted yet
    assert m.st_space == [1, 128, 5, 5, 5]


def test_the_errors_say_which_field() -> None:
    # core_entry.thread_info (field 2) holding fpregs (field 3) whose cwd varint is cut short
    with pytest.raises(wire.DecodeError, match=r"^thread_info: fpregs: truncated varint at offset 1"):
        wire.decode(framing.CORE_ENTRY, bytes.fromhex("12041a020880"))


def test_plan_and_the_hook_never_import_protobuf() -> None:
    import subprocess
    import sys

    dest = Path(__file__).parents[1] / "criu_xstate" / "data" / "hosts" / "intel-icelake-sp.yaml"
    code = (
        "import sys; from criu_xstate.cli import main; import criu_xstate.hook, criu_xstate.applying; "
        f"rc = main(['plan', {str(FIXTURES / 'threads')!r}, '--dest', {str(dest)!r}, '--json']); "
        "print(sorted(m for m in sys.modules if m.startswith('google')), file=sys.stderr)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.startswith("{"), out.stderr
    assert out.stderr.strip().splitlines()[-1] == "[]"


REPEATED_VARINT = [
    n for n in NAMES if any(r and t not in ("bytes", "message") for _, _, t, r, _ in MESSAGES[n])
]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_nonzero_is_any_of_the_elements_protobuf_reads(data: Any) -> None:
    name = data.draw(st.sampled_from(REPEATED_VARINT))
    payload = _reshape(data.draw(built(name)).SerializeToString(), random.Random(data.draw(st.integers())))
    extra = data.draw(st.sampled_from([b"", bytes.fromhex("10808080801048001000")]))  # 2**32 masks to 0
    ref = PB[name].FromString(payload + extra)
    for f in wire.message_type(name).FIELDS:
        if f.repeated and f.type in wire.VARINT_TYPES:
            fresh = wire.decode(wire.message_type(name), payload + extra)  # nothing converted yet
            assert wire.any_nonzero(fresh, f.name) == any(getattr(ref, f.name)), f.name
            assert wire.any_nonzero(fresh, f.name) == any(getattr(fresh, f.name))  # and once converted


# Every repeated message or bytes field: what wire.count_field may be asked to count.
COUNTABLE = [
    (name, row[0])
    for name, rows in sorted(MESSAGES.items())
    for row in rows
    if row[3] and row[2] in ("message", "bytes")
]


def _count_agrees(name: str, field: str, data: bytes) -> None:
    """count_field counts what decode reads, and refuses nothing decode accepts."""
    cls = wire.message_type(name)
    try:
        decoded = wire.decode(cls, data)
    except wire.DecodeError:
        decoded = None
    try:
        counted = wire.count_field(cls, data, field)
    except wire.DecodeError:
        assert decoded is None, (name, field, data)  # it looks at the top level only: a subset of decode
        return
    if decoded is not None:
        assert counted == len(getattr(decoded, field)), (name, field, data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_count_field_counts_what_decode_reads(data: Any) -> None:
    name, field = data.draw(st.sampled_from(COUNTABLE))
    how = data.draw(st.sampled_from(["built", "arbitrary", "fixture"]))
    if how == "built":
        rng = random.Random(data.draw(st.integers(0, 2**32)))
        payload = _reshape(data.draw(built(name)).SerializeToString(), rng)
    elif how == "arbitrary":
        payload = data.draw(st.binary(max_size=64))
    else:
        fixtures = [p for n, p, _ in FIXTURE_ENTRIES if n == name]
        if not fixtures:
            return
        payload = bytearray(data.draw(st.sampled_from(fixtures)))
        if payload and data.draw(st.booleans()):
            payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
        payload = bytes(payload)
    _count_agrees(name, field, payload)


def test_count_field_on_every_fixture_entry() -> None:
    checked = 0
    for name, payload, _ in FIXTURE_ENTRIES:
        for message, field in COUNTABLE:
            if message == name:
                _count_agrees(name, field, payload)
                checked += 1
    assert checked >= 10  # mm vmas, pstree, core's tls, files ...


VMA = b"\x08\x01\x10\x02"  # start 1, end 2


@pytest.mark.parametrize(
    "data, count",
    [
        (b"", 0),
        (b"\x72\x04" + VMA + b"\x72\x00", 2),  # an empty area counts: it decodes as one
        (b"\x70\x05" + b"\x72\x04" + VMA, 1),  # the areas' number as a varint: an unknown field
        (b"\xf2\x80\x80\x00\x04" + VMA, 1),  # its tag in four bytes
        (b"\x72\x05" + VMA, None),  # longer than what is left
        (b"\x72\x04" + VMA + b"\x0e", None),  # wire type 6 after it
        (b"\x00\x01", None),  # field number 0
        (b"\x72\x04" + VMA + b"\x80", None),  # a truncated tag
    ],
)
def test_count_field_edge_cases(data: bytes, count: int | None) -> None:
    mm = wire.message_type("mm_entry")
    if count is None:
        with pytest.raises(wire.DecodeError):
            wire.count_field(mm, data, "vmas")
        with pytest.raises(wire.DecodeError):
            wire.decode(mm, data)
    else:
        assert wire.count_field(mm, data, "vmas") == count == len(wire.decode(mm, data).vmas)


# --- many threads: cores decoded by upb (model.COMPILED_CORES_FROM) --------------------------------


def _plans(ck_dir: Path, compiled: bool) -> tuple[list[object], list[dict[str, Any]]]:
    from criu_xstate.commands.planning import load_destinations, plan_for
    from criu_xstate.images import open_checkpoint
    from criu_xstate.model import load_model
    from criu_xstate.report import plan_json

    hosts = sorted((Path(__file__).parents[1] / "criu_xstate" / "data" / "hosts").glob("*.yaml"))
    dests = load_destinations([str(h) for h in hosts])
    with open_checkpoint(ck_dir) as ck:
        model = load_model(ck, compiled_cores=compiled)
        states = [(t.tid, t.state(), t.frames) for t in model.threads()]
        return states, [plan_json(plan_for(model, d, None, root=None)) for d in dests]


@pytest.mark.parametrize("fixture", sorted(p.name for p in FIXTURES.iterdir() if (p / "pstree.img").exists()))
def test_a_model_read_with_upb_is_the_model_read_with_wire(fixture: str) -> None:
    """Every thread's state and frames, and the plan for every shipped host, whichever decoder read
    the cores."""
    assert _plans(FIXTURES / fixture, True) == _plans(FIXTURES / fixture, False)


def test_a_core_upb_refuses_is_refused_with_wires_message(tmp_path: Path) -> None:
    import shutil

    from criu_xstate.errors import ImageError
    from criu_xstate.images import open_checkpoint
    from criu_xstate.model import load_model

    ck_dir = tmp_path / "ck"
    shutil.copytree(FIXTURES / "threads", ck_dir)
    core = sorted(ck_dir.glob("core-*.img"))[-1]
    raw = framing.read_raw(core, framing.CORE)
    damaged = raw.payloads[0][:-3]  # the last field cut short
    core.write_bytes(framing.encode_image(framing.CORE.head, framing.CORE.magic, [damaged]))
    messages = []
    for compiled in (True, False):
        with open_checkpoint(ck_dir) as ck, pytest.raises(ImageError) as exc:
            load_model(ck, compiled_cores=compiled)
        messages.append(str(exc.value))
    assert messages[0] == messages[1] and "not a valid core_entry" in messages[0], messages


@pytest.mark.parametrize(("above", "impl"), [(True, "upb"), (False, "upb"), (True, "python")])
def test_cores_are_read_by_upb_from_the_thread_count_on(
    above: bool, impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From COMPILED_CORES_FROM threads on, and only where protobuf is upb (its pure-Python
    implementation, PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python, is slower than wire)."""
    from google.protobuf.internal import api_implementation

    from criu_xstate import model as model_mod
    from criu_xstate.images import open_checkpoint

    calls: list[Path] = []
    real = framing.read_single_compiled

    def counted(path: Path, *args: Any) -> Any:
        calls.append(path)
        return real(path, *args)

    monkeypatch.setattr(framing, "read_single_compiled", counted)
    monkeypatch.setattr(api_implementation, "Type", lambda: impl)
    with open_checkpoint(FIXTURES / "threads") as ck:
        threads = sum(len(e.threads) or 1 for e in ck.pstree())
        monkeypatch.setattr(model_mod, "COMPILED_CORES_FROM", threads if above else threads + 1)
        m = model_mod.load_model(ck)
        assert len(list(m.threads())) == threads
    assert len(calls) == (threads if above and impl == "upb" else 0)
