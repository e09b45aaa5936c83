"""`criu-xstate plan CHECKPOINT --dest HOST.yaml [--dest ...] [--json]`: never writes anything."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from criu_xstate.commands.common import opened_model, refuse_if_interrupted, use_colour
from criu_xstate.commands.planning import load_destinations, load_source, plan_for
from criu_xstate.errors import ExitCode
from criu_xstate.plan import Verdict
from criu_xstate.report import dumps, plan_json, plans_json, render_multi_text, render_plan_text

EXIT_FOR = {Verdict.COMPATIBLE: ExitCode.OK, Verdict.TRANSLATE: ExitCode.OK, Verdict.REFUSE: ExitCode.REFUSED}


def run(args: argparse.Namespace) -> int:
    dests = load_destinations(args.dest)
    refuse_if_interrupted(args.checkpoint)
    with opened_model(args.checkpoint) as model:
        source = load_source(args.src, model)
        plans = [
            (
                d.name,
                plan_for(
                    model,
                    d,
                    source,
                    allow_relocation=not args.no_relocate,
                    strict_isa=args.strict_isa,
                    root=Path(args.root),
                ),
            )
            for d in dests
        ]
        comms = {p.pid: p.comm for p in model.processes}
    if args.json:
        if len(plans) == 1:
            sys.stdout.write(dumps(plan_json(plans[0][1])))
        else:
            sys.stdout.write(dumps(plans_json([p for _, p in plans])))
    elif len(plans) == 1:
        sys.stdout.write(
            render_plan_text(
                plans[0][1],
                checkpoint=args.checkpoint,
                colour=use_colour(),
                verbose=args.verbose,
                processes=comms,
            )
        )
    else:
        sys.stdout.write(render_multi_text(plans, checkpoint=args.checkpoint, colour=use_colour()))
    # One destination: its verdict. Several: 0 if at least one host can take the checkpoint.
    return min(EXIT_FOR[p.verdict] for _, p in plans)
