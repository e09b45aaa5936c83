"""`criu-xstate show CHECKPOINT [--json]`: processes, threads, SP and stack, sigaltstack, XSAVE, frames."""

from __future__ import annotations

import argparse
import dataclasses
import sys

from criu_xstate.commands.common import INTERRUPTED, frame_json, journal_of, mask_names, opened_model
from criu_xstate.errors import ExitCode
from criu_xstate.frames import Liveness
from criu_xstate.images.container import ContainerMeta
from criu_xstate.model import CheckpointModel, Thread
from criu_xstate.report import dumps

SCHEMA = "criu-xstate/show/v1"


def _container_line(m: ContainerMeta) -> str:
    """What checkpointctl shows first: which container this is."""
    ident = f" ({m.id[:12]})" if m.id else ""
    parts = [
        f"image {m.image}" if m.image else None,
        f"runtime {m.runtime}" if m.runtime else None,
        f"engine {m.engine}",
        f"created {m.created}" if m.created else None,
    ]
    return f"container {m.name or '?'}{ident}: " + ", ".join(p for p in parts if p)


def _thread_json(t: Thread) -> dict[str, object]:
    vma = t.stack_vma
    fr = t.frames
    return {
        "tid": t.tid,
        "mode": "compat" if t.compat else "native",
        "ip": hex(t.ip),
        "sp": hex(t.sp),
        "stack": {"start": hex(vma.start), "end": hex(vma.end), "growsdown": vma.growsdown} if vma else None,
        "altstack": (
            {"sp": hex(t.altstack[0]), "size": t.altstack[1], "flags": t.altstack[2], "active": t.on_altstack}
            if t.altstack
            else None
        ),
        "blocked": hex(t.blocked),
        "xsave": {
            "xstate_bv": hex(t.xsave.xstate_bv) if t.xsave.xstate_bv is not None else None,
            "components": mask_names(t.xsave.xstate_bv or 0),
            "in_use": [mask_names(1 << n)[0] for n in sorted(t.xsave.in_use)],
            "pkru": hex(t.xsave.pkru) if t.xsave.pkru is not None else None,
            "mxcsr": hex(t.xsave.mxcsr) if t.xsave.mxcsr is not None else None,
        },
        "frames": [frame_json(f) for f in fr.frames],
        "unreadable": [{"stack": u.stack.value, "reason": u.error.reason} for u in fr.unreadable],
    }


def show_json(model: CheckpointModel, source: str) -> dict[str, object]:
    return {
        "schema": SCHEMA,
        "checkpoint": source,
        "processes": [
            {
                "pid": p.pid,
                "ppid": p.ppid,
                "comm": p.comm,
                "sigactions": [
                    {
                        "signo": s.signo,
                        "handler": hex(s.handler),
                        "flags": hex(s.flags),
                        "restorer": hex(s.restorer),
                    }
                    for s in p.sigactions
                ],
                "threads": [_thread_json(t) for t in p.threads],
            }
            for p in model.processes
        ],
    }


def show_text(model: CheckpointModel, source: str) -> str:
    lines = [f"{source}: {len(model.processes)} process(es), {sum(1 for _ in model.threads())} thread(s)"]
    for p in model.processes:
        lines.append("")
        handlers = ", ".join(str(s.signo) for s in p.sigactions) or "none"
        lines.append(f"pid {p.pid} ppid {p.ppid} ({p.comm}); handlers for signals: {handlers}")
        for t in p.threads:
            vma = t.stack_vma
            stack = f"stack 0x{vma.start:x}-0x{vma.end:x}" if vma else "SP outside every VMA"
            lines.append(
                f"  tid {t.tid}{' compat' if t.compat else ''}: sp 0x{t.sp:x} ({stack}), ip 0x{t.ip:x}"
            )
            if t.altstack:
                where = " (SP on it)" if t.on_altstack else ""
                lines.append(f"    sigaltstack 0x{t.altstack[0]:x} size {t.altstack[1]}{where}")
            bv = t.xsave.xstate_bv
            if bv is None:
                lines.append("    xsave: none in the image")
            else:
                used = ", ".join(mask_names(sum(1 << n for n in t.xsave.in_use))) or "nothing beyond SSE"
                lines.append(f"    xsave: xstate_bv 0x{bv:x}; in use: {used}")
            for u in t.frames.unreadable:
                lines.append(f"    {u.stack.value} unreadable: {u.error.reason}")
            for f in t.frames.frames:
                if f.liveness is Liveness.LIVE:
                    sw = f.sw
                    desc = (
                        f"xfeatures 0x{sw.xfeatures:x} xstate_size {sw.xstate_size} "
                        f"xstate_bv 0x{f.xstate_bv or 0:x}"
                        if sw
                        else "no FPU context"
                    )
                    sig = f"signal {f.signo}" if f.signo else "signal ?"
                    lines.append(
                        f"    live frame #{f.depth} 0x{f.address:x} on {f.stack.value}, {sig}: {desc}"
                    )
                    lines.append(
                        f"      fpstate 0x{f.fpstate or 0:x}, interrupted at ip 0x{f.interrupted_ip:x} "
                        f"sp 0x{f.interrupted_sp:x}"
                    )
                elif f.liveness is Liveness.INVALID:
                    why = "; ".join(f"{c.name}: {c.detail}" for c in f.failed)
                    lines.append(f"    not a frame at 0x{f.address:x} ({why})")
                else:
                    lines.append(
                        f"    {f.liveness.value} frame at 0x{f.address:x} on {f.stack.value} (not live)"
                    )
    return "\n".join(lines) + "\n"


def run(args: argparse.Namespace) -> int:
    journal = journal_of(args.checkpoint)
    with opened_model(args.checkpoint) as model:
        meta = model.checkpoint.container()
        if args.json:
            doc = show_json(model, args.checkpoint)
            doc["journal"] = journal
            doc["container"] = dataclasses.asdict(meta) if meta else None
            out = dumps(doc)
        else:
            out = show_text(model, args.checkpoint)
            if meta is not None:
                out = f"{_container_line(meta)}\n{out}"
            if journal == "pending":
                out = f"warning: {INTERRUPTED}; run `criu-xstate undo {args.checkpoint}`\n{out}"
    sys.stdout.write(out)
    return ExitCode.OK
