"""Build plans from a checkpoint model and destination profiles (shared by plan, apply and the hook)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from criu_xstate import hosts
from criu_xstate.errors import ProfileError
from criu_xstate.model import CheckpointModel
from criu_xstate.plan import HostFacts, Plan, SourceFacts, make_plan
from criu_xstate.x86.xfeatures import implied_flags


@dataclass(frozen=True)
class Destination:
    name: str
    facts: HostFacts


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


def load_destinations(paths: Sequence[str]) -> list[Destination]:
    out: list[Destination] = []
    for p in paths:
        for profile in hosts.load_profiles(Path(p)):
            out.append(Destination(profile.name, facts_from_profile(profile)))
    return out


def load_source(path: str | None, model: CheckpointModel) -> SourceFacts | None:
    """The source host: a --src profile, else the checkpoint's cpuinfo.img (CRIU --cpu-cap), else None."""
    if path is not None:
        profiles = hosts.load_profiles(Path(path))
        if len(profiles) != 1:
            raise ProfileError(path, f"--src needs one profile, found {len(profiles)}")
        (profile,) = profiles
        f = facts_from_profile(profile)
        return SourceFacts(profile.name, dict(f.offsets), f.flags)
    cpuinfo = model.checkpoint.cpuinfo()
    if cpuinfo is None:
        return None
    partial = hosts.profile_from_cpuinfo_img(cpuinfo)
    return SourceFacts("cpuinfo.img", None, frozenset(partial.flags) if partial.flags else None)


def plan_for(
    model: CheckpointModel,
    dest: HostFacts,
    source: SourceFacts | None,
    *,
    allow_relocation: bool = True,
    strict_isa: bool = False,
) -> Plan:
    threads = [(t.state(), t.frames.live) for t in model.threads()]
    if source is None or source.flags is None:
        # What the frames reveal: their xfeatures are the source kernel's, so the source CPU had the
        # instruction sets behind those components.
        xfeatures = 0
        for _, frames in threads:
            for f in frames:
                xfeatures |= f.sw.xfeatures if f.sw else 0
        implied = implied_flags(xfeatures)
        if implied:
            source = SourceFacts("signal frames", source.offsets if source else None, implied)
    return make_plan(threads, dest, source, allow_relocation=allow_relocation, strict_isa=strict_isa)
