"""Per-frame facts, computed once before any rule runs: the source layout, each component's place and
whether it holds data, PKRU, and the destination they are judged against (docs/plan-rules.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import cache

from criu_xstate.frames import SignalFrame
from criu_xstate.plan.inputs import HostFacts, SourceFacts
from criu_xstate.plan.layout import infer_source_offsets
from criu_xstate.records import record
from criu_xstate.x86.xfeatures import PKRU, bits, component_name, state_bytes
from criu_xstate.x86.xsave import XsaveImage


@record
class ComponentState:
    """One XSAVE component of an image: where it is and whether it holds state."""

    number: int
    offset: int
    size: int
    in_use: bool  # bit set in xstate_bv and bytes not in the init state

    @property
    def name(self) -> str:
        return component_name(self.number)


@record
class FrameFacts:
    """One live frame against one destination. ``offsets`` is None when the layout is not known."""

    frame: SignalFrame
    dest: HostFacts
    allow_relocation: bool
    offsets: Mapping[int, tuple[int, int]] | None
    components: tuple[ComponentState, ...]  # of xstate_bv (>= 2) with a known offset, ascending
    pkru: int | None  # the frame's PKRU value, when it has one

    @property
    def subject(self) -> str:
        return f"tid {self.frame.tid} frame 0x{self.frame.address:x}"

    def on_dest(self, n: int) -> bool:
        return bool(self.dest.xcr0 >> n & 1)

    @property
    def dest_has_pkru(self) -> bool:
        return self.on_dest(PKRU)

    @property
    def carried_pkru(self) -> ComponentState | None:
        """The frame's PKRU as the destination gets it (it has pkeys), at its place in the frame."""
        if self.pkru is None or not self.dest_has_pkru or self.offsets is None:
            return None
        off, size = self.offsets[PKRU]
        return ComponentState(PKRU, off, size, in_use=True)


def frame_components(frame: SignalFrame, offsets: Mapping[int, tuple[int, int]]) -> dict[int, ComponentState]:
    """Per component of the frame's xstate_bv (>= 2): where it is and whether it holds non-init data."""
    bv = frame.xstate_bv or 0
    out: dict[int, ComponentState] = {}
    for n in bits(bv):
        if n < 2 or n not in offsets:
            continue
        off, size = offsets[n]
        data = frame.image[off : off + state_bytes(n, size)]
        out[n] = ComponentState(n, off, size, in_use=data.count(0) != len(data))  # any(data), in C
    return out


def frame_pkru(frame: SignalFrame, offsets: Mapping[int, tuple[int, int]]) -> int | None:
    if not (frame.xstate_bv or 0) >> PKRU & 1 or PKRU not in offsets:
        return None
    off = offsets[PKRU][0]
    return XsaveImage(frame.image).u32(off)


@cache
def _inferred(xfeatures: int, xstate_size: int) -> Mapping[int, tuple[int, int]] | None:
    """:func:`infer_source_offsets` without a hint, shared by the frames of one shape (read only)."""
    return infer_source_offsets(xfeatures, xstate_size)


def frame_facts(
    frame: SignalFrame, dest: HostFacts, source: SourceFacts | None, *, allow_relocation: bool
) -> FrameFacts:
    offsets = None
    if frame.sw is not None:
        hint = source.offsets if source else None
        if hint is None:  # the common case: one inference per (xfeatures, xstate_size), not per frame
            offsets = _inferred(frame.sw.xfeatures, frame.sw.xstate_size)
        else:
            offsets = infer_source_offsets(frame.sw.xfeatures, frame.sw.xstate_size, hint)
    if offsets is None:
        return FrameFacts(frame, dest, allow_relocation, None, (), None)
    comps = tuple(c for _, c in sorted(frame_components(frame, offsets).items()))
    return FrameFacts(frame, dest, allow_relocation, offsets, comps, frame_pkru(frame, offsets))
