"""Rules -> findings -> verdict, for one checkpoint against one destination host. Pure: no I/O.

For every live frame and every thread, decide whether the restore is safe as is (``keep``), safe after
``apply`` (``translate`` / ``relocate``), or unsafe (``refuse``), with a stable reason code, the values
on both sides and a remedy. Where things are:

* inputs.py: what the plan reads of the destination and the source, and which source facts win;
* layout.py, facts.py: the source layout of a frame and the facts every rule reads;
* frame_rules.py, thread_rules.py, checkpoint_rules.py: the rule tables, one row per README code;
* target.py: what a frame becomes (kept components, PKRU, size, relocation);
* findings.py: findings, decisions, the verdict; make.py: runs the tables.

The rules are explained in docs/plan-rules.md; rendering is in criu_xstate/report/.
"""

from __future__ import annotations

from criu_xstate.model import ThreadState
from criu_xstate.plan.findings import Finding, FrameAction, FrameDecision, Plan, Severity, ThreadPlan, Verdict
from criu_xstate.plan.inputs import (
    HostFacts,
    SourceFacts,
    facts_from_profile,
    source_facts,
    with_frame_flags,
)
from criu_xstate.plan.layout import infer_source_offsets
from criu_xstate.plan.make import make_plan, plan_for, plan_frame, plan_thread_state

__all__ = [
    "Finding",
    "FrameAction",
    "FrameDecision",
    "HostFacts",
    "Plan",
    "Severity",
    "SourceFacts",
    "ThreadPlan",
    "ThreadState",
    "Verdict",
    "facts_from_profile",
    "infer_source_offsets",
    "make_plan",
    "plan_for",
    "plan_frame",
    "plan_thread_state",
    "source_facts",
    "with_frame_flags",
]
