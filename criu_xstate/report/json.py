"""JSON of every command: ``show`` (criu-xstate/show/v1), ``plan`` and ``apply`` (criu-xstate/plan/v1,
criu-xstate/plans/v1 for several destinations) and ``compare``. The schemas are in the README ("Plan
JSON and reason codes"); keys and their order are part of them.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from enum import StrEnum

from criu_xstate.frames import Abi, SignalFrame, StackKind
from criu_xstate.glibc import GlibcState, GlibcUnread
from criu_xstate.hosts import Difference
from criu_xstate.model import CheckpointModel, Thread
from criu_xstate.plan import Finding, FrameAction, FrameDecision, Plan, Severity, ThreadPlan
from criu_xstate.plan.findings import ProcessPlan
from criu_xstate.x86.xfeatures import component_name

PLAN_SCHEMA = "criu-xstate/plan/v1"
PLANS_SCHEMA = "criu-xstate/plans/v1"
SHOW_SCHEMA = "criu-xstate/show/v1"


# Indented for a person (stdout is a terminal, or --pretty), else compact: one line, and encoded by
# json's C encoder (indentation takes the pure-Python one: 0.7 s of a 4000-thread plan's 3.4 s).
PRETTY: bool | None = None  # None: decide by stdout


def dumps(obj: object, *, pretty: bool | None = None) -> str:
    if pretty is None:
        pretty = PRETTY if PRETTY is not None else sys.stdout.isatty()
    if pretty:
        return json.dumps(obj, indent=2) + "\n"
    return json.dumps(obj, separators=(",", ":")) + "\n"


_SEVERITY = {s: s.name.lower() for s in Severity}  # enum .name is a slow descriptor, read per finding
# .value is one too (~1 us a read): the values of the enums a plan prints per frame, looked up
_VALUE: dict[StrEnum, str] = {m: m.value for e in (Abi, StackKind, FrameAction) for m in e}


def _hex(value: int | None) -> str | None:
    return hex(value) if value is not None else None


def mask_names(mask: int) -> list[str]:
    return [component_name(n) for n in range(64) if mask >> n & 1]


# --- plan ----------------------------------------------------------------------------------------------


def finding_json(f: Finding) -> dict[str, object]:
    out: dict[str, object] = {
        "code": f.code,
        "severity": _SEVERITY[f.severity],
        "subject": f.subject,
        "detail": f.detail,
    }
    if f.remedy:
        out["remedy"] = f.remedy
    if f.source is not None:
        out["source"] = f.source
    if f.dest is not None:
        out["dest"] = f.dest
    return out


def _frame_summary(f: SignalFrame) -> dict[str, object]:
    """What a plan says of the frame it judged (``show`` prints all of it: :func:`frame_json`)."""
    return {
        "frame": hex(f.address),
        "fpstate": _hex(f.fpstate),
        "stack": _VALUE[f.stack],
        "live": f.live,
        "depth": f.depth,
        "abi": _VALUE[f.abi],
        "signo": f.signo,
        "xfeatures": hex(f.sw.xfeatures) if f.sw else None,
        "xstate_size": f.sw.xstate_size if f.sw else None,
        "xstate_bv": _hex(f.xstate_bv),
    }


def decision_json(d: FrameDecision) -> dict[str, object]:
    out = _frame_summary(d.frame)
    out["action"] = _VALUE[d.action]
    out["reasons"] = [finding_json(x) for x in d.findings]
    if d.action in (FrameAction.TRANSLATE, FrameAction.RELOCATE):
        out["target"] = {"xfeatures": hex(d.keep_mask), "xstate_size": d.target_size}
    return out


def thread_plan_json(t: ThreadPlan) -> dict[str, object]:
    return {
        "pid": t.state.pid,
        "tid": t.state.tid,
        "compat": t.state.compat,
        "xstate_bv": _hex(t.state.xstate_bv),
        "action": t.action,
        "frames": [decision_json(d) for d in t.frames],
        "reasons": [finding_json(f) for f in t.findings],
    }


def glibc_json(g: GlibcState | GlibcUnread) -> dict[str, object]:
    if isinstance(g, GlibcUnread):
        return {"read": False, "loader": g.loader, "why": g.why}
    return {
        "read": True,
        "loader": g.loader,
        "static": g.static,
        "version": g.version,
        "trampoline": g.trampoline,
        "usable": sorted(g.active),
        "tunables": g.tunables,
        "lazy_binding": list(g.lazy) if g.lazy is not None else None,
        "save_areas": [
            {"name": a.name, "address": hex(a.vaddr), "size": a.value, "mask": hex(a.mask)} for a in g.areas
        ],
    }


def process_plan_json(p: ProcessPlan) -> dict[str, object]:
    return {
        "pid": p.pid,
        "glibc": glibc_json(p.glibc),
        "rewrite": [{"address": hex(a), "size": v} for a, v in p.size_patches],
        "reasons": [finding_json(f) for f in p.findings],
    }


def plan_json(plan: Plan) -> dict[str, object]:
    return {
        "schema": PLAN_SCHEMA,
        "verdict": plan.verdict.value,
        "dest": {
            "name": plan.dest.name,
            "xcr0": hex(plan.dest.xcr0),
            "user_size": plan.dest.user_size,
            "sigreturn": plan.dest.sigreturn,
            "sigreturn_guess": plan.dest.sigreturn_guess,
        },
        "threads": [thread_plan_json(t) for t in plan.threads],
        "processes": [process_plan_json(p) for p in plan.processes],
        "reasons": [finding_json(f) for f in plan.findings],
    }


def plans_json(plans: Sequence[Plan]) -> dict[str, object]:
    return {"schema": PLANS_SCHEMA, "plans": [plan_json(p) for p in plans]}


# --- show ----------------------------------------------------------------------------------------------


def frame_json(f: SignalFrame) -> dict[str, object]:
    out: dict[str, object] = {
        "frame": hex(f.address),
        "abi": f.abi.value,
        "stack": f.stack.value,
        "liveness": f.liveness.value,
        "live": f.live,
        "depth": f.depth,
        "signo": f.signo,
        "interrupted_ip": hex(f.interrupted_ip),
        "interrupted_sp": hex(f.interrupted_sp),
        "fpstate": _hex(f.fpstate),
        "kernel_layout": f.kernel_layout,
        "end": hex(f.end),
    }
    if f.sw is not None:
        out["sw_bytes"] = {
            "xfeatures": hex(f.sw.xfeatures),
            "xstate_size": f.sw.xstate_size,
            "extended_size": f.sw.extended_size,
        }
        out["format"] = "fxsave" if f.fxsave_only else "xsave"
        out["xstate_bv"] = hex(f.xstate_bv or 0)
        out["xcomp_bv"] = hex(f.xcomp_bv or 0)
        out["mxcsr"] = hex(f.mxcsr or 0)
    out["checks"] = [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in f.checks]
    return out


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
            "xstate_bv": _hex(t.xsave.xstate_bv),
            "components": mask_names(t.xsave.xstate_bv or 0),
            "in_use": [mask_names(1 << n)[0] for n in sorted(t.xsave.in_use)],
            "pkru": _hex(t.xsave.pkru),
            "mxcsr": _hex(t.xsave.mxcsr),
        },
        "frames": [frame_json(f) for f in fr.frames],
        "unreadable": [{"stack": u.stack.value, "reason": u.error.reason} for u in fr.unreadable],
    }


def show_json(
    model: CheckpointModel, source: str, glibc: Mapping[int, GlibcState | GlibcUnread] | None = None
) -> dict[str, object]:
    glibc = glibc or {}
    return {
        "schema": SHOW_SCHEMA,
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
                "glibc": glibc_json(glibc[p.pid]) if p.pid in glibc else None,
                "threads": [_thread_json(t) for t in p.threads],
            }
            for p in model.processes
        ],
    }


# --- compare -------------------------------------------------------------------------------------------


def difference_json(d: Difference) -> dict[str, str]:
    return {"kind": d.kind, "subject": d.subject, "detail": d.detail}
