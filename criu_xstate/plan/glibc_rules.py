"""The rules about what glibc decided at start-up in each process (criu_xstate/glibc.py reads it), as a
table: one row per reason code (README, "Plan JSON and reason codes"; docs/glibc-state.md).

- the CPU features glibc found usable: every ifunc was resolved once from them, so a destination
  without one of them can meet SIGILL in a string function (refused by name, with the tunable that
  masks it);
- the instruction its lazy-binding trampolines save vector state with (XSAVEC chosen where the
  destination lacks it: SIGILL at the first unresolved call);
- the save-area sizes those trampolines reserve: smaller than what they write on the destination,
  the caller's stack is overwritten (CRIU issue #3120). The area is reserved at every call, so the
  cached size is rewritten in the checkpoint (a translation).
"""

from __future__ import annotations

from criu_xstate.glibc import IFUNC_FEATURES, GlibcState, GlibcUnread, SaveArea, needed, rewritten
from criu_xstate.plan.findings import Hit, Rule, Severity
from criu_xstate.plan.inputs import HostFacts
from criu_xstate.records import record

FLAG_OF = {f.name: f.flag for f in IFUNC_FEATURES}


@record
class GlibcFacts:
    """What the glibc rules look at: one process's glibc state and the destination."""

    state: GlibcState | GlibcUnread
    dest: HostFacts

    @property
    def subject(self) -> str:
        return f"pid {self.state.pid} glibc"

    def need(self, area: SaveArea) -> int:
        assert isinstance(self.state, GlibcState)
        return needed(area, self.state.trampoline, self.dest.xcr0, self.dest.offsets)


def size_patches(g: GlibcFacts) -> tuple[tuple[int, int], ...]:
    """The decision for the process's memory: (address, new cached size) of each save area too small
    on the destination. Nothing when the process saves with FXSAVE (a fixed 512-byte area)."""
    s = g.state
    if not isinstance(s, GlibcState) or s.trampoline == "fxsave":
        return ()
    small = [a for a in s.areas if _matters(s, a) and a.value < g.need(a)]
    return tuple((a.vaddr, rewritten(a, g.need(a))) for a in small)


def _matters(s: GlibcState, area: SaveArea) -> bool:
    """The lazy-binding area is never used when every object was bound at start-up."""
    return not (area.in_cpu_features and s.bound_at_start)


def _unread(g: GlibcFacts, _: None) -> Hit | None:
    s = g.state
    if not isinstance(s, GlibcUnread):
        return None
    return Hit(
        f"what glibc cached at start-up could not be read ({s.why}): its save-area size and the CPU "
        "features its ifuncs chose are not checked",
        source=s.loader,
    )


def _features_missing(g: GlibcFacts, _: None) -> Hit | None:
    s = g.state
    if not isinstance(s, GlibcState) or not g.dest.flags:
        return None
    missing = sorted(n for n in s.active if FLAG_OF[n] not in g.dest.flags)
    if not missing:
        return None
    return Hit(
        f"glibc {s.version or '?'} ({s.loader}) found {', '.join(missing)} usable at start-up and resolved "
        f"its ifuncs with them; {g.dest.name} lacks {', '.join(FLAG_OF[n] for n in missing)}: SIGILL "
        "when a function chosen that way runs",
        source=",".join(missing),
        dest="absent",
        name=",".join(f"-{n}" for n in missing),
    )


def _bound_at_start(g: GlibcFacts, _: None) -> Hit | None:
    s = g.state
    if not isinstance(s, GlibcState) or not s.bound_at_start:
        return None
    return Hit(
        "every object was bound at start-up (BIND_NOW or LD_BIND_NOW): the lazy-binding trampoline and "
        "its save area are never used"
    )


def _trampoline_missing(g: GlibcFacts, _: None) -> Hit | None:
    s = g.state
    if not isinstance(s, GlibcState) or s.trampoline == "fxsave" or not g.dest.flags or s.bound_at_start:
        return None
    if s.trampoline in g.dest.flags:
        return None
    return Hit(
        f"glibc's lazy-binding trampolines save registers with {s.trampoline.upper()}, which "
        f"{g.dest.name} lacks: SIGILL at the first call of a function not yet bound",
        source=s.trampoline,
        dest="absent",
    )


def _save_area_small(g: GlibcFacts, area: SaveArea) -> Hit | None:
    s = g.state
    if not isinstance(s, GlibcState) or s.trampoline == "fxsave" or not _matters(s, area):
        return None
    need = g.need(area)
    if area.value >= need:
        return None
    return Hit(
        f"glibc's trampolines reserve {area.value} bytes ({area.name} at 0x{area.vaddr:x}) but their "
        f"{s.trampoline} of components 0x{area.mask:x} writes {need} on {g.dest.name}: the caller's "
        f"stack would be overwritten at the first lazy binding; {rewritten(area, need)} is cached instead",
        source=area.value,
        dest=need,
    )


GLIBC_RULES: tuple[Rule[GlibcFacts, None], ...] = (
    Rule(
        "GLIBC_STATE_UNREAD",
        Severity.INFO,
        _unread,
        "plan where the process's files are (--root DIR for a container's root file system)",
    ),
    Rule("GLIBC_BOUND_AT_START", Severity.INFO, _bound_at_start),
    Rule(
        "GLIBC_FEATURE_MISSING_ON_DEST",
        Severity.REFUSE,
        _features_missing,
        "restart the workload with GLIBC_TUNABLES=glibc.cpu.hwcaps={name} and dump it again, or "
        "restore on a host with these features",
    ),
    Rule(
        "GLIBC_TRAMPOLINE_UNSUPPORTED",
        Severity.REFUSE,
        _trampoline_missing,
        "restart the workload with LD_BIND_NOW=1 and dump it again, or restore where the CPU has it",
    ),
)

AREA_RULES: tuple[Rule[GlibcFacts, SaveArea], ...] = (
    Rule("GLIBC_SAVE_AREA_TOO_SMALL", Severity.TRANSLATE, _save_area_small, "criu-xstate apply"),
)
