"""The rules about the checkpoint as a whole rather than one thread or frame: the CPU flags the source
had and the destination lacks (README, "Plan JSON and reason codes"; docs/plan-rules.md).
"""

from __future__ import annotations

from criu_xstate.plan.findings import Hit, Rule, Severity
from criu_xstate.plan.inputs import HostFacts, SourceFacts
from criu_xstate.records import record

SHOWN_FLAGS = 12  # a detail names at most this many missing flags


@record
class CheckpointFacts:
    """What the checkpoint rules look at: destination, source, strictness."""

    dest: HostFacts
    source: SourceFacts | None
    strict_isa: bool

    @property
    def subject(self) -> str:
        return "checkpoint"


def _isa_flags_missing(c: CheckpointFacts, _: None) -> Hit | None:
    if c.source is None or c.source.flags is None or not c.dest.flags:
        return None
    missing = sorted(set(c.source.flags) - c.dest.flags)
    if not missing:
        return None
    more = len(missing) - SHOWN_FLAGS
    shown = ", ".join(missing[:SHOWN_FLAGS]) + (f" and {more} more" if more > 0 else "")
    return Hit(
        f"{c.dest.name} lacks CPU flags the source had (per {c.source.name}): "
        f"{shown}; code that chose them at start-up would get SIGILL",
        dest=",".join(missing),
        severity=Severity.REFUSE if c.strict_isa else None,
    )


CHECKPOINT_RULES: tuple[Rule[CheckpointFacts, None], ...] = (
    Rule(
        "ISA_FLAGS_MISSING",
        Severity.WARNING,
        _isa_flags_missing,
        "restore on a host with these flags, or re-run without --strict-isa to accept the risk",
    ),
)
