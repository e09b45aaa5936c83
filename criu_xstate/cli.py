"""Command line: argument parsing and exit codes only. The work is done by the layers below.

Exit codes (DESIGN.md §4): 0 safe, 1 refused, 2 bad usage or invalid input, 3 internal error.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TypeVar

from criu_xstate import __version__
from criu_xstate.errors import CriuXstateError, ExitCode

if TYPE_CHECKING:  # argparse is imported by the command line only: the hook has none (hook_main)
    import argparse

    Handler = Callable[[argparse.Namespace], int]
A = TypeVar("A")


def _cmd_show(args: argparse.Namespace) -> int:
    from criu_xstate.commands.show import run

    return run(args)


def _cmd_probe(args: argparse.Namespace) -> int:
    from criu_xstate.commands.hostcmds import run_probe

    return run_probe(args)


def _cmd_baseline(args: argparse.Namespace) -> int:
    from criu_xstate.commands.hostcmds import run_baseline

    return run_baseline(args)


def _cmd_compare(args: argparse.Namespace) -> int:
    from criu_xstate.commands.hostcmds import run_compare

    return run_compare(args)


def _cmd_plan(args: argparse.Namespace) -> int:
    from criu_xstate.commands.plancmd import run

    return run(args)


def _cmd_apply(args: argparse.Namespace) -> int:
    from criu_xstate.commands.applycmd import run_apply

    return run_apply(args)


def _cmd_undo(args: argparse.Namespace) -> int:
    from criu_xstate.commands.applycmd import run_undo

    return run_undo(args)


def _cmd_hook(args: object) -> int:
    from criu_xstate.hook import run

    return run(args)


def _cmd_hook_install(args: argparse.Namespace) -> int:
    from criu_xstate.commands.hookcmds import run_install

    return run_install(args)


def _cmd_hook_check(args: argparse.Namespace) -> int:
    from criu_xstate.commands.hookcmds import run_check

    return run_check(args)


def _cmd_profiles(args: argparse.Namespace) -> int:
    from criu_xstate.commands.hookcmds import run_profiles

    return run_profiles(args)


def _profile_ref(ref: str) -> str:
    from criu_xstate.profiles import resolve

    return resolve(ref)


def _format_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--format", choices=["text", "json"], default=None, help="output format, as checkpointctl spells it"
    )
    p.add_argument(
        "--pretty", action="store_true", help="indented JSON (the default on a terminal; else one line)"
    )


def _cmd_completion(args: argparse.Namespace) -> int:
    print(bash_completion(build_parser()))
    return ExitCode.OK


def bash_completion(parser: argparse.ArgumentParser) -> str:
    """A bash completion function generated from the parser: commands, then each command's options."""
    import argparse

    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    cases = []
    for name, p in sorted(sub.choices.items()):
        opts = sorted(o for a in p._actions for o in a.option_strings)
        cases.append(f'        {name}) opts="{" ".join(opts)}" ;;')
    commands = " ".join(sorted(sub.choices))
    return "\n".join(
        [
            '# bash completion for criu-xstate: eval "$(criu-xstate completion bash)"',
            "_criu_xstate() {",
            '    local cur="${COMP_WORDS[COMP_CWORD]}" opts',
            '    if [ "$COMP_CWORD" -eq 1 ]; then',
            f'        COMPREPLY=($(compgen -W "{commands} --help --version" -- "$cur")); return',
            "    fi",
            '    case "${COMP_WORDS[1]}" in',
            *cases,
            "        *) opts= ;;",
            "    esac",
            '    if [[ "$cur" == -* ]]; then COMPREPLY=($(compgen -W "$opts" -- "$cur"));',
            '    else COMPREPLY=($(compgen -f -- "$cur")); fi',
            "}",
            "complete -o filenames -F _criu_xstate criu-xstate",
        ]
    )


def build_parser() -> argparse.ArgumentParser:
    import argparse

    parser = argparse.ArgumentParser(
        prog="criu-xstate",
        description="Find, check and translate in-flight x86 signal frames (XSAVE state) in CRIU images.",
    )
    parser.add_argument("--version", action="version", version=f"criu-xstate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("show", help="summarize a checkpoint: processes, threads, stacks, XSAVE state, frames")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="images directory or checkpoint archive")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--root", default="/", metavar="DIR", help="where the processes' files are (their loader; default /)"
    )
    _format_option(p)
    p.set_defaults(handler=_cmd_show)

    p = sub.add_parser("probe", help="describe this machine as a host profile")
    p.add_argument("-o", "--output", metavar="FILE", help="write the profile here instead of stdout")
    p.add_argument("--from-dump", metavar="FILE", help="build the profile from a raw CPUID/XCR0 dump")
    p.add_argument("--name", help="profile name (default: the host name)")
    p.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    p.add_argument("--raw", action="store_true", help="print the raw CPUID/XCR0 dump instead of a profile")
    p.add_argument(
        "--sigreturn", choices=["frame-size", "user-size"], help="override the kernel's sigreturn rule"
    )
    p.set_defaults(handler=_cmd_probe)

    p = sub.add_parser("baseline", help="one profile that every given host satisfies")
    p.add_argument("profiles", nargs="+", metavar="HOST.yaml")
    p.add_argument("-o", "--output", metavar="FILE")
    p.add_argument("--name", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_baseline)

    p = sub.add_parser("compare", help="what host B lacks that host A has")
    p.add_argument("a", metavar="A.yaml")
    p.add_argument("b", metavar="B.yaml")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_compare)

    def plan_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("checkpoint", metavar="CHECKPOINT", help="images directory or checkpoint archive")
        p.add_argument(
            "--dest",
            action="append",
            required=True,
            type=_profile_ref,
            metavar="HOST.yaml",
            help="destination host profile, fleet baseline, or a directory of profiles (repeatable)",
        )
        p.add_argument(
            "--src",
            type=_profile_ref,
            metavar="HOST.yaml",
            help="source host profile (default: cpuinfo.img, frames)",
        )
        p.add_argument(
            "--strict-isa", action="store_true", help="refuse when the destination lacks CPU flags"
        )
        p.add_argument("--no-relocate", action="store_true", help="refuse instead of relocating XSAVE images")
        p.add_argument(
            "--root",
            default="/",
            metavar="DIR",
            help="where the checkpointed processes' files are (their glibc loader is read from there; "
            "default /; a container's root file system for a container checkpoint)",
        )
        p.add_argument("--json", action="store_true", help="the plan JSON (schema criu-xstate/plan/v1)")
        _format_option(p)

    p = sub.add_parser("plan", help="is a restore on the destination safe, safe after apply, or unsafe?")
    plan_args(p)
    p.add_argument("-v", "--verbose", action="store_true", help="show informational findings too")
    p.set_defaults(handler=_cmd_plan)

    p = sub.add_parser("apply", help="translate the images for the destination, or refuse")
    plan_args(p)
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="write a translated copy here")
    where.add_argument("--in-place", action="store_true", help="rewrite the checkpoint (journaled; see undo)")
    p.add_argument(
        "--self-contained",
        action="store_true",
        help="with --out: copy changed pages files whole instead of writing an incremental image whose "
        "`parent` link points at CHECKPOINT (use it when DIR moves to another machine alone)",
    )
    p.set_defaults(handler=_cmd_apply)

    p = sub.add_parser(
        "undo", help="return a checkpoint changed by apply --in-place or the hook to the original dump"
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT")
    p.add_argument(
        "--forget",
        action="store_true",
        help="drop the journal without changing the images (they are a new dump)",
    )
    p.set_defaults(handler=_cmd_undo)

    p = sub.add_parser("hook", help="CRIU action script: translate or refuse at pre-restore")
    p.set_defaults(handler=_cmd_hook)

    p = sub.add_parser("hook-install", help="install the CRIU action script where every runtime runs it")
    for flag, default, what in (
        ("--criu-config", "/etc/criu/default.conf", "CRIU config file to add the action-script line to"),
        ("--script", "/usr/local/lib/criu-xstate/criu-xstate-hook", "where to write the action script"),
        ("--config", "/etc/criu-xstate/config.yaml", "the hook's policy file"),
    ):
        p.add_argument(flag, default=default, metavar="FILE", help=f"{what} (default: %(default)s)")
    p.add_argument("--dest", help="destination: probe, a shipped profile name or a profile path")
    p.add_argument("--mode", choices=["enforce", "check", "warn", "off"], help="the hook's mode")
    p.add_argument("--dry-run", action="store_true", help="say what would change, change nothing")
    p.set_defaults(handler=_cmd_hook_install)

    p = sub.add_parser("hook-check", help="check that CRIU will run the hook and that it can start")
    p.add_argument(
        "--criu-config",
        default="/etc/criu/default.conf",
        metavar="FILE",
        help="CRIU config file to check (default: %(default)s)",
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_hook_check)

    p = sub.add_parser("completion", help="print a shell completion script (bash)")
    p.add_argument("shell", choices=["bash"])
    p.set_defaults(handler=_cmd_completion)

    p = sub.add_parser("profiles", help="list the host profiles shipped with criu-xstate (for --dest NAME)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(handler=_cmd_profiles)

    return parser


def _one_line(text: str) -> str:
    """Errors are one line, and never carry terminal control characters from hostile input."""
    return "".join(c if c.isprintable() else " " if c in "\n\r\t" else f"\\x{ord(c):02x}" for c in text)


class Terminated(BaseException):
    """SIGTERM or SIGHUP: unwinds like Ctrl-C, so temporary directories are removed on the way out and
    an in-place write stops where its journal lets undo finish it (docs/journal.md)."""

    def __init__(self, signo: int) -> None:
        super().__init__(signo)
        self.signo = signo


def _raise_terminated(signo: int, frame: object) -> None:
    for again in (signal.SIGTERM, signal.SIGHUP):  # a second signal must not cut the clean-up short
        signal.signal(again, signal.SIG_IGN)
    raise Terminated(signo)


# A command builds its model and plan once and frees nothing until it exits: with CPython's default
# thresholds the cyclic collector re-traverses that growing model over and over (0.1 s of a
# 4000-thread plan, more than a tenth of it). Young garbage is still collected, every 200,000
# allocations instead of 700 (as mypy does); the thresholds are restored after the command.
GC_THRESHOLD = (200_000, 30, 30)


def main(argv: Sequence[str] | None = None) -> int:
    return _guarded(lambda: _run(argv))


def hook_main() -> int:
    """What the installed action script runs: `criu-xstate hook` without the command line, whose
    parser of every command is ~10 ms of each restore; the same signals, collector and exit codes."""
    return _guarded(lambda: _dispatch(_cmd_hook, None))


def console() -> NoReturn:
    """The ``criu-xstate`` program (and ``python -m criu_xstate``): :func:`main`, then :func:`leave`."""
    leave(main())


def hook_script() -> NoReturn:
    """What the installed action script runs: :func:`hook_main`, then :func:`leave`."""
    leave(hook_main())


def leave(code: int) -> NoReturn:
    """Exit with ``code`` without the interpreter's finalization, which frees every module and object one
    by one: ~6 ms of each hook inside a restore and ~9 ms of a one-thread plan (a quarter of what Python's
    start-up costs), more with a large model. Nothing is left for it to do by then: every file the
    command writes is closed before it returns, temporary directories are removed by the commands
    themselves, and no thread is started. What a normal exit does besides is done here: atexit handlers
    run (a coverage tool's or a test harness's: none of ours), then the standard streams are flushed; a
    reader that went away (``| head``) is not an error, as in :func:`_dispatch`."""
    import atexit

    atexit._run_exitfuncs()  # CPython's own exit path, which os._exit skips
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(BrokenPipeError, ValueError):  # ValueError: a stream already closed
            stream.flush()
    os._exit(code)


def _guarded(command: Callable[[], int]) -> int:
    previous: dict[int, object] = {}
    for signo in (signal.SIGTERM, signal.SIGHUP):
        with contextlib.suppress(ValueError):  # not the main thread (embedded use): leave them alone
            previous[signo] = signal.signal(signo, _raise_terminated)
    thresholds = gc.get_threshold()
    gc.set_threshold(*GC_THRESHOLD)
    try:
        return command()
    finally:
        gc.set_threshold(*thresholds)
        if (report_json := sys.modules.get("criu_xstate.report.json")) is not None:
            report_json.PRETTY = None  # type: ignore[attr-defined]  # --pretty was for this run only
        for restored, handler in previous.items():
            signal.signal(restored, handler)  # type: ignore[arg-type]


def _run(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: usage errors are exit 2, --help/--version exit 0
        return int(exc.code) if isinstance(exc.code, int) else ExitCode.BAD_INPUT
    if getattr(args, "format", None) == "json":
        args.json = True
    if getattr(args, "pretty", False):
        from criu_xstate.report import json as report_json

        report_json.PRETTY = True
    return _dispatch(args.handler, args)


def _dispatch(handler: Callable[[A], int], args: A) -> int:
    try:
        return handler(args)
    except CriuXstateError as exc:
        print(f"criu-xstate: error: {_one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # the reader went away (`| head`): not an error of ours
        return ExitCode.OK
    except OSError as exc:  # an I/O error no layer anticipated: still one line, still "bad input"
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"criu-xstate: error: {where}{_one_line(str(exc.strerror or exc))}", file=sys.stderr)
        return ExitCode.BAD_INPUT
    except KeyboardInterrupt:
        print("criu-xstate: interrupted", file=sys.stderr)
        return ExitCode.INTERNAL
    except Terminated as exc:
        print(f"criu-xstate: terminated by signal {exc.signo}", file=sys.stderr)
        return 128 + exc.signo
    except Exception as exc:
        print(f"criu-xstate: internal error: {type(exc).__name__}: {exc} (please report)", file=sys.stderr)
        return ExitCode.INTERNAL


if __name__ == "__main__":
    console()
