"""Bad input: missing, truncated, corrupted images, wrong magics, sizes past the end, pagemaps that claim
more than the pages file holds, hostile archives. One clear error line naming the file, exit 2, nothing
written; never a traceback (hypothesis mutates real images)."""

from __future__ import annotations

import io
import os
import shutil
import struct
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from criu_xstate.cli import main
from criu_xstate.errors import CriuXstateError, ImageError
from criu_xstate.images import open_checkpoint
from criu_xstate.images.framing import CORE, split_image
from criu_xstate.images.pb import pagemap_pb2
from criu_xstate.model import load_model

FIXTURE = Path(__file__).parent / "fixtures" / "siginfo"
PID = next(int(p.name[5:-4]) for p in FIXTURE.glob("core-*.img"))


@pytest.fixture
def ck(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    shutil.copytree(FIXTURE, d)
    return d


def _show(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    rc = main(["show", str(path)])
    err = capsys.readouterr().err
    return rc, err


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.mark.parametrize(
    ("mutate", "expect"),
    [
        (lambda d: (d / f"core-{PID}.img").unlink(), "missing"),
        (lambda d: (d / f"core-{PID}.img").write_bytes((d / f"core-{PID}.img").read_bytes()[:100]), "remain"),
        (lambda d: (d / f"core-{PID}.img").write_bytes(b""), "empty"),
        (lambda d: (d / f"mm-{PID}.img").write_bytes(b"\x19\x43\x56\x54\x00\x00\x00\x00"), "magic"),
        (lambda d: (d / "pstree.img").write_bytes(b"\x01\x02\x03\x04\x05\x06\x07\x08"), "head magic"),
        (
            lambda d: (d / f"core-{PID}.img").write_bytes(
                (d / f"core-{PID}.img").read_bytes()[:8] + struct.pack("<I", 0xFFFFFF00)
            ),
            "claims",
        ),
        (lambda d: (d / "pages-1.img").write_bytes((d / "pages-1.img").read_bytes()[:8192]), "present pages"),
        (lambda d: (d / "inventory.img").unlink(), "not a CRIU images directory"),
    ],
    ids=[
        "missing-core",
        "truncated-core",
        "empty-core",
        "wrong-magic",
        "bad-head-magic",
        "size-past-eof",
        "pagemap-beyond-pages",
        "no-inventory",
    ],
)
def test_bad_images_give_one_clear_line(
    ck: Path, capsys: pytest.CaptureFixture[str], mutate, expect: str
) -> None:  # type: ignore[no-untyped-def]
    mutate(ck)
    before = _snapshot(ck)
    rc, err = _show(ck, capsys)
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("criu-xstate: error: ") and "Traceback" not in err
    assert expect in err and str(ck) in err
    assert _snapshot(ck) == before


def test_corrupted_payload_is_an_image_error(ck: Path) -> None:
    core = ck / f"core-{PID}.img"
    data = bytearray(core.read_bytes())
    data[12:20] = b"\xff" * 8  # garbage inside the protobuf payload
    core.write_bytes(bytes(data))
    with pytest.raises(ImageError, match="core"), open_checkpoint(ck) as c:
        load_model(c)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    name=st.sampled_from([f"core-{PID}.img", f"mm-{PID}.img", f"pagemap-{PID}.img", "pstree.img"]),
    cuts=st.lists(st.tuples(st.integers(0, 4000), st.integers(0, 255)), min_size=1, max_size=8),
    truncate=st.one_of(st.none(), st.integers(0, 4000)),
)
def test_mutated_images_only_raise_our_errors(
    tmp_path_factory: pytest.TempPathFactory, name: str, cuts: list[tuple[int, int]], truncate: int | None
) -> None:
    d = tmp_path_factory.mktemp("mut")
    shutil.copytree(FIXTURE, d, dirs_exist_ok=True)
    data = bytearray((d / name).read_bytes())
    for pos, value in cuts:
        if pos < len(data):
            data[pos] = value
    if truncate is not None:
        del data[truncate:]
    (d / name).write_bytes(bytes(data))
    try:
        with open_checkpoint(d) as c:
            model = load_model(c)
            for t in model.threads():
                _ = t.frames
    except CriuXstateError:
        pass


def test_framing_rejects_entry_size_past_end() -> None:
    blob = struct.pack("<III", 0x54564319, CORE.magic, 1000) + b"x" * 10
    with pytest.raises(ImageError, match="claims 1000 bytes but only 10 remain"):
        split_image(blob, CORE, "core-1.img")


def test_lazy_stack_pages_are_unreadable_and_refused(ck: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from criu_xstate.images.framing import Pagemap, read_pagemap

    pm = read_pagemap(ck / f"pagemap-{PID}.img")
    entries = []
    pages = (ck / "pages-1.img").read_bytes()
    offset, kept = 0, bytearray()
    for e in pm.entries:
        n = int(e.compat_nr_pages or e.nr_pages)
        e2 = pagemap_pb2.pagemap_entry()
        e2.CopyFrom(e)
        if int(e.vaddr) >= 0x7F0000000000:  # the stack: lazy, not in the image
            e2.flags = 2
        else:
            kept += pages[offset : offset + n * 4096]
        offset += n * 4096
        entries.append(e2)
    (ck / f"pagemap-{PID}.img").write_bytes(Pagemap(pm.raw, pm.head, tuple(entries)).encode())
    (ck / "pages-1.img").write_bytes(bytes(kept))
    here = Path(__file__).parents[1] / "contrib" / "hosts" / "this-machine-zen4-epyc-vm.yaml"
    assert main(["plan", str(ck), "--dest", str(here)]) == 1
    out = capsys.readouterr().out
    assert "STACK_UNREADABLE" in out and f"tid {PID}" in out and "lazy" in out


def _tar(path: Path, members: list[tuple[str, bytes | None, str | None]], mode: str = "w") -> None:
    with tarfile.open(path, mode) as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type = tarfile.SYMTYPE
                info.linkname = link
                tar.addfile(info)
            else:
                assert data is not None
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _fixture_members() -> list[tuple[str, bytes | None, str | None]]:
    out: list[tuple[str, bytes | None, str | None]] = [
        ("config.dump", b"{}", None),
        ("rootfs-diff.tar", b"x", None),
    ]
    out += [(f"checkpoint/{p.name}", p.read_bytes(), None) for p in sorted(FIXTURE.glob("*.img"))]
    return out


@pytest.mark.parametrize("suffix", [".tar", ".tar.gz", ".tar.zst"])
def test_archives_are_read(tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]) -> None:
    archive = tmp_path / f"checkpoint{suffix}"
    if suffix == ".tar.zst":
        zstandard = pytest.importorskip("zstandard")
        raw = tmp_path / "plain.tar"
        _tar(raw, _fixture_members())
        archive.write_bytes(zstandard.ZstdCompressor().compress(raw.read_bytes()))
    else:
        _tar(archive, _fixture_members(), "w:gz" if suffix == ".tar.gz" else "w")
    assert main(["show", str(archive), "--json"]) == 0
    assert '"live": true' in capsys.readouterr().out


@pytest.mark.parametrize(
    ("member", "expect"),
    [
        (("checkpoint/../../escape.img", b"x", None), "outside"),
        (("/etc/evil.img", b"x", None), "outside"),
        (("checkpoint/core-1.img", None, "/etc/passwd"), "link"),
    ],
)
def test_hostile_archives_are_refused(
    tmp_path: Path,
    member: tuple[str, bytes | None, str | None],
    expect: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    archive = tmp_path / "evil.tar"
    _tar(archive, [member, *_fixture_members()])
    rc, err = _show(archive, capsys)
    assert rc == 2 and expect in err and "Traceback" not in err
    assert not (tmp_path.parent / "escape.img").exists()


def _all_pages_in_parent(d: Path) -> None:
    """Rewrite the pagemap as an incremental dump's: every run PE_PARENT."""
    from criu_xstate.images.framing import Pagemap, read_pagemap

    pm = read_pagemap(d / f"pagemap-{PID}.img")
    entries = []
    for e in pm.entries:
        e2 = pagemap_pb2.pagemap_entry()
        e2.CopyFrom(e)
        e2.flags = 1  # PE_PARENT
        entries.append(e2)
    (d / f"pagemap-{PID}.img").write_bytes(Pagemap(pm.raw, pm.head, tuple(entries)).encode())


def test_parent_chain_pages_are_read_from_the_parent(tmp_path: Path) -> None:
    """An incremental dump: the child's pagemap says PE_PARENT and its pages file is empty."""

    parent = tmp_path / "pre"
    child = tmp_path / "dump"
    shutil.copytree(FIXTURE, parent)
    shutil.copytree(FIXTURE, child)
    _all_pages_in_parent(child)
    (child / "pages-1.img").write_bytes(b"")
    os.symlink("../pre", child / "parent")
    with open_checkpoint(FIXTURE) as c:
        want = [(f.address, f.image) for t in load_model(c).threads() for f in t.frames.live]
    with open_checkpoint(child) as c:
        got = [(f.address, f.image) for t in load_model(c).threads() for f in t.frames.live]
    assert got == want and want


def test_parent_loop_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:

    d = tmp_path / "ck"
    shutil.copytree(FIXTURE, d)
    _all_pages_in_parent(d)
    os.symlink(".", d / "parent")
    rc, err = _show(d, capsys)
    assert rc == 2 and "parent" in err
