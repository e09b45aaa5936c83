"""Read the hosts a plan is made for: destination profiles and the source (``--src``, else the
checkpoint's cpuinfo.img). Which source facts win, and the plan itself, are criu_xstate/plan/
(inputs.py, make.py); ``facts_from_profile`` and ``plan_for`` are re-exported for the commands and
the hook.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from criu_xstate import hosts
from criu_xstate.errors import ProfileError
from criu_xstate.model import CheckpointModel
from criu_xstate.plan import (
    HostFacts,
    SourceFacts,
    facts_from_profile,
    plan_for,
    source_facts,
)

__all__ = ["facts_from_profile", "load_destinations", "load_source", "plan_for"]


def load_destinations(paths: Sequence[str]) -> list[HostFacts]:
    """The plan's one host type (HostFacts, which carries the host's name) for every profile named."""
    return [facts_from_profile(profile) for p in paths for profile in hosts.load_profiles(Path(p))]


def load_source(path: str | None, model: CheckpointModel) -> SourceFacts | None:
    """Read what plan.inputs.source_facts weighs: a --src profile, else the checkpoint's cpuinfo.img
    (CRIU --cpu-cap), which is not read when a profile is given."""
    profile = _one_profile(path) if path is not None else None
    cpuinfo = model.checkpoint.cpuinfo() if profile is None else None
    partial = hosts.profile_from_cpuinfo_img(cpuinfo) if cpuinfo is not None else None
    return source_facts(profile, partial)


def _one_profile(path: str) -> hosts.HostProfile:
    profiles = hosts.load_profiles(Path(path))
    if len(profiles) != 1:
        raise ProfileError(path, f"--src needs one profile, found {len(profiles)}")
    return profiles[0]
