"""`criu-xstate hook-install`, `hook-check` and `profiles`: putting the CRIU hook where every runtime
runs it, checking an installation, and listing the shipped host profiles (docs/hook.md)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from criu_xstate import __version__, hosts, profiles
from criu_xstate.errors import ApplyError, CriuXstateError, ExitCode
from criu_xstate.hookconfig import parse

DEFAULT_CRIU_CONFIG = Path("/etc/criu/default.conf")  # read by CRIU >= 3.19 for the CLI and `criu swrk`
DEFAULT_SCRIPT = Path("/usr/local/lib/criu-xstate/criu-xstate-hook")
MARK = "criu_xstate hook"


def script_text(config: Path, python: str, paths: Sequence[str]) -> str:
    """The action script: CRIU starts it for every action, so all but pre-restore end in the shell.
    Python runs isolated (-I: no PYTHON* variable or user site of the runtime's environment is read)
    and without the site module (-S: ~10-20 ms of each restore, most of it an editable install's
    finder); the directories it imports from are named here instead (`import_paths`)."""
    start = (
        f"import sys; sys.path[:0] = {json.dumps(list(paths))}; "
        "from criu_xstate.cli import hook_script; hook_script()"
    )
    return (
        "#!/bin/sh\n"
        f"# CRIU action script written by `criu-xstate hook-install` (criu-xstate {__version__}).\n"
        "# Every CRIU action but pre-restore returns here, before Python starts.\n"
        '[ "$CRTOOLS_SCRIPT_ACTION" = pre-restore ] || exit 0\n'
        f"CRIU_XSTATE_CONFIG={shlex.quote(str(config))}\n"
        "export CRIU_XSTATE_CONFIG\n"
        f"# = python -m {MARK}, with its import path fixed at install time\n"
        f"exec {shlex.quote(python)} -I -S -c {shlex.quote(start)}\n"
    )


# What the hook imports from outside the standard library (the package, PyYAML, protobuf).
HOOK_IMPORTS = ("criu_xstate", "yaml", "google.protobuf")


def import_paths() -> list[str]:
    """The sys.path entries the hook's imports come from in this installation, in sys.path order."""
    import importlib.util

    roots = set()
    for name in HOOK_IMPORTS:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise ApplyError(f"hook-install: {name} is not importable by {sys.executable}")
        roots.add(str(Path(spec.origin).resolve().parents[name.count(".") + 1]))
    ordered = [p for p in map(_resolved, sys.path) if p in roots]
    return list(dict.fromkeys(ordered + sorted(roots - set(ordered))))


def _resolved(entry: str) -> str:
    return str(Path(entry or ".").resolve())


def config_text(dest: str, mode: str) -> str:
    return (
        "# criu-xstate hook policy (docs/hook.md). Environment variables CRIU_XSTATE_DEST and\n"
        "# CRIU_XSTATE_MODE override these where a runtime passes them on.\n"
        f"dest: {dest}        # probe | a shipped profile name (criu-xstate profiles) | a profile path\n"
        f"mode: {mode}     # enforce | check | warn | off\n"
        "relocate: true\n"
        "strict_isa: false\n"
    )


def _write_if_changed(path: Path, text: str, mode: int, dry_run: bool) -> str:
    old = path.read_text() if path.is_file() else None
    if old == text:
        return f"unchanged {path}"
    if not dry_run:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.criu-xstate-tmp")
        tmp.write_text(text)
        tmp.chmod(mode)
        os.replace(tmp, path)
    return f"{'would write' if dry_run else 'wrote'} {path}"


def _action_scripts(criu_config: Path) -> list[str]:
    if not criu_config.is_file():
        return []
    out = []
    for line in criu_config.read_text(errors="replace").splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) == 2 and words[0].lstrip("-") == "action-script":
            out.append(words[1].strip("\"'"))
    return out


def run_install(args: argparse.Namespace) -> int:
    script, config, criu_config = Path(args.script), Path(args.config), Path(args.criu_config)
    for p in (script, config, criu_config):
        if not p.is_absolute():
            raise ApplyError(f"{p}: give an absolute path (CRIU runs the script from anywhere)")
    if args.dest and args.dest != "probe":
        profiles.resolve(args.dest)  # a name that resolves to nothing is refused now, not at restore
    changes = [
        _write_if_changed(script, script_text(config, sys.executable, import_paths()), 0o755, args.dry_run)
    ]
    if args.dest or args.mode or not config.exists():
        text = config_text(args.dest or "probe", args.mode or "enforce")
        parse(text, str(config))
        changes.append(_write_if_changed(config, text, 0o644, args.dry_run))
    else:
        changes.append(f"kept {config}")
    if str(script) in _action_scripts(criu_config):
        changes.append(f"unchanged {criu_config} (already has action-script {script})")
    else:
        if not args.dry_run:
            criu_config.parent.mkdir(parents=True, exist_ok=True)
            with criu_config.open("a") as f:
                f.write(f"action-script {script}\n")
        changes.append(
            f"{'would add' if args.dry_run else 'added'} 'action-script {script}' to {criu_config}"
        )
    if not args.dry_run:
        changes.append(_byte_compile())
    for line in changes:
        print(f"hook-install: {line}")
    return ExitCode.OK


def _byte_compile() -> str:
    """Cache the package's bytecode now, so that the hook, which runs inside every restore, does not
    compile its modules each time: an editable install, or a runtime whose environment holds
    PYTHONDONTWRITEBYTECODE=1, would otherwise pay for it at every restore (~80 ms of a ~190 ms hook
    measured here). Python reads a cached .pyc even where it may not write one."""
    import compileall

    package = Path(__file__).resolve().parents[1]
    if not os.access(package, os.W_OK):
        return f"bytecode of {package} not written (not writable here; a pip install has written it)"
    ok = compileall.compile_dir(str(package), quiet=2)
    return f"{'compiled' if ok else 'could not compile all of'} {package}'s bytecode for the hook"


def _check_items(criu_config: Path) -> list[tuple[bool, str]]:
    items: list[tuple[bool, str]] = []
    scripts = [s for s in _action_scripts(criu_config) if Path(s).is_file() and MARK in Path(s).read_text()]
    items.append((criu_config.is_file(), f"CRIU config {criu_config}"))
    if not scripts:
        items.append((False, f"no criu-xstate action-script in {criu_config} (run criu-xstate hook-install)"))
        return items
    script = Path(scripts[0])
    items.append((os.access(script, os.X_OK), f"action script {script} is executable"))
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}  # as bare as a runtime's: nothing may depend on it
    t0 = time.monotonic()
    fast = subprocess.run(
        [str(script)], env={**env, "CRTOOLS_SCRIPT_ACTION": "post-dump"}, capture_output=True
    )
    took = time.monotonic() - t0
    items.append((fast.returncode == 0, f"other CRIU actions return at once ({took * 1000:.0f} ms)"))
    self_test = subprocess.run(
        [str(script)],
        env={**env, "CRTOOLS_SCRIPT_ACTION": "pre-restore", "CRIU_XSTATE_SELFTEST": "1"},
        capture_output=True,
        text=True,
    )
    detail = (self_test.stdout + self_test.stderr).strip().splitlines()
    items.append(
        (self_test.returncode == 0, f"pre-restore starts and reads its policy: {' | '.join(detail)}")
    )
    return items


def run_check(args: argparse.Namespace) -> int:
    items = _check_items(Path(args.criu_config))
    if args.json:
        doc = {"ok": all(ok for ok, _ in items), "checks": [{"ok": ok, "what": w} for ok, w in items]}
        print(json.dumps(doc))
    else:
        for ok, what in items:
            print(f"{'ok     ' if ok else 'PROBLEM'} {what}")
    return ExitCode.OK if all(ok for ok, _ in items) else ExitCode.BAD_INPUT


def run_profiles(args: argparse.Namespace) -> int:
    rows = []
    for path in profiles.shipped():
        try:
            p = hosts.load_profile(path)
        except CriuXstateError as exc:  # pragma: no cover - the shipped files are tested
            raise ApplyError(f"shipped profile {path.name}: {exc}") from None
        rows.append(
            {
                "name": path.stem,
                "title": p.name,
                "xcr0": hex(p.xsave.xcr0),
                "user_size": p.xsave.user_size,
                "sigreturn": p.kernel.sigreturn,
                "path": str(path),
            }
        )
    if args.json:
        print(json.dumps({"schema": "criu-xstate/profiles/v1", "profiles": rows}))
    else:
        for r in rows:
            print(f"{r['name']:32} xcr0 {r['xcr0']:>7}  {r['user_size']:>5} B  {r['sigreturn']}")
    return ExitCode.OK
