"""Images sized to exhaust memory or time through their entry count: a 40 MB core image of 10 million
empty entries took 34 s and 5.6 GB before it was refused (every entry was decoded first). Single-entry
images now stop at the second entry, other images at framing.MAX_ENTRIES, before any decoding."""

from __future__ import annotations

import shutil
import struct
import time
from pathlib import Path

import pytest

from criu_xstate.cli import main
from criu_xstate.errors import ImageError
from criu_xstate.images.framing import CORE, IMG_COMMON_MAGIC, MAX_ENTRIES, PSTREE, encode_image, split_image

FIXTURE = Path(__file__).parent / "fixtures" / "siginfo"
DEST = str(Path(__file__).parents[1] / "criu_xstate" / "data" / "hosts" / "amd-zen4.yaml")


@pytest.fixture
def ck(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    shutil.copytree(FIXTURE, d)
    return d


@pytest.mark.parametrize("pattern", ["core-*.img", "mm-*.img"])
def test_a_single_entry_image_stops_at_its_second_entry(
    ck: Path, pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = next(ck.glob(pattern))
    path.write_bytes(path.read_bytes() + b"\0\0\0\0" * 10_000_000)  # 40 MB of empty entries
    t0 = time.monotonic()
    assert main(["plan", str(ck), "--dest", DEST]) == 2
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert "more than 1 entries (expected one" in err and path.name in err and err.count("\n") == 1


def test_a_pagemap_of_empty_entries_stops_at_the_first(ck: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Pagemap entries are validated as they are decoded (tests/test_perf_invariants.py has the entry
    limit): the first empty one is refused, the million after it are never looked at."""
    path = next(ck.glob("pagemap-*.img"))
    path.write_bytes(path.read_bytes() + b"\0\0\0\0" * MAX_ENTRIES)
    assert main(["plan", str(ck), "--dest", DEST]) == 2
    err = capsys.readouterr().err
    assert "impossible page count 0" in err and path.name in err


@pytest.mark.parametrize("pattern", ["pstree.img"])
def test_many_entry_images_stop_at_the_limit(
    ck: Path, pattern: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = next(ck.glob(pattern))
    path.write_bytes(path.read_bytes() + b"\0\0\0\0" * MAX_ENTRIES)
    assert main(["plan", str(ck), "--dest", DEST]) == 2
    err = capsys.readouterr().err
    assert f"more than {MAX_ENTRIES} entries (limit {MAX_ENTRIES})" in err and path.name in err


def test_the_limit_counts_entries_exactly() -> None:
    three = encode_image(IMG_COMMON_MAGIC, PSTREE.magic, [b"", b"x", b""])
    assert len(split_image(three, PSTREE, "pstree.img", max_entries=3).payloads) == 3
    with pytest.raises(ImageError, match="more than 2 entries"):
        split_image(three, PSTREE, "pstree.img", max_entries=2)
    one = struct.pack("<III", IMG_COMMON_MAGIC, CORE.magic, 0)
    assert split_image(one, CORE, "core-1.img", max_entries=1).payloads == (b"",)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def test_an_mm_image_with_more_areas_than_linux_maps_is_refused(
    ck: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from criu_xstate.images.checkpoint import MAX_VMAS
    from criu_xstate.images.framing import MM
    from criu_xstate.images.pb import mm_pb2
    from criu_xstate.images.rewrite import single_pb

    path = next(ck.glob("mm-*.img"))
    mm = single_pb(path.read_bytes(), MM, mm_pb2.mm_entry, path)
    vma = mm.vmas[0].SerializeToString()
    tag = _varint(mm_pb2.mm_entry.DESCRIPTOR.fields_by_name["vmas"].number << 3 | 2)
    payload = mm.SerializeToString() + (tag + _varint(len(vma)) + vma) * (MAX_VMAS + 1 - len(mm.vmas))
    path.write_bytes(encode_image(IMG_COMMON_MAGIC, MM.magic, [payload]))
    t0 = time.monotonic()
    assert main(["plan", str(ck), "--dest", DEST]) == 2
    assert time.monotonic() - t0 < 5
    err = capsys.readouterr().err
    assert f"{MAX_VMAS + 1} memory areas (limit {MAX_VMAS})" in err and path.name in err
