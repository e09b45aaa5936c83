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


@pytest.mark.parametrize("pattern", ["pstree.img", "pagemap-*.img"])
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
