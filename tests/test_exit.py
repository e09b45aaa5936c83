"""How the program ends (cli.leave): the output is complete, the exit code is the command's, and a
reader that went away is not an error, though the interpreter's finalization is skipped."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from criu_xstate import cli

REPO = Path(__file__).parents[1]
FIXTURES = Path(__file__).parent / "fixtures"
DEST = REPO / "criu_xstate" / "data" / "hosts" / "intel-icelake-sp.yaml"


def _run(*args: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "criu_xstate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        **kw,
    )


@pytest.mark.parametrize("fixture", ["threads", "nohandler"])
def test_the_whole_output_arrives_with_the_commands_exit_code(
    fixture: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["plan", str(FIXTURES / fixture), "--dest", str(DEST), "--json"]
    code = cli.main(args)
    want = json.loads(capsys.readouterr().out)
    r = _run(*args)
    assert r.returncode == code and r.stderr == ""
    assert json.loads(r.stdout) == want  # buffered stdout was flushed before the process left


def test_a_reader_that_goes_away_is_not_an_error() -> None:
    """More output than a pipe holds (~110 KB: every shipped host's plan), and the reader leaves after
    one byte (``| head -c 1``): the flush at exit meets a closed pipe."""
    dests = [
        a
        for h in sorted((REPO / "criu_xstate" / "data" / "hosts").glob("*.yaml"))
        for a in ("--dest", str(h))
    ]
    argv = ["plan", str(FIXTURES / "threads"), *dests, "--json", "--pretty"]
    p = subprocess.Popen(
        [sys.executable, "-m", "criu_xstate", *argv], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert p.stdout is not None and p.stderr is not None
    assert p.stdout.read(1) == b"{"
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=60) in (0, 1) and err == "", err


def test_leave_flushes_the_streams_and_exits_with_the_code(monkeypatch: pytest.MonkeyPatch) -> None:
    flushed: list[str] = []

    class Stream:
        def __init__(self, name: str, error: type[BaseException] | None = None) -> None:
            self.name, self.error = name, error

        def flush(self) -> None:
            flushed.append(self.name)
            if self.error is not None:
                raise self.error

    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    import atexit

    monkeypatch.setattr(atexit, "_run_exitfuncs", lambda: flushed.append("atexit"))  # not pytest's own
    monkeypatch.setattr(cli.os, "_exit", fake_exit)
    for err in (None, BrokenPipeError, ValueError):
        flushed.clear()
        monkeypatch.setattr(sys, "stdout", Stream("out", err))
        monkeypatch.setattr(sys, "stderr", Stream("err"))
        with pytest.raises(SystemExit) as exc:
            cli.leave(3)
        assert exc.value.code == 3 and flushed == ["atexit", "out", "err"]


def test_atexit_handlers_still_run() -> None:
    """A coverage tool's or a harness's (tests/guest_python.py lists the modules a command imported
    from one): only the interpreter's teardown is skipped."""
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('atexit ran'))\n"
        "sys.argv = ['criu-xstate', '--version']\n"
        "from criu_xstate.cli import console\n"
        "console()\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "atexit ran", (r.stdout, r.stderr)
