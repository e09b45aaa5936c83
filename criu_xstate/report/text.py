"""Text of ``show`` and ``plan`` (``apply`` prints the plan too). Fits an 80-column terminal; colour
only when asked (a TTY). The JSON of the same commands is in json.py.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence

from criu_xstate.frames import Liveness, SignalFrame
from criu_xstate.glibc import GlibcState, GlibcUnread
from criu_xstate.images.container import ContainerMeta
from criu_xstate.model import CheckpointModel, Thread
from criu_xstate.plan import Finding, Plan, Severity, ThreadPlan, Verdict
from criu_xstate.plan.findings import ProcessPlan
from criu_xstate.report.json import mask_names

WIDTH = 80

_COLOURS = {"green": "32", "yellow": "33", "red": "31", "bold": "1", "dim": "2"}
_VERDICT_COLOUR = {Verdict.COMPATIBLE: "green", Verdict.TRANSLATE: "yellow", Verdict.REFUSE: "red"}
_SEVERITY_COLOUR = {
    Severity.INFO: "dim",
    Severity.WARNING: "yellow",
    Severity.TRANSLATE: "yellow",
    Severity.REFUSE: "red",
}
_VERDICT_TEXT = {
    Verdict.COMPATIBLE: "safe to restore as is",
    Verdict.TRANSLATE: "safe after `criu-xstate apply`",
    Verdict.REFUSE: "unsafe: state would be lost or the task killed",
}


class Style:
    def __init__(self, colour: bool) -> None:
        self.colour = colour

    def __call__(self, text: str, name: str) -> str:
        if not self.colour:
            return text
        return f"\033[{_COLOURS[name]}m{text}\033[0m"


def _wrap(text: str, indent: int) -> list[str]:
    pad = " " * indent
    return textwrap.wrap(text, WIDTH, initial_indent=pad, subsequent_indent=pad + "  ") or [pad]


def _finding_lines(f: Finding, indent: int, style: Style) -> list[str]:
    head = f"{style(f.code, _SEVERITY_COLOUR[f.severity])} ({f.severity.name.lower()})"
    lines = [" " * indent + head]
    lines += _wrap(f.detail, indent + 2)
    if f.remedy and f.severity >= Severity.WARNING:
        lines += _wrap(f"-> {f.remedy}", indent + 2)
    return lines


def glibc_summary(g: GlibcState) -> str:
    """One line of what a process's glibc cached (``show`` and ``plan``)."""
    areas = ", ".join(f"{a.name} {a.value} B" for a in g.areas) or "no save area"
    chose = ", ".join(sorted(g.active)) or "baseline only"
    kind = "static" if g.static else g.loader
    extra = "; bound at start-up" if g.bound_at_start else ""
    extra += f"; GLIBC_TUNABLES={g.tunables}" if g.tunables else ""
    return f"glibc {g.version or '?'} ({kind}): {g.trampoline} trampolines, {areas}; usable: {chose}{extra}"


def _process_lines(p: ProcessPlan, style: Style, verbose: bool) -> list[str]:
    if isinstance(p.glibc, GlibcState):
        worst = max((f.severity for f in p.findings), default=Severity.INFO)
        action = {Severity.REFUSE: "refuse", Severity.TRANSLATE: "translate"}.get(worst, "keep")
        lines = _wrap(f"{glibc_summary(p.glibc)} -> {action}", 2)
    elif verbose:
        lines = _wrap(f"glibc: not read ({p.glibc.why})", 2)
    else:
        return []
    for f in p.findings:
        if verbose or f.severity >= Severity.WARNING:
            lines += _finding_lines(f, 4, style)
    return lines


def _thread_lines(t: ThreadPlan, style: Style, verbose: bool) -> list[str]:
    s = t.state
    bv = f"xstate_bv 0x{s.xstate_bv:x}" if s.xstate_bv is not None else "no xsave"
    lines = [
        f"  tid {s.tid}{' (compat)' if s.compat else ''}: registers {bv}; "
        f"{len(t.frames)} live frame{'s' if len(t.frames) != 1 else ''} -> {t.action}"
    ]
    for f in t.findings:
        if verbose or f.severity >= Severity.WARNING:
            lines += _finding_lines(f, 4, style)
    for d in t.frames:
        fr = d.frame
        size = f"{fr.sw.xstate_size} B" if fr.sw else "no fpstate"
        xf = f"xfeatures 0x{fr.sw.xfeatures:x}" if fr.sw else ""
        sig = f"signal {fr.signo}" if fr.signo else "signal ?"
        lines.append(f"    frame 0x{fr.address:x} on {fr.stack.value}, {sig}, {xf} {size}".rstrip())
        target = ""
        if d.action.value in ("translate", "relocate"):
            target = f" (to xfeatures 0x{d.keep_mask:x}, {d.target_size} B)"
        lines.append(f"      -> {d.action.value}{target}")
        for f in d.findings:
            if verbose or f.severity >= Severity.WARNING:
                lines += _finding_lines(f, 6, style)
    return lines


def render_plan_text(
    plan: Plan,
    *,
    checkpoint: str,
    colour: bool = False,
    verbose: bool = False,
    processes: Mapping[int, str] | None = None,
) -> str:
    style = Style(colour)
    d = plan.dest
    v = plan.verdict
    frames = [fd for t in plan.threads for fd in t.frames]
    changed = sum(1 for fd in frames if fd.action.value in ("translate", "relocate"))
    refused = sum(1 for fd in frames if fd.action.value == "refuse")
    cores = sum(1 for t in plan.threads if t.core_pkru is not None)
    lines = [
        f"{style(v.value.upper(), _VERDICT_COLOUR[v])}: {_VERDICT_TEXT[v]}",
        *_wrap(
            f"{checkpoint} -> {d.name} (xcr0 0x{d.xcr0:x}, user size {d.user_size}, sigreturn {d.sigreturn})",
            0,
        ),
        *(
            _wrap(f"warning: {d.name}'s sigreturn rule is a guess: {d.sigreturn_guess}", 2)
            if d.sigreturn_guess
            else []
        ),
        f"{len(plan.threads)} thread(s), {len(frames)} live frame(s): {changed} to rewrite, "
        f"{refused} refused" + (f"; {cores} thread state(s) to rewrite (PKRU)" if cores else ""),
    ]
    for f in plan.findings:
        lines += _finding_lines(f, 2, style)
    by_pid: dict[int, list[ThreadPlan]] = {}
    for t in plan.threads:
        by_pid.setdefault(t.state.pid, []).append(t)
    for pid, threads in by_pid.items():
        comm = (processes or {}).get(pid)
        lines.append("")
        lines.append(f"pid {pid}" + (f" ({comm})" if comm else ""))
        for pp in plan.processes:
            if pp.pid == pid:
                lines += _process_lines(pp, style, verbose)
        for t in threads:
            lines += _thread_lines(t, style, verbose)
    return "\n".join(lines) + "\n"


def render_multi_text(results: Sequence[tuple[str, Plan]], *, checkpoint: str, colour: bool = False) -> str:
    """One line per destination: which hosts can take this checkpoint."""
    style = Style(colour)
    lines = [f"{checkpoint}: {len(results)} destination(s)"]
    width = max((len(name) for name, _ in results), default=0)
    for name, plan in results:
        v = plan.verdict
        worst = [f.code for f in plan.all_findings() if f.severity >= Severity.TRANSLATE]
        why = ", ".join(sorted(set(worst))[:3])
        lines.append(f"  {name.ljust(width)}  {style(v.value.ljust(11), _VERDICT_COLOUR[v])} {why}".rstrip())
    return "\n".join(lines) + "\n"


def _show_frame(f: SignalFrame) -> list[str]:
    if f.liveness is Liveness.INVALID:
        why = "; ".join(f"{c.name}: {c.detail}" for c in f.failed)
        return [f"    not a frame at 0x{f.address:x} ({why})"]
    if f.liveness is not Liveness.LIVE:
        return [f"    {f.liveness.value} frame at 0x{f.address:x} on {f.stack.value} (not live)"]
    sw = f.sw
    if sw is None:
        desc = "no FPU context"
    elif f.fxsave_only:
        desc = "FXSAVE image (512 B: x87 and SSE, no XSAVE on the source)"
    else:
        desc = f"xfeatures 0x{sw.xfeatures:x} xstate_size {sw.xstate_size} xstate_bv 0x{f.xstate_bv or 0:x}"
    sig = f"signal {f.signo}" if f.signo else "signal ?"
    return [
        f"    live frame #{f.depth} 0x{f.address:x} on {f.stack.value}, {sig}: {desc}",
        f"      fpstate 0x{f.fpstate or 0:x}, interrupted at ip 0x{f.interrupted_ip:x} "
        f"sp 0x{f.interrupted_sp:x}",
    ]


def _show_thread(t: Thread) -> list[str]:
    vma = t.stack_vma
    stack = f"stack 0x{vma.start:x}-0x{vma.end:x}" if vma else "SP outside every VMA"
    lines = [f"  tid {t.tid}{' compat' if t.compat else ''}: sp 0x{t.sp:x} ({stack}), ip 0x{t.ip:x}"]
    if t.altstack:
        where = " (SP on it)" if t.on_altstack else ""
        lines.append(f"    sigaltstack 0x{t.altstack[0]:x} size {t.altstack[1]}{where}")
    bv = t.xsave.xstate_bv
    if bv is None:
        lines.append("    xsave: none in the image")
    else:
        used = ", ".join(mask_names(sum(1 << n for n in t.xsave.in_use))) or "nothing beyond SSE"
        lines.append(f"    xsave: xstate_bv 0x{bv:x}; in use: {used}")
    lines += [f"    {u.stack.value} unreadable: {u.error.reason}" for u in t.frames.unreadable]
    for f in t.frames.frames:
        lines += _show_frame(f)
    return lines


def show_text(
    model: CheckpointModel, source: str, glibc: Mapping[int, GlibcState | GlibcUnread] | None = None
) -> str:
    lines = [f"{source}: {len(model.processes)} process(es), {sum(1 for _ in model.threads())} thread(s)"]
    for p in model.processes:
        handlers = ", ".join(str(s.signo) for s in p.sigactions) or "none"
        lines += ["", f"pid {p.pid} ppid {p.ppid} ({p.comm}); handlers for signals: {handlers}"]
        g = (glibc or {}).get(p.pid)
        if isinstance(g, GlibcState):
            lines += _wrap(glibc_summary(g), 2)
        elif g is not None:
            lines += _wrap(f"glibc: not read ({g.why})", 2)
        for t in p.threads:
            lines += _show_thread(t)
    return "\n".join(lines) + "\n"


def container_line(m: ContainerMeta) -> str:
    """What checkpointctl shows first: which container this is."""
    ident = f" ({m.id[:12]})" if m.id else ""
    parts = [
        f"image {m.image}" if m.image else None,
        f"runtime {m.runtime}" if m.runtime else None,
        f"engine {m.engine}",
        f"created {m.created}" if m.created else None,
    ]
    return f"container {m.name or '?'}{ident}: " + ", ".join(p for p in parts if p)
