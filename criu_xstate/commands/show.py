"""`criu-xstate show CHECKPOINT [--json]`: processes, threads, SP and stack, sigaltstack, XSAVE, frames.

The rendering is criu_xstate/report/ (show_json, show_text).
"""

from __future__ import annotations

import argparse
import sys

from criu_xstate.commands.common import opened_model
from criu_xstate.report import dumps, show_json, show_text


def run(args: argparse.Namespace) -> int:
    with opened_model(args.checkpoint) as model:
        out = dumps(show_json(model, args.checkpoint)) if args.json else show_text(model, args.checkpoint)
    sys.stdout.write(out)
    return 0
