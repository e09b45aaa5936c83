"""Every image kind replaced by a FIFO, a device, a socket, a directory or a symlink (outside the
checkpoint, inside it, dangling): `show` and `plan` never block, never read through the link, and
answer with one error line naming the file, exit 2. The `parent` link of an incremental dump stays
legitimate (tests/test_images_hostile.py reads pages through it)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from criu_xstate.cli import main

FIXTURE = Path(__file__).parent / "fixtures" / "siginfo"
DEST = str(Path(__file__).parents[1] / "criu_xstate" / "data" / "hosts" / "amd-zen4.yaml")
READ = ("inventory", "pstree", "core-", "mm-", "pagemap-", "pages-")  # what show and plan read
NAMES = sorted(p.name for p in FIXTURE.glob("*.img") if p.name.startswith(READ))


@contextlib.contextmanager
def _no_hang(seconds: int) -> Iterator[None]:
    def fire(signo: int, frame: object) -> None:
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _fifo(path: Path, outside: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path, outside: Path) -> None:
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(path))
    s.close()


def _chardev(path: Path, outside: Path) -> None:
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # /dev/zero: reads never end
    except PermissionError:
        pytest.skip("mknod needs CAP_MKNOD")


def _directory(path: Path, outside: Path) -> None:
    path.mkdir()


def _link_outside(path: Path, outside: Path) -> None:
    path.symlink_to(outside)


def _link_to_zero(path: Path, outside: Path) -> None:
    path.symlink_to("/dev/zero")


def _link_inside(path: Path, outside: Path) -> None:
    copy = path.with_name(f"copy-of-{path.name}")
    if outside.exists():
        copy.write_bytes(outside.read_bytes())
    path.symlink_to(copy.name)


def _dangling(path: Path, outside: Path) -> None:
    path.symlink_to(outside.with_name("nowhere.img"))


KINDS: dict[str, Callable[[Path, Path], None]] = {
    "fifo": _fifo,
    "socket": _socket,
    "chardev": _chardev,
    "directory": _directory,
    "symlink-outside": _link_outside,
    "symlink-dev-zero": _link_to_zero,
    "symlink-inside": _link_inside,
    "dangling-symlink": _dangling,
}
WORDS = ("FIFO", "socket", "device", "directory", "symbolic link", "missing")


@pytest.mark.parametrize("name", [*NAMES, "cpuinfo.img"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_special_files_as_images_never_hang_or_escape(
    tmp_path: Path, name: str, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ck = tmp_path / "ck"
    shutil.copytree(FIXTURE, ck)
    outside = tmp_path / "outside.img"
    if (ck / name).exists():
        outside.write_bytes((ck / name).read_bytes())
        (ck / name).unlink()
    KINDS[kind](ck / name, outside)
    show = [["show", str(ck)]] if name != "cpuinfo.img" else []  # show does not read cpuinfo.img
    for argv in [*show, ["plan", str(ck), "--dest", DEST]]:
        with _no_hang(10):
            rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and err.count("\n") == 1, (argv, err)
        assert name in err and any(w in err for w in WORDS), err


def _make_special(path: Path, kind: str) -> None:
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "link-to-fifo":
        os.mkfifo(path.with_name("fifo"))
        path.symlink_to(path.with_name("fifo"))
    elif kind == "link-to-dev-zero":
        path.symlink_to("/dev/zero")
    else:
        _socket(path, path)


@pytest.mark.parametrize("kind", ["fifo", "link-to-fifo", "link-to-dev-zero", "socket"])
@pytest.mark.parametrize("role", ["checkpoint", "profile"])
def test_special_files_as_arguments_never_hang(
    tmp_path: Path, kind: str, role: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A checkpoint argument (taken for an archive when it is not a directory) or a profile that is a
    FIFO, a socket or leads to /dev/zero: one error line, never a read."""
    special = tmp_path / ("ck.tar.zst" if role == "checkpoint" else "host.yaml")
    _make_special(special, kind)
    argv = [
        "plan",
        str(special if role == "checkpoint" else FIXTURE),
        "--dest",
        str(special if role == "profile" else DEST),
    ]
    with _no_hang(10):
        rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and special.name in err, err
