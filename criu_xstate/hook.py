"""CRIU action script: at ``pre-restore``, translate the images for this host or abort the restore.

CRIU runs action scripts with ``CRTOOLS_SCRIPT_ACTION`` set; at ``pre-restore`` no task has been
forked and no core, mm or pages image has been read yet, so rewriting them takes effect, and a
non-zero exit aborts the restore (research/criu.md §0.10, §5.1). Every other action returns before
anything heavy is imported (the installed script returns even before Python starts). The write itself
is :func:`criu_xstate.applying.apply_in_place`, the same code path as ``apply --in-place`` (plan under
the lock, journal, read back, re-plan). The policy comes from :mod:`criu_xstate.hookconfig`.

Output: one line per decision on stderr, which CRIU copies into its log (restore.log); with ``log:``
in the config, one JSON record per decision appended there too. Files left in the images directory:
the journal, only after a translation (docs/journal.md). docs/hook.md has the whole picture.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from criu_xstate.errors import ApplyError, ExitCode

if TYPE_CHECKING:  # imported lazily at run time: other actions must cost nothing
    from collections.abc import Callable

    from criu_xstate.hookconfig import HookConfig
    from criu_xstate.model import CheckpointModel
    from criu_xstate.plan import HostFacts


def _say(msg: str) -> None:
    print(f"criu-xstate hook: {msg}", file=sys.stderr)


def run(args: object = None) -> int:
    if os.environ.get("CRTOOLS_SCRIPT_ACTION") != "pre-restore":
        return ExitCode.OK
    from criu_xstate import hookconfig

    config = hookconfig.load()
    if os.environ.get("CRIU_XSTATE_SELFTEST") == "1":  # `criu-xstate hook-check`: policy and destination
        dest = _destination(config.dest) if config.mode != "off" else None
        print(
            f"config {config.source}: mode {config.mode}, dest {config.dest}"
            + (f" = {dest.name}" if dest else "")
        )
        return ExitCode.OK
    if config.mode == "off":
        return ExitCode.OK
    image_dir = os.environ.get("CRTOOLS_IMAGE_DIR")
    if not image_dir:
        raise ApplyError("CRTOOLS_IMAGE_DIR is not set (not run by CRIU?)")
    return _pre_restore(os.path.realpath(image_dir), config)


def _destination(dest: str, *, skip_self_test: str | None = None) -> HostFacts:
    from criu_xstate import hosts
    from criu_xstate.plan import facts_from_profile

    if dest == "probe":  # the node name: gethostname(), without the socket module
        profile = hosts.probe_local(os.uname().nodename, skip_self_test=skip_self_test)
    else:
        import argparse  # profiles.resolve is also the command line's type check

        from criu_xstate import profiles

        try:
            profile = hosts.load_profile(Path(profiles.resolve(dest)))
        except argparse.ArgumentTypeError as exc:
            raise ApplyError(f"hook config dest: {exc}") from None
    return facts_from_profile(profile)


def _probed(model: CheckpointModel) -> HostFacts:
    """This host, for this checkpoint: the sigreturn self-test (a forked child, ~3 ms of the restore)
    only when a thread of it was in a signal handler. The rule it measures is read by the plan of a
    live frame and by nothing else (plan/make.py plans live frames only: frame_rules.py, target.py)."""
    live = any(t.frames.live for t in model.threads())
    why = None if live else "no thread of the checkpoint is in a signal handler (the rule judges frames)"
    return _destination("probe", skip_self_test=why)


def _pre_restore(image_dir: str, config: HookConfig) -> int:
    from criu_xstate.applying import Options, apply_in_place
    from criu_xstate.plan import Severity, Verdict

    dest: HostFacts | Callable[[CheckpointModel], HostFacts]
    if config.dest == "probe":
        dest, name = _probed, os.uname().nodename
    else:
        dest = _destination(config.dest)
        name = dest.name
    images = Path(image_dir)
    opts = Options(allow_relocation=config.relocate, strict_isa=config.strict_isa)
    outcome = apply_in_place(
        images, dest, opts, f"criu-xstate hook for {name}", write=config.mode == "enforce"
    )
    plan = outcome.plan
    codes = sorted({f.code for f in plan.all_findings() if f.severity >= Severity.TRANSLATE})
    if plan.verdict is Verdict.REFUSE:
        for f in plan.all_findings():
            if f.severity is Severity.REFUSE:
                _say(f"{f.code}: {f.subject}: {f.detail}")
        decision = "refused"
    elif plan.verdict is Verdict.COMPATIBLE:
        decision = "compatible"
    elif outcome.changed:
        assert outcome.changeset is not None
        decision = "translated"
        cs = outcome.changeset
        counts = ((cs.cores_rewritten, "thread state(s)"), (cs.glibc_sizes_rewritten, "glibc size(s)"))
        more = [f"{n} {what}" for n, what in counts if n]
        _say(
            f"rewrote {cs.frames_rewritten} signal frame(s){''.join(', ' + m for m in more)} for {name} "
            f"(undo: criu-xstate undo {images})"
        )
    else:
        decision = "needs-translation"
    blocking = decision in ("refused", "needs-translation") and config.mode != "warn"
    if decision in ("refused", "needs-translation"):
        verb = "refusing the restore" if blocking else "NOT blocking the restore (mode: warn)"
        _say(
            f"{decision} for {name} ({', '.join(codes)}): {verb}; see `criu-xstate plan {images} --dest ...`"
        )
    _record(config, images, name, decision, codes)
    return ExitCode.REFUSED if blocking else ExitCode.OK


def _record(config: HookConfig, images: Path, dest: str, decision: str, codes: list[str]) -> None:
    """Append the decision to the configured log (one JSON line), never to the images directory."""
    log = config.log
    if not log:
        return
    import json  # only with a log: json is ~1 ms of a hook's start-up

    line = json.dumps(
        {
            "schema": "criu-xstate/hook-decision/v1",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "images": str(images),
            "dest": dest,
            "mode": config.mode,
            "decision": decision,
            "codes": codes,
        },
        separators=(",", ":"),
    )
    try:
        fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o640)
        try:
            os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)
    except OSError as exc:
        _say(f"cannot append to the log {log}: {exc.strerror}")
