"""Crash-safe apply and undo: journal first, verified preconditions, rollback on failure, one writer."""

from __future__ import annotations

import base64
import binascii
import errno
import os
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from criu_xstate import fsio, journal, transaction
from criu_xstate.errors import ApplyError
from criu_xstate.transaction import Append, ByteEdit, FileWrite, apply_changes, journal_state, undo


def _checkpoint(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    (d / "pages-1.img").write_bytes(bytes(range(256)) * 64)
    (d / "core-1.img").write_bytes(b"core-original")
    return d


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if not p.name.startswith(".")}


def _changes(d: Path) -> list[transaction.Change]:
    pages = (d / "pages-1.img").read_bytes()
    return [
        ByteEdit("pages-1.img", 100, pages[100:108], b"ABCDEFGH"),
        Append("pages-1.img", len(pages), b"\x01" * 4096),
        FileWrite("core-1.img", b"core-original", b"core-translated"),
        FileWrite("mm-1.img", None, b"new-file"),
    ]


def test_apply_then_undo_restores_every_byte(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    before = _snapshot(d)
    written = apply_changes(d, _changes(d))
    assert written == 8 + 4096 + len(b"core-translated") + len(b"new-file")
    after = _snapshot(d)
    assert after["pages-1.img"][100:108] == b"ABCDEFGH" and len(after["pages-1.img"]) == 16384 + 4096
    assert after["core-1.img"] == b"core-translated" and after["mm-1.img"] == b"new-file"
    assert journal_state(d) == "complete"
    undo(d)
    assert _snapshot(d) == before and journal_state(d) is None


def test_checkpoint_changed_since_plan_is_refused_untouched(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    changes = _changes(d)
    (d / "core-1.img").write_bytes(b"someone else")
    before = _snapshot(d)
    with pytest.raises(ApplyError, match="changed since the plan"):
        apply_changes(d, changes)
    assert _snapshot(d) == before and journal_state(d) is None


def test_failure_midway_rolls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _checkpoint(tmp_path)
    before = _snapshot(d)

    def enospc_at_core(point: str, name: str) -> None:
        if point == "rename" and name == "core-1.img":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fsio, "fault_hook", enospc_at_core)
    with pytest.raises(ApplyError, match="rolled back"):
        apply_changes(d, _changes(d))
    monkeypatch.setattr(fsio, "fault_hook", None)
    assert _snapshot(d) == before and journal_state(d) is None
    assert sorted(p.name for p in d.iterdir()) == sorted(before)  # no temporary file left


def test_crash_leaves_pending_journal_that_undo_reverts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = _checkpoint(tmp_path)
    before = _snapshot(d)

    class Crash(BaseException):
        pass

    def crash_after_first_pwrite(point: str, name: str) -> None:
        if point == "fsync" and name == "pages-1.img":
            raise Crash

    monkeypatch.setattr(fsio, "fault_hook", crash_after_first_pwrite)
    with pytest.raises(Crash):
        apply_changes(d, _changes(d))
    monkeypatch.setattr(fsio, "fault_hook", None)
    assert journal_state(d) == "pending"
    with pytest.raises(ApplyError, match="interrupted"):
        apply_changes(d, _changes(d))
    undo(d)
    assert _snapshot(d) == before


def test_second_writer_is_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    with transaction.transaction(d), pytest.raises(ApplyError, match="another criu-xstate"):
        apply_changes(d, _changes(d))


def test_read_only_directory(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    if os.geteuid() == 0:  # root ignores permission bits: use a real read-only mount
        mnt = tmp_path / "ro"
        mnt.mkdir()
        if subprocess.run(["mount", "--bind", "-o", "ro", str(d), str(mnt)], capture_output=True).returncode:
            pytest.skip("cannot make a read-only bind mount here")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(mnt)], check=True)
        try:
            with pytest.raises(ApplyError, match=r"cannot write the journal .*nothing was changed"):
                apply_changes(mnt, _changes(mnt))
        finally:
            subprocess.run(["umount", str(mnt)], check=True)
    else:
        d.chmod(0o555)
        try:
            with pytest.raises(ApplyError, match="nothing was changed"):
                apply_changes(d, _changes(d))
        finally:
            d.chmod(0o755)


def test_names_outside_the_directory_are_refused(tmp_path: Path) -> None:
    d = _checkpoint(tmp_path)
    with pytest.raises(ApplyError, match="refusing"):
        apply_changes(d, [FileWrite("../escape.img", None, b"x")])


def test_undo_without_journal(tmp_path: Path) -> None:
    with pytest.raises(ApplyError, match="nothing to undo"):
        undo(_checkpoint(tmp_path))


@given(
    st.one_of(
        st.binary(max_size=48),
        st.text(alphabet="ABCabc019+/=-_ \n\x00", max_size=24).map(str.encode),
        st.binary(max_size=36).map(base64.b64encode),
    )
)
def test_the_journals_base64_is_the_standard_librarys(text: bytes) -> None:
    """The journal decodes base64 with binascii (no base64 module in the hook): what
    ``base64.b64decode(validate=True)`` accepts, with the same bytes, and nothing else."""
    try:
        want: bytes | None = base64.b64decode(text, validate=True)
    except binascii.Error:
        want = None
    try:
        got: bytes | None = journal._b64decode(text)
    except binascii.Error:
        got = None
    assert got == want
    if want is not None:
        assert journal._b64(want).encode() == base64.b64encode(want)
