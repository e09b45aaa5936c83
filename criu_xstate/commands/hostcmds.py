"""`probe`, `baseline` and `compare`: host profiles from the command line."""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path

from criu_xstate import hosts
from criu_xstate.errors import ExitCode, ProbeError, ProfileError
from criu_xstate.report.json import difference_json, dumps
from criu_xstate.x86.cpuid import format_dump, parse_dump, probe_raw


def _emit(text: str, output: str | None) -> None:
    if output is None:
        sys.stdout.write(text)
        return
    path = Path(output)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text)
        tmp.replace(path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ProfileError(path, f"cannot write: {exc.strerror}") from None
    print(f"wrote {path}", file=sys.stderr)


def run_probe(args: argparse.Namespace) -> int:
    name = args.name or socket.gethostname()
    if args.raw:
        _emit(format_dump(probe_raw()), args.output)
        return ExitCode.OK
    if args.from_dump:
        try:
            text = Path(args.from_dump).read_text()
        except OSError as exc:
            raise ProbeError(f"{args.from_dump}: unreadable: {exc.strerror}") from None
        facts = parse_dump(text, args.from_dump)
    else:
        facts = probe_raw()
    profile = hosts.profile_from_facts(facts, name, sigreturn=args.sigreturn)
    _emit(hosts.dump_profile(profile, as_json=args.json), args.output)
    return ExitCode.OK


def run_baseline(args: argparse.Namespace) -> int:
    profiles = [p for path in args.profiles for p in hosts.load_profiles(Path(path))]
    fleet, gave_up = hosts.baseline(profiles, args.name)
    if args.json:
        out = {"profile": hosts.profile_to_dict(fleet), "gave_up": gave_up}
        _emit(json.dumps(out, indent=2) + "\n", args.output)
        return ExitCode.OK
    _emit(hosts.dump_profile(fleet), args.output)
    report = [
        f"baseline of {len(profiles)} host(s): xcr0 0x{fleet.xsave.xcr0:x}, "
        f"user size {fleet.xsave.user_size}, sigreturn {fleet.kernel.sigreturn}"
    ]
    for host, items in gave_up.items():
        report.append(f"  {host}: " + ("gives up nothing" if not items else f"gives up {len(items)}:"))
        report += [f"    - {i}" for i in items]
    report += [f"  note: {n}" for n in fleet.notes]
    print("\n".join(report), file=sys.stderr if args.output is None else sys.stdout)
    return ExitCode.OK


def run_compare(args: argparse.Namespace) -> int:
    a = hosts.load_profile(Path(args.a))
    b = hosts.load_profile(Path(args.b))
    diffs = hosts.compare(a, b)
    if args.json:
        lacks = [difference_json(d) for d in diffs]
        sys.stdout.write(dumps({"a": a.name, "b": b.name, "b_lacks": lacks}))
    elif not diffs:
        print(f"{b.name} has everything {a.name} has")
    else:
        print(f"{b.name} lacks {len(diffs)} thing(s) that {a.name} has:")
        for d in diffs:
            print(f"  {d.kind:9} {d.subject}: {d.detail}")
    return ExitCode.OK if not diffs else ExitCode.REFUSED
