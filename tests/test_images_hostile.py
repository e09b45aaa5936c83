"""Bad input: missing, truncated, corrupted images, wrong magics, sizes past the end, pagemaps that claim
more than the pages file holds, hostile archives. One clear error line naming the file, exit 2, nothing
written; never a traceback (hypothesis mutates real images)."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from criu_xstate.cli import main
from criu_xstate.errors import CriuXstateError, ImageError
from criu_xstate.images import open_checkpoint
from criu_xstate.images.checkpoint import MAX_ARCHIVE_MEMBERS
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
    from criu_xstate.images.rewrite import Pagemap, read_pagemap

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
    here = Path(__file__).parents[1] / "contrib" / "hosts" / "amd-epyc-zen4-vm-nopku.yaml"
    assert main(["plan", str(ck), "--dest", str(here)]) == 1
    out = capsys.readouterr().out
    assert "STACK_UNREADABLE" in out and f"tid {PID}" in out and "lazy" in out


def _tar(path: Path, members: list[tuple[str, bytes | None, str | None]], mode: str = "w") -> None:
    with tarfile.open(path, mode, format=tarfile.GNU_FORMAT) as tar:
        for name, data, link in members:
            info = tarfile.TarInfo(name)
            if link == "special":  # data is the member type
                assert data is not None
                info.type = data
                tar.addfile(info)
            elif link is not None:
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
    assert '"live":true' in capsys.readouterr().out  # compact JSON when stdout is not a terminal


def _special(name: str, kind: bytes) -> tuple[str, bytes | None, str | None]:
    return (name, kind, "special")


@pytest.mark.parametrize(
    ("members", "expect"),
    [
        ([("checkpoint/../../escape.img", b"x", None)], "outside"),
        ([("/etc/evil.img", b"x", None)], "outside"),
        ([("checkpoint/core-1.img", None, "/etc/passwd")], "link"),
        ([_special("checkpoint/core-1.img", tarfile.CHRTYPE)], "not a regular file"),
        ([_special("checkpoint/core-1.img", tarfile.FIFOTYPE)], "not a regular file"),
        ([_special("checkpoint/pages-2.img", tarfile.GNUTYPE_SPARSE)], "sparse"),
        ([("checkpoint/inventory.img", b"x", None)], "twice"),
    ],
    ids=["dotdot", "absolute", "symlink", "device", "fifo", "sparse", "duplicate"],
)
def test_hostile_archives_are_refused_and_leave_nothing(
    tmp_path: Path,
    private_tmp: Path,
    members: list[tuple[str, bytes | None, str | None]],
    expect: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    archive = tmp_path / "evil.tar"
    _tar(archive, [*_fixture_members(), *members])
    rc, err = _show(archive, capsys)
    assert rc == 2 and expect in err and err.count("\n") == 1, err
    assert not [p for p in tmp_path.rglob("*escape*")]
    assert list(private_tmp.iterdir()) == []  # the extraction directory is gone


@pytest.mark.parametrize("fmt", ["zstd", "gzip", "tar"])
def test_archive_format_comes_from_the_content_not_the_name(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    plain = tmp_path / "plain.tar"
    _tar(plain, _fixture_members())
    data = plain.read_bytes()
    if fmt == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    elif fmt == "gzip":
        import gzip

        data = gzip.compress(data)
    archive = tmp_path / "export.tar.gz"  # Podman's default name for what is zstd by default
    archive.write_bytes(data)
    assert main(["show", str(archive), "--json"]) == 0
    assert '"live":true' in capsys.readouterr().out  # compact JSON when stdout is not a terminal


@pytest.mark.parametrize(
    "content",
    [b"", b"garbage" * 100, b"\x28\xb5\x2f\xfd" + b"\x00" * 64, b"\x1f\x8b\x08" + b"\xff" * 64],
    ids=["empty", "garbage", "bad-zstd", "bad-gzip"],
)
def test_garbage_archives_are_one_line(
    tmp_path: Path, private_tmp: Path, content: bytes, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "x.tar.zst"
    archive.write_bytes(content)
    rc, err = _show(archive, capsys)
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert list(private_tmp.iterdir()) == []


def test_an_archive_larger_than_the_free_space_is_refused_before_writing(
    tmp_path: Path, private_tmp: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from criu_xstate.images import checkpoint

    archive = tmp_path / "big.tar"
    _tar(archive, _fixture_members())
    monkeypatch.setattr(checkpoint, "_room", lambda into: 50_000)
    rc, err = _show(archive, capsys)
    assert rc == 2 and "are free for extraction" in err
    assert list(private_tmp.iterdir()) == []


def test_member_count_is_bounded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from criu_xstate.images import checkpoint

    archive = tmp_path / "many.tar"
    _tar(archive, [(f"junk/{i}", b"", None) for i in range(50)] + _fixture_members())
    monkeypatch.setattr(checkpoint, "MAX_ARCHIVE_MEMBERS", 20)
    rc, err = _show(archive, capsys)
    assert rc == 2 and "more than 20 members" in err


def test_a_zstd_archive_with_many_members_streams_in_bounded_memory(tmp_path: Path) -> None:
    """200,000 empty members (the issue's 1.56 GB, 112 s case): headers are read once and forgotten, and
    the archive is refused at the member limit."""
    import subprocess
    import sys

    import zstandard

    plain = tmp_path / "many.tar"
    with tarfile.open(plain, "w") as tar:
        for i in range(200_000):
            tar.addfile(tarfile.TarInfo(f"junk/{i}"))
        for name, data, _ in _fixture_members():
            info = tarfile.TarInfo(name)
            assert data is not None
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = tmp_path / "many.tar.zst"
    archive.write_bytes(zstandard.ZstdCompressor().compress(plain.read_bytes()))
    plain.unlink()
    code = (  # VmHWM: this process's own peak (ru_maxrss would include the forking parent's)
        "import re, sys; from criu_xstate.cli import main; rc = main(['show', sys.argv[1]]); "
        "print(rc, re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(archive)], capture_output=True, text=True, timeout=300
    )
    rc, rss_kib = map(int, r.stdout.split()[-2:])
    assert rc == 2 and f"more than {MAX_ARCHIVE_MEMBERS} members" in r.stderr, r.stderr
    assert rss_kib < 100 * 1024, f"{rss_kib} KiB"


def _all_pages_in_parent(d: Path) -> None:
    """Rewrite the pagemap as an incremental dump's: every run PE_PARENT."""
    from criu_xstate.images.rewrite import Pagemap, read_pagemap

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


def _run_cli(args: list[str], timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "criu_xstate", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("pattern", ["pages-*.img", "core-*.img", "pstree.img", "mm-*.img"])
@pytest.mark.parametrize("kind", ["fifo", "symlink-outside", "directory"])
def test_special_files_as_images_never_hang_or_escape(tmp_path: Path, pattern: str, kind: str) -> None:
    d = tmp_path / "ck"
    shutil.copytree(FIXTURE, d)
    name = sorted(d.glob(pattern))[0].name
    victim = tmp_path / "outside.img"
    victim.write_bytes((d / name).read_bytes())
    (d / name).unlink()
    if kind == "fifo":
        os.mkfifo(d / name)
    elif kind == "directory":
        (d / name).mkdir()
    else:
        (d / name).symlink_to(victim)
    here = str(Path(__file__).parents[1] / "contrib" / "hosts" / "amd-zen4.yaml")
    r = _run_cli(["plan", str(d), "--dest", here])  # a hang would hit the timeout
    assert r.returncode == 2, r
    assert r.stderr.count("\n") == 1 and name in r.stderr, r.stderr
    assert any(w in r.stderr for w in ("FIFO", "symbolic link", "directory")), r.stderr


@pytest.mark.slow
def test_sigterm_during_extraction_leaves_no_temporary_files(tmp_path: Path) -> None:
    """A big archive (a 1 GiB pages image of random bytes: incompressible, slow to extract)."""
    import signal
    import time

    members = _fixture_members()
    plain = tmp_path / "big.tar"
    with tarfile.open(plain, "w") as tar:
        for name, data, _ in members:
            assert data is not None
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        info = tarfile.TarInfo("checkpoint/pages-99.img")
        info.size = 1 << 30
        with open("/dev/urandom", "rb") as rnd:
            tar.addfile(info, rnd)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    for signo, twice in (
        (signal.SIGTERM, False),
        (signal.SIGHUP, False),
        (signal.SIGINT, False),
        (signal.SIGTERM, True),
    ):
        p = subprocess.Popen(
            [sys.executable, "-m", "criu_xstate", "show", str(plain)],
            env={**os.environ, "TMPDIR": str(tmpdir)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # Python honours an inherited SIG_IGN for SIGINT (as a shell's background job has it):
            # the command must start with the default disposition for Ctrl-C to be tested at all
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.monotonic() + 30
        while not any(tmpdir.rglob("pages-99.img")):  # extraction has begun
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.01)
        p.send_signal(signo)
        if twice:  # a second signal while the first one's cleanup runs
            time.sleep(0.005)
            p.send_signal(signo)
        _, err = p.communicate(timeout=60)
        if signo == signal.SIGINT:
            assert p.returncode == 3 and "interrupted" in err, err
        elif twice:  # the second one may land after the cleanup, during interpreter shutdown
            assert p.returncode in (128 + signo, -signo) and "terminated" in err, err
        else:
            assert p.returncode == 128 + signo and "terminated" in err, err
        assert list(tmpdir.iterdir()) == []


@pytest.mark.parametrize("fmt", ["zstd", "gzip", "tar"])
def test_apply_on_an_archive_writes_an_archive_of_the_same_kind_with_every_member(
    tmp_path: Path, fmt: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from criu_xstate.images.checkpoint import archive_format

    plain = tmp_path / "plain.tar"
    extra = [
        ("config.dump", b'{"id": "abc"}', None),
        ("rootfs-diff.tar", b"\0" * 1024, None),
        ("descriptors.json", b"[]", None),
        ("checkpoint/descriptors.json", b"[1]", None),
    ]
    _tar(plain, [*extra, *[m for m in _fixture_members() if m[0].startswith("checkpoint/")]])
    data = plain.read_bytes()
    if fmt == "zstd":
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    elif fmt == "gzip":
        import gzip

        data = gzip.compress(data)
    src = tmp_path / "export.tar.gz"
    src.write_bytes(data)
    out = tmp_path / "translated.tar.gz"
    zen4 = str(Path(__file__).parents[1] / "contrib" / "hosts" / "amd-zen4.yaml")
    assert main(["apply", str(src), "--dest", zen4, "--out", str(out)]) == 0
    assert archive_format(out) == fmt
    capsys.readouterr()
    assert main(["plan", str(out), "--dest", zen4, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["verdict"] == "compatible"

    def members(path: Path) -> dict[str, bytes]:
        from criu_xstate.images.checkpoint import _open_archive

        tar, raw = _open_archive(path)
        with tar:
            got = {m.name: tar.extractfile(m).read() if m.isreg() else b"" for m in tar}  # type: ignore[union-attr]
        raw.close()
        return got

    before, after = members(src), members(out)
    assert list(before) == list(after)  # same members, same order
    for name, _, _ in extra:
        assert after[name] == before[name]
    changed = sorted(n for n in before if before[n] != after[n])
    assert changed and all(n.startswith("checkpoint/") and n.endswith(".img") for n in changed)


@pytest.mark.parametrize(
    ("config", "spec", "expect"),
    [
        (
            b'{"name": "web", "id": "0123456789abcdef", "rootfsImageName": "quay.io/x:1", "runtime": "runc",'
            b' "createdTime": "2026-11-25T08:00:00Z"}',
            b'{"annotations": {"io.container.manager": "libpod"}}',
            {
                "name": "web",
                "id": "0123456789abcdef",
                "image": "quay.io/x:1",
                "runtime": "runc",
                "engine": "Podman",
                "created": "2026-11-25T08:00:00Z",
            },
        ),
        (b"not json \x1b[2J", b"[1, 2]", None),
        (
            b'{"name": "evil\\u001b[2J"}',
            b"{}",
            {"name": None, "id": None, "image": None, "runtime": None, "engine": "unknown", "created": None},
        ),
    ],
    ids=["podman", "garbage", "escape"],
)
def test_show_names_the_container_from_its_metadata(
    tmp_path: Path, config: bytes, spec: bytes, expect: object, capsys: pytest.CaptureFixture[str]
) -> None:
    archive = tmp_path / "export.tar"
    members = [m for m in _fixture_members() if m[0].startswith("checkpoint/")]
    _tar(archive, [("config.dump", config, None), ("spec.dump", spec, None), *members])
    assert main(["show", str(archive), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["container"] == expect
