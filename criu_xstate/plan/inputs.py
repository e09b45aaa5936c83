"""What the plan reads about the two hosts, and which source facts win.

The destination is a :class:`HostFacts` (a host profile or a fleet baseline, DESIGN.md §4). The source
is whatever is known of it (:class:`SourceFacts`): a ``--src`` profile wins; else the checkpoint's
``cpuinfo.img`` (CRIU ``--cpu-cap``) gives its CPU flags; else the signal frames reveal some flags,
since their ``xfeatures`` are the source kernel's. docs/plan-rules.md has the rules that read them.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from criu_xstate import hosts
from criu_xstate.frames import SignalFrame
from criu_xstate.records import record
from criu_xstate.x86.xfeatures import implied_flags
from criu_xstate.x86.xsave import MIN_XSTATE_SIZE, layout_end


@record
class HostFacts:
    """What the rules need to know about the destination (a host profile or a fleet baseline)."""

    name: str
    xcr0: int
    user_size: int
    mxcsr_mask: int
    offsets: Mapping[int, tuple[int, int]]  # component -> (standard offset, size)
    sigreturn: str = "frame-size"  # or "user-size" (6.15 .. 7.1-rc5 without the revert)
    flags: frozenset[str] = frozenset()
    offset_conflicts: frozenset[int] = frozenset()  # fleet: components whose offsets differ between hosts
    dynamic: int = 0  # features a new task lacks until ARCH_REQ_XCOMP_PERM (AMX tile data)
    sigreturn_guess: str | None = None  # why ``sigreturn`` is a guess; None: measured or set

    @property
    def has_xsave(self) -> bool:
        """False for a CPU without XSAVE (a profile with the 512-byte FXSAVE area only)."""
        return self.user_size >= MIN_XSTATE_SIZE

    @property
    def default_xfeatures(self) -> int:
        """The ``xfeatures`` a kernel-built frame of a new task on this host carries."""
        return self.xcr0 & ~self.dynamic

    def size_for(self, mask: int) -> int:
        """End of the highest-placed component of ``mask`` this host has (at least MIN_XSTATE_SIZE)."""
        return layout_end(self.offsets, mask, skip_missing=True) or MIN_XSTATE_SIZE


@record
class SourceFacts:
    """What is known of the source host: from a ``--src`` profile, a cpuinfo.img, or only from frames."""

    name: str = "source"
    offsets: Mapping[int, tuple[int, int]] | None = None
    flags: frozenset[str] | None = None


def facts_from_profile(profile: hosts.HostProfile) -> HostFacts:
    """The plan's view of a host profile (DESIGN.md §4)."""
    xs = profile.xsave
    guessed = profile.kernel.sigreturn_source == "guessed"
    return HostFacts(
        name=profile.name,
        xcr0=xs.xcr0,
        user_size=xs.user_size,
        mxcsr_mask=xs.mxcsr_mask,
        offsets={n: (c.offset, c.size) for n, c in xs.components.items()},
        sigreturn=profile.kernel.sigreturn,
        flags=frozenset(profile.flags),
        offset_conflicts=frozenset(xs.offset_conflicts),
        dynamic=xs.dynamic,
        sigreturn_guess=(profile.kernel.sigreturn_reason or "no reason recorded") if guessed else None,
    )


def source_facts(
    profile: hosts.HostProfile | None, cpuinfo: hosts.PartialProfile | None
) -> SourceFacts | None:
    """A ``--src`` profile wins (its layout and flags are the source's); else a cpuinfo.img gives the
    source's CPU flags but not its XSAVE layout; else nothing is known until the frames are read
    (:func:`with_frame_flags`)."""
    if profile is not None:
        facts = facts_from_profile(profile)
        return SourceFacts(profile.name, dict(facts.offsets), facts.flags)
    if cpuinfo is not None:
        return SourceFacts("cpuinfo.img", None, frozenset(cpuinfo.flags) if cpuinfo.flags else None)
    return None


def with_frame_flags(source: SourceFacts | None, frames: Iterable[SignalFrame]) -> SourceFacts | None:
    """Flags the frames reveal, when no profile or cpuinfo.img gave the source's flags.

    A frame's ``xfeatures`` are the source kernel's, so the source CPU had the instruction sets behind
    those components.
    """
    if source is not None and source.flags is not None:
        return source
    xfeatures = 0
    for f in frames:
        xfeatures |= f.sw.xfeatures if f.sw else 0
    implied = implied_flags(xfeatures)
    if not implied:
        return source
    return SourceFacts("signal frames", source.offsets if source else None, implied)
