"""What the write path must never do, each case reproduced on a real dump: lose the original through the
journal, write through a link into another file, hang on a FIFO, race a second writer, or leave files
behind after a refusal (issue 9; docs/journal.md)."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
from pathlib import Path

import pytest

from criu_xstate.cli import main
from criu_xstate.fsio import JOURNAL
from criu_xstate.transaction import journal_state

REPO = Path(__file__).parents[1]
FIXTURES = REPO / "tests" / "fixtures"
HOSTS = REPO / "contrib" / "hosts"
ZEN4 = str(HOSTS / "amd-zen4.yaml")  # threads fixture: translate in place
SKYLAKE = str(HOSTS / "intel-skylake-sp.yaml")  # ... translate with relocation
ZEN2 = str(HOSTS / "amd-zen2.yaml")  # ... refused
V2 = "criu-xstate/journal/v2"


def files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file() and not p.is_symlink()}


def images(d: Path) -> dict[str, bytes]:
    return {k: v for k, v in files(d).items() if k != JOURNAL}


@pytest.fixture
def ck(tmp_path: Path) -> Path:
    d = tmp_path / "ck"
    shutil.copytree(FIXTURES / "threads", d)
    return d


def apply(ck: Path, dest: str, *more: str) -> int:
    return main(["apply", str(ck), "--dest", dest, "--in-place", *more])


def test_undo_after_applies_for_two_hosts_and_the_hook_returns_the_original(
    ck: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = files(ck)
    assert apply(ck, ZEN4) == 0
    assert apply(ck, SKYLAKE) == 0
    monkeypatch.setenv("CRTOOLS_SCRIPT_ACTION", "pre-restore")
    monkeypatch.setenv("CRTOOLS_IMAGE_DIR", str(ck))
    monkeypatch.setenv("CRIU_XSTATE_DEST", ZEN4)
    assert main(["hook"]) == 0  # a third translation, by the hook
    assert images(ck) != original
    assert main(["undo", str(ck)]) == 0
    assert files(ck) == original  # the original dump, and no file of ours


def test_applying_twice_for_one_host_is_a_no_op(ck: Path) -> None:
    assert apply(ck, ZEN4) == 0
    once = files(ck)
    assert apply(ck, ZEN4) == 0
    assert files(ck) == once


def test_undo_refuses_to_overwrite_a_new_dump(ck: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert apply(ck, SKYLAKE) == 0
    journal = (ck / JOURNAL).read_bytes()
    shutil.rmtree(ck)  # a re-dump into the same directory: other images, our journal still there
    shutil.copytree(FIXTURES / "nested", ck)
    (ck / JOURNAL).write_bytes(journal)
    redump = files(ck)
    assert main(["undo", str(ck)]) == 2
    assert "neither what criu-xstate wrote nor the original" in capsys.readouterr().err
    assert files(ck) == redump
    assert apply(ck, ZEN4) == 2  # nor does a later apply build on a journal that no longer fits
    assert "not what criu-xstate last wrote" in capsys.readouterr().err
    assert files(ck) == redump
    assert main(["undo", "--forget", str(ck)]) == 0
    assert not (ck / JOURNAL).exists()
    assert files(ck) == {k: v for k, v in redump.items() if k != JOURNAL}


def test_in_place_on_an_out_copy_never_writes_into_the_source(tmp_path: Path, ck: Path) -> None:
    """apply --out hard-links unchanged images; a later in-place write must unshare them first."""
    source = files(ck)
    out = tmp_path / "out"
    assert main(["apply", str(ck), "--dest", ZEN4, "--out", str(out), "--self-contained"]) == 0
    linked = [p for p in out.iterdir() if p.is_file() and p.stat().st_nlink > 1]
    assert linked, "the copy shares no inode with the source: this test would prove nothing"
    assert apply(out, SKYLAKE) == 0
    assert files(ck) == source
    assert main(["undo", str(out)]) == 0
    assert files(ck) == source


@pytest.mark.parametrize("what", ["image", "journal"])
def test_a_symlink_in_the_checkpoint_is_never_written_through(
    tmp_path: Path, ck: Path, what: str, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "victim"
    if what == "image":
        pages = next(p for p in sorted(ck.glob("pages-*.img")) if p.stat().st_size > 0)
        victim.write_bytes(pages.read_bytes())
        pages.unlink()
        pages.symlink_to(victim)
    else:
        victim.write_bytes(b"{}")
        (ck / JOURNAL).symlink_to(victim)
    before = victim.read_bytes()
    rc = apply(ck, ZEN4)
    assert rc == 2, capsys.readouterr()
    assert "symbolic link" in capsys.readouterr().err
    assert victim.read_bytes() == before
    assert main(["undo", str(ck)]) == 2
    assert victim.read_bytes() == before


def test_a_fifo_as_journal_does_not_hang(ck: Path, capsys: pytest.CaptureFixture[str]) -> None:
    os.mkfifo(ck / JOURNAL)
    assert apply(ck, ZEN4) == 2
    assert "not a regular file" in capsys.readouterr().err
    assert main(["undo", str(ck)]) == 2


@pytest.mark.parametrize(
    ("journal", "message"),
    [
        (
            {"schema": "criu-xstate/journal/v2", "state": "complete", "originals": {"../escape": {}}},
            "journal",
        ),
        (
            {"schema": "criu-xstate/journal/v2", "state": "pending", "originals": {"/etc/passwd": {}}},
            "journal",
        ),
        ({"schema": "criu-xstate/journal/v2", "state": "weird"}, "unknown state"),
        ({"schema": "criu-xstate/journal/v1", "state": "complete", "entries": []}, "unknown schema"),
        ([1, 2, 3], "expected an object"),
    ],
)
def test_a_crafted_journal_is_one_line_and_writes_nothing(
    tmp_path: Path, ck: Path, journal: object, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (ck / JOURNAL).write_text(json.dumps(journal))
    before = files(ck)
    assert main(["undo", str(ck)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert files(ck) == before
    assert not (tmp_path / "escape").exists()


def test_a_refusal_leaves_no_file_in_the_images_directory(ck: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = sorted(p.name for p in ck.iterdir())
    monkeypatch.setenv("CRTOOLS_SCRIPT_ACTION", "pre-restore")
    monkeypatch.setenv("CRTOOLS_IMAGE_DIR", str(ck))
    monkeypatch.setenv("CRIU_XSTATE_DEST", ZEN2)
    assert main(["hook"]) == 1
    monkeypatch.setenv("CRIU_XSTATE_DEST", ZEN4)
    monkeypatch.setenv("CRIU_XSTATE_MODE", "check")
    assert main(["hook"]) == 1
    assert apply(ck, ZEN2) == 1
    assert sorted(p.name for p in ck.iterdir()) == before


@pytest.mark.parametrize("kind", ["file", "dangling link", "non-empty dir", "parent is a file"])
def test_bad_out_is_one_line_and_exit_2(
    tmp_path: Path, ck: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    if kind == "file":
        out.write_text("x")
    elif kind == "dangling link":
        out.symlink_to(tmp_path / "nowhere")
    elif kind == "non-empty dir":
        out.mkdir()
        (out / "x").write_text("x")
    else:
        (tmp_path / "no").write_text("x")
        out = tmp_path / "no" / "such" / "out"
    assert main(["apply", str(ck), "--dest", ZEN4, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("criu-xstate: error:"), err
    assert not (tmp_path / "nowhere").exists()


def test_out_creates_missing_parents(tmp_path: Path, ck: Path) -> None:
    out = tmp_path / "new" / "dirs" / "out"
    assert main(["apply", str(ck), "--dest", ZEN4, "--out", str(out)]) == 0
    assert (out / "parent").is_symlink() and journal_state(out) is None


def test_a_pending_journal_is_visible_to_plan_and_blocks_apply_out(
    tmp_path: Path, ck: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.faults import interrupt_at_first_pwrite

    interrupt_at_first_pwrite(monkeypatch, lambda: apply(ck, ZEN4))
    assert journal_state(ck) == "pending"
    capsys.readouterr()
    assert main(["plan", str(ck), "--dest", ZEN4]) == 2
    assert "interrupted" in capsys.readouterr().err
    assert main(["apply", str(ck), "--dest", ZEN4, "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists()
    assert main(["show", str(ck)]) == 0
    assert "interrupted" in capsys.readouterr().out


def _race_apply(ck: str, dest: str, q: multiprocessing.Queue[int]) -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    q.put(main(["apply", ck, "--dest", dest, "--in-place"]))


def _race_undo(ck: str, dest: str, q: multiprocessing.Queue[int]) -> None:
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
    q.put(main(["undo", ck]))


@pytest.mark.parametrize("rival", [_race_apply, _race_undo], ids=["apply vs apply", "apply vs undo"])
def test_two_writers_racing_lose_nothing(tmp_path: Path, rival: object) -> None:
    """One wins, the other gets a clear error or finds nothing to do; the result is always a state
    that undo turns into the original dump."""
    ctx = multiprocessing.get_context("fork")
    original = files(FIXTURES / "threads")
    outcomes: dict[str, int] = {}
    for i in range(20):
        d = tmp_path / f"ck{i}"
        shutil.copytree(FIXTURES / "threads", d)
        if rival is _race_undo:
            assert apply(d, ZEN4) == 0
        q: multiprocessing.Queue[int] = ctx.Queue()
        procs = [
            ctx.Process(target=_race_apply, args=(str(d), SKYLAKE, q)),
            ctx.Process(target=rival, args=(str(d), ZEN4, q)),  # type: ignore[arg-type]
        ]
        for p in procs:
            p.start()
        for p in procs:
            p.join(60)
        codes = tuple(sorted(q.get(timeout=5) for _ in procs))
        outcomes[str(codes)] = outcomes.get(str(codes), 0) + 1
        assert all(c in (0, 2) for c in codes)
        assert journal_state(d) != "pending"
        if journal_state(d) is not None:
            assert main(["undo", str(d)]) == 0
        assert images(d) == original
    print(outcomes)


@pytest.mark.parametrize(
    "failure",
    [OSError(5, "Input/output error"), OSError(28, "No space left on device")],
    ids=["EIO", "ENOSPC"],
)
def test_an_error_in_the_post_write_check_rolls_back(
    ck: Path, monkeypatch: pytest.MonkeyPatch, failure: OSError, capsys: pytest.CaptureFixture[str]
) -> None:
    from criu_xstate import applying

    original = files(ck)

    def broken(*args: object) -> None:
        raise failure

    monkeypatch.setattr(applying, "verify_compatible", broken)
    assert apply(ck, SKYLAKE) == 2
    err = capsys.readouterr().err
    assert "rolled back" in err and err.count("\n") == 1, err
    assert files(ck) == original  # translated bytes gone, no journal left


def test_a_lock_the_filesystem_refuses_is_one_line(
    ck: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import fcntl

    def enolck(fd: int, op: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", enolck)
    original = files(ck)
    assert apply(ck, ZEN4) == 2
    assert "cannot lock the directory: No locks available" in capsys.readouterr().err
    assert files(ck) == original


@pytest.mark.parametrize("self_contained", [False, True], ids=["overlay", "self-contained"])
def test_apply_out_never_copies_through_a_symlink(
    tmp_path: Path, ck: Path, self_contained: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "secret"
    secret.write_text("not part of the checkpoint")
    (ck / "descriptors.json").symlink_to(secret)
    out = tmp_path / "out"
    more = ["--self-contained"] if self_contained else []
    assert main(["apply", str(ck), "--dest", ZEN4, "--out", str(out), *more]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob(".out.criu-xstate-tmp-*"))
