"""Hostile inputs for tests/fuzz.py: byte mutations of real files, and structured hostile archives and
profiles (the shapes that broke things before: `..`, links, devices, duplicates, sparse and size bombs;
YAML aliases, tags, huge numbers, wrong types, terminal escapes)."""

from __future__ import annotations

import copy
import gzip
import io
import random
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from criu_xstate.images.framing import CPUINFO, IMG_COMMON_MAGIC, encode_image
from criu_xstate.images.pb import cpuinfo_pb2

# -- byte mutations -----------------------------------------------------------------------------------


def _varint_bomb(rng: random.Random) -> bytes:
    return b"\xff" * rng.randint(5, 20) + b"\x01"


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1) if buf else 0
        if kind == 0 and buf:  # bit flips
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation
            del buf[pos:]
        elif kind == 2 and len(buf) >= 4:  # a size field (u32) made huge or off by a little
            i = rng.randrange(0, len(buf) - 3)
            value = rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, int.from_bytes(buf[i : i + 4], "little") + 1])
            buf[i : i + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        elif kind == 3:  # a varint bomb
            buf[pos:pos] = _varint_bomb(rng)
        elif kind == 4 and len(buf) >= 8:  # wrong magic
            buf[0:4] = rng.randbytes(4)
        elif kind == 5 and buf:  # random bytes overwritten
            n = rng.randint(1, 16)
            buf[pos : pos + n] = rng.randbytes(n)
        elif kind == 6 and buf:  # a chunk duplicated
            n = rng.randint(1, min(64, len(buf)))
            buf[pos:pos] = buf[max(0, pos - n) : pos]
        elif kind == 7:  # extreme values in a u64
            buf[pos : pos + 8] = rng.choice([b"\xff" * 8, b"\x00" * 8, (1 << 63).to_bytes(8, "little")])
    return bytes(buf)


# -- seeds the fixtures lack --------------------------------------------------------------------------


def cpuinfo_image() -> bytes:
    """A cpuinfo.img as ``criu dump --cpu-cap`` writes it (a Zen 4 host), to seed its fuzz target."""
    x86 = cpuinfo_pb2.cpuinfo_x86_entry(
        vendor_id=2,
        cpu_family=25,
        model=17,
        stepping=1,
        capability_ver=2,
        capability=[0x178BFBFF, 0x76F8320B, 0x2C100800, 0x75C237FF, 0, 0xF1BF07A9, 0, 0, 0, 0],
        model_id=b"AMD EPYC 9654 96-Core Processor",
        xfeatures_mask=0x2E7,
        xsave_size=2440,
        xsave_size_max=2440,
    )
    entry = cpuinfo_pb2.cpuinfo_entry(x86_entry=[x86])
    return encode_image(IMG_COMMON_MAGIC, CPUINFO.magic, [entry.SerializeToString()])


# -- hostile archives ---------------------------------------------------------------------------------


def header(name: bytes, size: int, kind: bytes, size_field: bytes | None = None) -> bytes:
    """One ustar header block with a valid checksum; ``size_field`` overrides the 12-byte size."""
    h = bytearray(512)
    h[: min(len(name), 100)] = name[:100]
    h[100:108] = b"0000644\0"
    h[124:136] = size_field if size_field is not None else b"%011o\0" % min(size, 0o77777777777)
    h[136:148] = b"00000000000\0"
    h[156:157] = kind
    h[257:265] = b"ustar\x0000"
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def _pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 512)


def _pax(records: dict[str, str]) -> bytes:
    body = b""
    for k, v in records.items():
        rec = f" {k}={v}\n".encode()
        n = len(rec) + len(str(len(rec)))
        n = len(rec) + len(str(n))
        body += str(n).encode() + rec
    return header(b"PaxHeaders/x", len(body), b"x") + _pad(body)


def _member(name: str, data: bytes = b"", kind: bytes = b"0") -> bytes:
    return header(name.encode(), len(data), kind) + _pad(data)


_IMG = "checkpoint/core-1.img"
HOSTILE_MEMBERS: list[Callable[[random.Random], bytes]] = [
    lambda r: _member("checkpoint/../../escape.img", b"x"),
    lambda r: _member("/tmp/escape.img", b"x"),
    lambda r: _member(_IMG, kind=r.choice([b"1", b"2"])),
    lambda r: _member("checkpoint/parent", kind=b"2"),
    lambda r: _member(_IMG, kind=r.choice([b"3", b"4", b"6", b"V", b"D", b"Z"])),
    lambda r: _member("config.dump", b"{}") * 2,
    lambda r: header(b"checkpoint/pages-7.img", 1 << 20, b"S"),
    lambda r: header(
        b"PaxHeaders/x", r.choice([1 << 30, 3 << 30, 65537]), r.choice([b"x", b"g", b"L", b"K"])
    ),
    lambda r: _pax({"path": "checkpoint/" + "../" * r.randint(1, 9) + "e.img"}) + _member("x", b"x"),
    lambda r: _pax({"GNU.sparse.major": "1", "GNU.sparse.minor": "0"}) + _member("checkpoint/p.img", b"x"),
    lambda r: _pax({"size": str(r.choice([1 << 40, 10**30, 7]))}) + _member("checkpoint/q.img", b"x"),
    lambda r: header(b"././@LongLink", 300, b"L") + _pad(b"checkpoint/" + b"a/" * 140 + b"../" * 150),
    lambda r: _member("checkpoint/zero.img", bytes(r.choice([1, 4096, 1 << 20, 8 << 20]))),
    lambda r: header(b"checkpoint/big.img", 0, b"0", b"\x80" + r.randbytes(11)),
    lambda r: header(b"checkpoint/neg.img", 0, b"0", b"\xff" * 12),
    lambda r: header(b"checkpoint/big.img", 1 << 33, b"0"),  # no data follows
    lambda r: b"".join(_member(f"junk/{i}") for i in range(r.randint(1, 3000))),
    lambda r: _member("checkpoint/nested/dir/x.img", b"x") + _member("checkpoint/d", kind=b"5"),
    lambda r: r.randbytes(512),
]


def hostile_archive(fixture: Path, rng: random.Random) -> bytes:
    """The fixture's images as a tar with one to three hostile members at random places, compressed
    or not, sometimes with its bytes mutated too."""
    parts = [_member(f"checkpoint/{p.name}", p.read_bytes()) for p in sorted(fixture.glob("*.img"))]
    for _ in range(rng.randint(1, 3)):
        parts.insert(rng.randrange(len(parts) + 1), rng.choice(HOSTILE_MEMBERS)(rng))
    data = b"".join(parts) + bytes(1024 * rng.randint(0, 1))
    if rng.random() < 0.2:
        data = mutate(data, rng)
    return compress(data, rng.choice(["tar", "gzip", "zstd"]))


def compress(data: bytes, fmt: str) -> bytes:
    if fmt == "gzip":
        return gzip.compress(data, compresslevel=1)
    if fmt == "zstd":
        import zstandard

        return bytes(zstandard.ZstdCompressor(level=1).compress(data))
    return data


def fixture_archive(fixture: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(fixture.iterdir()):
            if p.is_file():
                tar.add(p, arcname=f"checkpoint/{p.name}")
        info = tarfile.TarInfo("config.dump")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return buf.getvalue()


# -- hostile profiles ---------------------------------------------------------------------------------

HOSTILE_VALUES: list[Any] = [
    5,
    -1,
    1 << 63,
    1 << 64,
    10**40,
    "9" * 5000,
    "0x" + "f" * 3000,
    2440.5,
    float("nan"),
    float("inf"),
    True,
    None,
    "",
    "\x1b[2J\x1b[31mred\x07",
    "a\nb",
    "\u202eevil",
    [],
    [1, [2, [3]]],
    {"a": 1},
    {1: {"offset": 576}},
    "0x80000000000002e7",
    "0x1ffff",
    "0x27",
    1 << 30,
]
_TEXT_ATTACKS = [
    lambda t, r: t + "\nname: twice\n",
    lambda t, r: t.replace("xsave:", "xsave: &x", 1) + "\nkernel: *x\n",
    lambda t, r: t.replace("name:", "name: !!python/object/apply:os.system", 1),
    lambda t, r: "x: " + "[" * r.randint(10, 3000) + "]" * r.randint(10, 3000) + "\n",
    lambda t, r: (
        "a: &a [x,x,x,x,x,x,x,x]\n"
        + "".join(f"{c}: &{c} [*{p},*{p},*{p},*{p}]\n" for p, c in zip("abcdefg", "bcdefgh", strict=True))
    ),
    lambda t, r: t + "\n" + "k: " + "v" * r.randint(4000, 5000) + "\n",
    lambda t, r: t.encode("utf-8").decode("latin-1").replace("a", "\udcff", 1),
    lambda t, r: t.replace(": ", ":\t", 3),
]


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node[:3]):
            out += _paths(v, (*prefix, i))
    return out


def _hostile_value(rng: random.Random) -> Any:
    return copy.deepcopy(rng.choice(HOSTILE_VALUES))  # a shared list edited later would become a cycle


def hostile_profile(seed_text: str, rng: random.Random) -> bytes:
    """A shipped profile with values replaced by ill-typed or impossible ones, or a textual attack."""
    if rng.random() < 0.3:
        text = rng.choice(_TEXT_ATTACKS)(seed_text, rng)
        return text.encode("utf-8", "surrogateescape")
    doc = yaml.safe_load(seed_text)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_paths(doc)[1:])
        node = doc
        for key in path[:-1]:
            node = node[key]
        if rng.random() < 0.15 and isinstance(node, dict):
            node[rng.choice(["bogus", 99, "xcr0", "offset"])] = _hostile_value(rng)
        else:
            node[path[-1]] = _hostile_value(rng)
    return yaml.safe_dump(doc, allow_unicode=True).encode("utf-8", "surrogateescape")
