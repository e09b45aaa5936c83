"""`criu-xstate show CHECKPOINT [--json]`: the container, processes, threads, SP and stack, sigaltstack,
XSAVE, frames; a warning first when an interrupted apply left the images half-written.

The rendering is criu_xstate/report/ (show_json, show_text, container_line).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from criu_xstate import glibc, records
from criu_xstate.commands.common import INTERRUPTED, journal_of, opened_model
from criu_xstate.errors import ExitCode
from criu_xstate.report import container_line, dumps, show_json, show_text


def run(args: argparse.Namespace) -> int:
    journal = journal_of(args.checkpoint)
    with opened_model(args.checkpoint) as model:
        meta = model.checkpoint.container()
        states = {g.pid: g for g in glibc.read_all(model.processes, Path(args.root))}
        if args.json:
            doc = show_json(model, args.checkpoint, states)
            doc["journal"] = journal
            doc["container"] = records.as_dict(meta) if meta else None
            out = dumps(doc)
        else:
            out = show_text(model, args.checkpoint, states)
            if meta is not None:
                out = f"{container_line(meta)}\n{out}"
            if journal == "pending":
                out = f"warning: {INTERRUPTED}; run `criu-xstate undo {args.checkpoint}`\n{out}"
    sys.stdout.write(out)
    return ExitCode.OK
