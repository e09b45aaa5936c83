"""What a plan says: findings (reason code, severity, values on both sides, remedy), the rule row that
produces each one, the decision per frame and thread, and the checkpoint's verdict.

The reason codes and severities are the README's table ("Plan JSON and reason codes"); the rules that
emit them are the tables in frame_rules.py and thread_rules.py (docs/plan-rules.md).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import IntEnum, StrEnum
from typing import Generic, TypeVar

from criu_xstate.frames import SignalFrame
from criu_xstate.glibc import GlibcState, GlibcUnread
from criu_xstate.model import ThreadState
from criu_xstate.plan.inputs import HostFacts
from criu_xstate.records import field, record


class Severity(IntEnum):
    INFO = 0
    WARNING = 1
    TRANSLATE = 2
    REFUSE = 3


class Verdict(StrEnum):
    COMPATIBLE = "compatible"
    TRANSLATE = "translate"
    REFUSE = "refuse"


class FrameAction(StrEnum):
    KEEP = "keep"
    TRANSLATE = "translate"
    RELOCATE = "relocate"
    REFUSE = "refuse"


@record
class Finding:
    """One thing a plan found: a code, how bad it is, about what, and what to do."""

    code: str
    severity: Severity
    subject: str
    detail: str
    remedy: str = ""
    source: str | None = None
    dest: str | None = None


@record
class Hit:
    """What a rule's check found: the detail, the values on both sides, and what the remedy names."""

    detail: str
    source: object = None
    dest: object = None
    name: str = ""  # fills ``{name}`` in the row's remedy
    severity: Severity | None = None  # only ISA_FLAGS_MISSING under --strict-isa


F = TypeVar("F")
S = TypeVar("S")


@record
class Rule(Generic[F, S]):
    """One row of a rule table: a reason code, its severity, the check and the remedy.

    ``check(facts, subject)`` returns a :class:`Hit` when the rule applies. ``stop``: once it applied,
    nothing else about the subject can be judged (a frame-wide rule stops the frame, a component rule
    that component).
    """

    code: str
    severity: Severity
    check: Callable[[F, S], Hit | None]
    remedy: str = ""
    stop: bool = False

    def finding(self, subject: str, hit: Hit) -> Finding:
        return Finding(
            self.code,
            hit.severity if hit.severity is not None else self.severity,
            subject,
            hit.detail,
            self.remedy.format(name=hit.name) if "{" in self.remedy else self.remedy,
            None if hit.source is None else str(hit.source),
            None if hit.dest is None else str(hit.dest),
        )


def run_rules(rules: tuple[Rule[F, S], ...], facts: F, subject: S, name: str, out: list[Finding]) -> bool:
    """Append the findings of ``rules`` on one subject to ``out``; True when a ``stop`` rule applied."""
    for rule in rules:
        hit = rule.check(facts, subject)
        if hit is None:
            continue
        out.append(rule.finding(name, hit))
        if rule.stop:
            return True
    return False


@record
class FrameDecision:
    """The plan for one live frame; translate.py turns it into bytes."""

    frame: SignalFrame
    action: FrameAction
    findings: tuple[Finding, ...]
    source_offsets: Mapping[int, tuple[int, int]] | None = None
    keep_mask: int = 0  # components kept in xstate_bv and xfeatures
    target_size: int = 0  # xstate_size of the rewritten image
    capacity: int = 0  # bytes available in place at fpstate (image + magic2 + padding)
    pkru: int | None = None  # PKRU value to carry when the destination has protection keys


@record
class ThreadPlan:
    """The plan for one thread: its frames, its findings, and the rewrites of its core."""

    state: ThreadState
    frames: tuple[FrameDecision, ...]
    findings: tuple[Finding, ...]
    core_drop: int = 0  # components to leave out of core-<tid>.img alongside a translation (thread_rules)
    core_pkru: int | None = None  # PKRU to write into core-<tid>.img, which has none (thread_rules)

    @property
    def action(self) -> str:
        if any(f.severity is Severity.REFUSE for f in self.findings) or any(
            d.action is FrameAction.REFUSE for d in self.frames
        ):
            return "refuse"
        if any(d.action is not FrameAction.KEEP for d in self.frames) or any(
            f.severity is Severity.TRANSLATE for f in self.findings
        ):
            return "translate"
        return "keep"


@record
class ProcessPlan:
    """The plan for what one process's glibc cached at start-up (plan/glibc_rules.py)."""

    pid: int
    glibc: GlibcState | GlibcUnread
    findings: tuple[Finding, ...]
    size_patches: tuple[tuple[int, int], ...] = ()  # (address, new save-area size) to write


@record
class Plan:
    """The whole decision for one destination: per-thread, per-process and checkpoint findings."""

    dest: HostFacts
    threads: tuple[ThreadPlan, ...]
    findings: tuple[Finding, ...] = field(default=())
    processes: tuple[ProcessPlan, ...] = field(default=())

    def all_findings(self) -> list[Finding]:
        out = list(self.findings)
        for p in self.processes:
            out.extend(p.findings)
        for t in self.threads:
            out.extend(t.findings)
            for d in t.frames:
                out.extend(d.findings)
        return out

    @property
    def verdict(self) -> Verdict:
        worst = max((f.severity for f in self.all_findings()), default=Severity.INFO)
        if worst is Severity.REFUSE:
            return Verdict.REFUSE
        if worst is Severity.TRANSLATE:
            return Verdict.TRANSLATE
        return Verdict.COMPATIBLE
