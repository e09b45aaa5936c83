"""Run the rule tables: per live frame, per thread, per checkpoint; then build the plan.

Each function here only orders the tables (frame_rules.py, thread_rules.py, checkpoint_rules.py) and
turns their findings into a decision; the rules themselves are in the tables (docs/plan-rules.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from criu_xstate import glibc
from criu_xstate.frames import SignalFrame
from criu_xstate.glibc import GlibcState, GlibcUnread
from criu_xstate.model import CheckpointModel, ThreadState
from criu_xstate.plan import frame_rules as fr
from criu_xstate.plan.checkpoint_rules import CHECKPOINT_RULES, CheckpointFacts
from criu_xstate.plan.facts import FrameFacts, frame_facts
from criu_xstate.plan.findings import (
    Finding,
    FrameAction,
    FrameDecision,
    Plan,
    ProcessPlan,
    Severity,
    ThreadPlan,
    run_rules,
)
from criu_xstate.plan.glibc_rules import AREA_RULES, GLIBC_RULES, GlibcFacts, size_patches
from criu_xstate.plan.inputs import HostFacts, SourceFacts, with_frame_flags
from criu_xstate.plan.target import choose_target
from criu_xstate.plan.thread_rules import (
    ABSENT_COMPONENT_RULES,
    PKRU_RULES,
    STACK_RULES,
    THREAD_RULES,
    ThreadFacts,
    core_drop,
    core_pkru,
)
from criu_xstate.x86.xfeatures import PKRU


def _judge_state(f: FrameFacts, subject: str, out: list[Finding]) -> None:
    """Components, xstate_bv, PKRU and the SIGSEGV rules, in the order the findings are reported.

    PKRU is not a component here: STATE_RULES judge it both ways, then the one COMPONENT_OFFSET_MOVED
    row checks where the PKRU the destination gets sits.
    """
    for c in f.components:
        if c.number != PKRU:
            run_rules(fr.COMPONENT_RULES, f, c, subject, out)
    run_rules(fr.STATE_RULES, f, None, subject, out)
    if (pkru := f.carried_pkru) is not None:
        run_rules((fr.OFFSET_MOVED,), f, pkru, subject, out)
    run_rules(fr.SIGSEGV_RULES, f, None, subject, out)


def _refused(out: list[Finding]) -> bool:
    return any(x.severity is Severity.REFUSE for x in out)


def _judge_xsave_frame(f: FrameFacts, subject: str) -> FrameDecision:
    out: list[Finding] = []
    if run_rules(fr.GATES, f, None, subject, out):
        return FrameDecision(f.frame, FrameAction.REFUSE if _refused(out) else FrameAction.KEEP, tuple(out))
    _judge_state(f, subject, out)
    if _refused(out):
        return FrameDecision(f.frame, FrameAction.REFUSE, tuple(out))
    t = choose_target(f)
    if run_rules(fr.SIZE_RULES, f, t, subject, out):
        return FrameDecision(f.frame, FrameAction.REFUSE, tuple(out))
    sw = f.frame.sw
    assert sw is not None
    if not any(x.severity >= Severity.TRANSLATE for x in out):
        kept = (f.offsets, sw.xfeatures, sw.xstate_size, t.capacity, f.pkru)
        return FrameDecision(f.frame, FrameAction.KEEP, tuple(out), *kept)
    action = FrameAction.RELOCATE if t.relocate else FrameAction.TRANSLATE
    return FrameDecision(f.frame, action, tuple(out), f.offsets, t.keep, t.size, t.capacity, t.pkru)


def plan_frame(
    frame: SignalFrame, dest: HostFacts, source: SourceFacts | None = None, *, allow_relocation: bool = True
) -> FrameDecision:
    """Decide what one live frame needs on ``dest``; compat frames that would need a change are refused."""
    facts = frame_facts(frame, dest, source, allow_relocation=allow_relocation)
    subject = facts.subject  # the findings of every table name it: formatted once
    decision = _judge_xsave_frame(facts, subject)
    out: list[Finding] = []
    run_rules(fr.IA32_RULES, facts, decision, subject, out)
    if not out:
        return decision
    return FrameDecision(frame, FrameAction.REFUSE, (*out, *decision.findings))


def plan_thread_state(state: ThreadState, dest: HostFacts) -> list[Finding]:
    """Rules for the thread's current FPU state (core-<tid>.img), which CRIU itself re-lays out."""
    return _judge_thread_state(ThreadFacts(state, dest))


def _judge_thread_state(t: ThreadFacts) -> list[Finding]:
    state, subject = t.state, t.subject
    out: list[Finding] = []
    run_rules(THREAD_RULES, t, None, subject, out)
    for why in state.unreadable:
        run_rules(STACK_RULES, t, why, subject, out)
    for n in t.absent_components():
        run_rules(ABSENT_COMPONENT_RULES, t, n, subject, out)
    run_rules(PKRU_RULES, t, None, subject, out)
    return out


def plan_glibc(state: GlibcState | GlibcUnread, dest: HostFacts) -> ProcessPlan:
    """Rules for what one process's glibc cached at start-up (glibc_rules.py)."""
    g = GlibcFacts(state, dest)
    out: list[Finding] = []
    run_rules(GLIBC_RULES, g, None, g.subject, out)
    if isinstance(state, GlibcState):
        for area in state.areas:
            run_rules(AREA_RULES, g, area, g.subject, out)
    return ProcessPlan(state.pid, state, tuple(out), size_patches(g))


def make_plan(
    threads: Sequence[tuple[ThreadState, Sequence[SignalFrame]]],
    dest: HostFacts,
    source: SourceFacts | None = None,
    *,
    allow_relocation: bool = True,
    strict_isa: bool = False,
    extra: Sequence[Finding] = (),
    glibc_states: Sequence[GlibcState | GlibcUnread] = (),
) -> Plan:
    plans: list[ThreadPlan] = []
    for state, frames in threads:
        decisions = tuple(
            plan_frame(f, dest, source, allow_relocation=allow_relocation) for f in frames if f.live
        )
        t = ThreadFacts(state, dest)
        drop = core_drop(t) if state.xstate_bv is not None else 0
        plans.append(ThreadPlan(state, decisions, tuple(_judge_thread_state(t)), drop, core_pkru(t)))
    general = list(extra)
    c = CheckpointFacts(dest, source, strict_isa)
    run_rules(CHECKPOINT_RULES, c, None, c.subject, general)
    return Plan(dest, tuple(plans), tuple(general), tuple(plan_glibc(g, dest) for g in glibc_states))


def plan_for(
    model: CheckpointModel,
    dest: HostFacts,
    source: SourceFacts | None,
    *,
    allow_relocation: bool = True,
    strict_isa: bool = False,
    root: Path | None = Path("/"),
) -> Plan:
    """The plan of a checkpoint; without source flags, those its live frames reveal stand in. ``root``
    is where the processes' files are (their loader's code is read from there); None skips glibc."""
    threads = [(t.state(), t.frames.live) for t in model.threads()]
    source = with_frame_flags(source, (f for _, frames in threads for f in frames))
    states = glibc.read_all(model.processes, root) if root is not None else []
    return make_plan(
        threads, dest, source, allow_relocation=allow_relocation, strict_isa=strict_isa, glibc_states=states
    )
