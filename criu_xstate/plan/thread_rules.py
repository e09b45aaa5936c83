"""The rules for a thread's current FPU state (core-<tid>.img), which CRIU itself re-lays out, as
tables: one row per reason code (README, "Plan JSON and reason codes"; docs/plan-rules.md).

make.py runs THREAD_RULES on the thread, STACK_RULES on each stack it could not read, and, when the
image has an XSAVE state, ABSENT_COMPONENT_RULES on each component the destination lacks and
PKRU_RULES once.
"""

from __future__ import annotations

from criu_xstate.model import ThreadState
from criu_xstate.plan.findings import Hit, Rule, Severity
from criu_xstate.plan.inputs import HostFacts
from criu_xstate.records import record
from criu_xstate.x86.xfeatures import INIT_PKRU, LEGACY, PKRU, bits, component_name


@record
class ThreadFacts:
    """What the thread rules look at: one thread's current state and the destination."""

    state: ThreadState
    dest: HostFacts

    @property
    def subject(self) -> str:
        return f"tid {self.state.tid} registers"

    def absent_components(self) -> list[int]:
        """Components of the saved state (beyond x87/SSE) that the destination does not enable."""
        bv = self.state.xstate_bv or 0
        return [n for n in bits(bv & ~LEGACY) if not self.dest.xcr0 >> n & 1]


def core_drop(t: ThreadFacts) -> int:
    """The decision for core-<tid>.img: the components (beyond x87/SSE) the destination lacks, dropped
    from the image only when every one of them is in its init state (PKRU: its default value). 0 when
    any holds data: the rules below refuse that thread, and live state is never dropped."""
    absent = t.absent_components()
    for n in absent:
        if n in t.state.in_use and not (n == PKRU and t.state.pkru in (0, INIT_PKRU)):
            return 0
    return sum(1 << n for n in absent)


def pkru_missing(t: ThreadFacts) -> bool:
    """The destination has protection keys but core-<tid>.img has no PKRU at all (its source had none):
    CRIU restores the thread through rt_sigreturn from a frame without the component, which leaves
    PKRU 0, every key open (measured: tests/test_qemu_pkru.py), where a task started there gets the
    Linux default. A thread from a CPU without XSAVE (FPU registers, no xsave) is restored through the
    same path with x87/SSE alone, so it is in this case too."""
    return t.state.xsave.fpregs and t.state.pkru is None and bool(t.dest.xcr0 >> PKRU & 1)


def core_pkru(t: ThreadFacts) -> int | None:
    """The decision for core-<tid>.img's PKRU: the Linux default when :func:`pkru_missing`."""
    return INIT_PKRU if pkru_missing(t) else None


def _compat(t: ThreadFacts, _: None) -> Hit | None:
    if not t.state.compat:
        return None
    return Hit("32-bit (compat) thread: its signal frames are not translated")


def _stack_unreadable(t: ThreadFacts, why: str) -> Hit:
    return Hit(
        f"the thread's stack cannot be read from the checkpoint ({why}): an in-flight signal frame "
        "there could be neither checked nor translated"
    )


def _pkru_missing(t: ThreadFacts, _: None) -> Hit | None:
    if not pkru_missing(t):
        return None
    return Hit(
        f"the saved state has no PKRU (a source without protection keys): CRIU would restore the thread "
        f"on {t.dest.name} with PKRU 0, every key open, instead of the default 0x{INIT_PKRU:08x}",
        source="absent",
        dest="pkeys",
    )


def _pkru_in_use(t: ThreadFacts, n: int) -> Hit | None:
    pkru = t.state.pkru
    if n != PKRU or pkru in (None, 0, INIT_PKRU):
        return None
    return Hit(
        f"PKRU 0x{pkru:08x} is not the default: the process uses protection keys, which {t.dest.name} "
        "does not have"
    )


def _in_use_missing(t: ThreadFacts, n: int) -> Hit | None:
    if n == PKRU or n not in t.state.in_use:
        return None
    name = component_name(n)
    return Hit(
        f"{name} holds live data but {t.dest.name} lacks it: CRIU would drop it silently",
        source="in use",
        dest="absent",
        name=name,
    )


def _init_absent(t: ThreadFacts, n: int) -> Hit | None:
    if n == PKRU or n in t.state.in_use:
        return None
    return Hit(f"{component_name(n)} is in its init state; CRIU leaves it out on {t.dest.name}")


def _xsave_dest_without(t: ThreadFacts, _: None) -> Hit | None:
    if t.state.xstate_bv is None or t.dest.has_xsave:
        return None
    return Hit(
        f"the saved registers are an XSAVE image and {t.dest.name} has no XSAVE: CRIU refuses to restore "
        "them there",
        source="xsave",
        dest="fxsave only",
    )


THREAD_RULES: tuple[Rule[ThreadFacts, None], ...] = (
    Rule("COMPAT_THREAD", Severity.WARNING, _compat),
    Rule(
        "THREAD_XSAVE_DEST_WITHOUT_XSAVE",
        Severity.REFUSE,
        _xsave_dest_without,
        "restore on a host with XSAVE",
    ),
)

STACK_RULES: tuple[Rule[ThreadFacts, str], ...] = (
    Rule(
        "STACK_UNREADABLE",
        Severity.REFUSE,
        _stack_unreadable,
        "dump without --lazy-pages (or with the pages transferred) and plan again",
    ),
)

ABSENT_COMPONENT_RULES: tuple[Rule[ThreadFacts, int], ...] = (
    Rule("THREAD_PKRU_IN_USE_DEST_NO_PKEYS", Severity.REFUSE, _pkru_in_use, "restore on a host with pkeys"),
    Rule(
        "THREAD_COMPONENT_IN_USE_MISSING_ON_DEST",
        Severity.REFUSE,
        _in_use_missing,
        "restore on a host with {name}",
    ),
    Rule("THREAD_COMPONENT_INIT_ABSENT_ON_DEST", Severity.INFO, _init_absent),
)

PKRU_RULES: tuple[Rule[ThreadFacts, None], ...] = (
    Rule(
        "THREAD_PKRU_MISSING_OPENS_KEYS",
        Severity.TRANSLATE,
        _pkru_missing,
        f"criu-xstate apply (carries the Linux default 0x{INIT_PKRU:08x} into core-<tid>.img)",
    ),
)
