"""Archives whose headers or members are sized to exhaust memory, disk or time: each is refused (or
extracted within its real cost) with one error line, exit 2, and nothing left in the temporary
directory. The tar stream is parsed by criu_xstate.images.archive, not tarfile (which reads a pax header
or GNU long name of any declared size into memory: 3.2 GB for a 98 KB archive)."""

from __future__ import annotations

import gzip
import io
import tarfile
from pathlib import Path

import pytest

from criu_xstate.cli import main
from criu_xstate.errors import ImageError
from criu_xstate.images import archive
from criu_xstate.images.checkpoint import extract_archive
from tests.fuzz_inputs import header

FIXTURE = Path(__file__).parent / "fixtures" / "siginfo"


def _fixture_tar(extra: list[tarfile.TarInfo | tuple[tarfile.TarInfo, bytes]], fmt: int) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for p in sorted(FIXTURE.glob("*.img")):
            tar.add(p, arcname=f"checkpoint/{p.name}")
        for item in extra:
            info, data = item if isinstance(item, tuple) else (item, b"")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _show(path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    rc = main(["show", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and err.startswith("criu-xstate: error: "), err
    return err


@pytest.mark.parametrize("kind", [b"x", b"g", b"L", b"K"], ids=["pax", "pax-global", "longname", "longlink"])
def test_a_huge_metadata_header_is_refused_before_it_is_read(
    tmp_path: Path, private_tmp: Path, kind: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bomb.tar.gz"
    path.write_bytes(gzip.compress(header(b"PaxHeaders/x", 3 << 30, kind)))  # only the header
    err = _show(path, capsys)
    assert f"of {3 << 30} bytes (limit {archive.Limits.meta_bytes})" in err
    assert list(private_tmp.iterdir()) == []


def test_pax_and_gnu_long_names_are_checked_like_short_ones(
    tmp_path: Path, private_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_escape = "checkpoint/" + "d/" * 80 + "../" * 90 + "escape.img"
    for fmt in (tarfile.PAX_FORMAT, tarfile.GNU_FORMAT):
        path = tmp_path / f"long-{fmt}.tar"
        path.write_bytes(_fixture_tar([tarfile.TarInfo(long_escape)], fmt))
        assert "points outside the archive" in _show(path, capsys)
    assert not list(tmp_path.rglob("escape.img"))
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize("name", ["config.dump", "rootfs-diff.tar", "./checkpoint/core-6649.img"])
def test_a_name_twice_anywhere_is_refused(
    tmp_path: Path, private_tmp: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    extra = [(tarfile.TarInfo(name), b"{}"), (tarfile.TarInfo(name), b"{}")]
    if name.endswith(".img"):
        extra = extra[:1]  # the fixture already holds it
    path = tmp_path / "dup.tar"
    path.write_bytes(_fixture_tar(extra, tarfile.PAX_FORMAT))
    assert "twice" in _show(path, capsys)
    assert list(private_tmp.iterdir()) == []


def test_zero_filled_members_cost_no_disk(tmp_path: Path) -> None:
    size = 64 << 20
    data = bytearray(size)
    data[size // 2] = 1  # one non-zero byte: one block of real data in the middle
    path = tmp_path / "zeros.tar.gz"
    member = (tarfile.TarInfo("checkpoint/pages-9.img"), bytes(data))
    path.write_bytes(gzip.compress(_fixture_tar([member], tarfile.PAX_FORMAT)))
    into = tmp_path / "into"
    into.mkdir()
    extract_archive(path, into)
    out = into / "pages-9.img"
    assert out.read_bytes() == data
    assert out.stat().st_blocks * 512 < 8 << 20, out.stat().st_blocks


def test_the_extraction_limit_is_named_and_can_be_set(
    tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ck.tar"
    path.write_bytes(_fixture_tar([], tarfile.PAX_FORMAT))
    monkeypatch.setenv(archive.ENV_IMAGE_BYTES, "30000")  # the stream (4 x) fits, the images do not
    assert "past the 30000-byte extraction limit (CRIU_XSTATE_MAX_EXTRACT" in _show(path, capsys)
    monkeypatch.setenv(archive.ENV_IMAGE_BYTES, "1e9\x1b[2J")
    assert "is not a byte count" in _show(path, capsys)
    monkeypatch.setenv(archive.ENV_IMAGE_BYTES, str(1 << 30))
    assert main(["show", str(path)]) == 0
    assert list(private_tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("blocks", "expect"),
    [
        (header(b"checkpoint/core-1.img", 100, b"0")[:300], "partial header"),
        (header(b"checkpoint/core-1.img", 100, b"0") + b"x" * 50, "ends 50 bytes early"),
        (b"\x01" * 512 + bytes(512), "bad header checksum"),
        (header(b"checkpoint/core-1.img", 0, b"0")[:124] + b"9" * 12 + bytes(376), "bad header checksum"),
        (header(b"x", 5, b"x") + b"5 a\n" + bytes(508), "pax record without"),
        (header(b"checkpoint/pages-1.img", 0, b"S"), "sparse"),
        (header(b"checkpoint/pages-1.img", 0, b"3"), "character device"),
        (header(b"checkpoint/pages-1.img", 0, b"V"), "tar type"),
        (bytes(1024), "no CRIU images"),
    ],
    ids=[
        "partial",
        "short-data",
        "checksum",
        "size-field",
        "pax-record",
        "sparse",
        "device",
        "odd-type",
        "empty",
    ],
)
def test_broken_streams_are_one_line(
    tmp_path: Path, private_tmp: Path, blocks: bytes, expect: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.tar.zst"  # the name lies: gzip content
    path.write_bytes(gzip.compress(blocks))
    assert expect in _show(path, capsys)
    assert list(private_tmp.iterdir()) == []


def test_unsupported_compression_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ck.tar.xz"
    path.write_bytes(b"\xfd7zXZ\x00" + bytes(100))
    assert "xz compression is not supported" in _show(path, capsys)


def test_a_base256_size_is_read(tmp_path: Path) -> None:
    """GNU writes sizes past 8 GiB in base-256; a lying one is refused by the budget, not believed."""
    h = bytearray(header(b"checkpoint/pages-1.img", 0, b"0"))
    h[124:136] = b"\x80" + (1 << 60).to_bytes(11, "big")
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    path = tmp_path / "b256.tar"
    path.write_bytes(bytes(h) + bytes(1024))
    into = tmp_path / "into"
    into.mkdir()
    with pytest.raises(ImageError, match=r"past the \d+-byte extraction limit"):
        extract_archive(path, into)
    assert list(into.iterdir()) == []


def test_the_unpacked_stream_is_bounded_skipped_members_included(
    tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A zero bomb in a member that is never written still costs time: the whole stream is bounded."""
    rootfs = (tarfile.TarInfo("rootfs-diff.tar"), bytes(600_000))
    path = tmp_path / "ck.tar.zst"
    path.write_bytes(gzip.compress(_fixture_tar([rootfs], tarfile.PAX_FORMAT)))
    monkeypatch.setenv(archive.ENV_IMAGE_BYTES, "150000")  # the images fit; 4 x 150000 does not
    assert "unpacks to more than 600000 bytes" in _show(path, capsys)
    assert list(private_tmp.iterdir()) == []
    monkeypatch.setenv(archive.ENV_IMAGE_BYTES, "200000")
    assert main(["show", str(path)]) == 0


@pytest.mark.parametrize(("records", "refused"), [({"comment": "git archive"}, False), ({"path": "x"}, True)])
def test_a_global_pax_header_may_not_rename_every_member(
    tmp_path: Path, records: dict[str, str], refused: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT, pax_headers=records) as tar:
        for p in sorted(FIXTURE.glob("*.img")):
            tar.add(p, arcname=f"checkpoint/{p.name}")
    path = tmp_path / "g.tar"
    path.write_bytes(buf.getvalue())
    if refused:
        assert "global pax header" in _show(path, capsys)
    else:
        assert main(["show", str(path)]) == 0
