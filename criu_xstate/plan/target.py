"""What a frame becomes on the destination: the components kept, the PKRU carried, the image size, and
whether the image fits in place or moves to a new mapping (docs/plan-rules.md, docs/translation.md).
"""

from __future__ import annotations

from criu_xstate.frames import SignalFrame
from criu_xstate.plan.facts import ComponentState, FrameFacts
from criu_xstate.records import record
from criu_xstate.x86.sigframe import RED_ZONE
from criu_xstate.x86.xfeatures import INIT_PKRU, LEGACY, PKRU, XTILEDATA
from criu_xstate.x86.xsave import XSAVE_ALIGN, image_bytes

MAX_PADDING = XSAVE_ALIGN  # fpstate is 64-byte aligned: at most 63 bytes lie above the image


@record
class Target:
    """What a translated frame image is to be: kept features, PKRU, size, and where it goes."""

    keep: int  # xstate_bv / xfeatures of the rewritten image
    pkru: int | None  # PKRU value to carry (the destination has protection keys)
    size: int  # xstate_size of the rewritten image
    capacity: int  # bytes available in place at fpstate
    relocate: bool  # the image (plus magic2) does not fit in place


def in_place_capacity(frame: SignalFrame) -> int:
    """Bytes at fpstate that belong to the frame: the image, magic2 and the kernel's alignment padding.

    Above that lies the interrupted context's red zone (same stack) or the altstack top; the padding
    the kernel left is between the end of the image and that limit, at most 63 bytes.
    """
    assert frame.sw is not None and frame.xsave_address is not None
    used = frame.sw.frame_bytes
    limit = frame.interrupted_sp - RED_ZONE
    pad = limit - (frame.xsave_address + used)
    if 0 <= pad < MAX_PADDING:
        return used + pad
    return used


def _kept(facts: FrameFacts, c: ComponentState) -> bool:
    """A component that holds data the destination can take (init-state ones are dropped losslessly)."""
    if c.number in (PKRU, XTILEDATA) or not c.in_use:
        return False
    return facts.on_dest(c.number) and c.number not in facts.dest.offset_conflicts


def keep_mask(facts: FrameFacts) -> int:
    keep = LEGACY
    for c in facts.components:
        if _kept(facts, c):
            keep |= 1 << c.number
    if facts.dest_has_pkru:
        keep |= 1 << PKRU
    return keep


def carried_pkru(facts: FrameFacts) -> int | None:
    """The frame's PKRU, or Linux's default when it has none (else sigreturn would open every key)."""
    if not facts.dest_has_pkru:
        return None
    return INIT_PKRU if facts.pkru is None else facts.pkru


def target_size(facts: FrameFacts, keep: int, capacity: int) -> int:
    """The destination's user size when the frame has room for it (it passes both magic2 rules) or the
    destination kernel wants magic2 there; else just what the kept components need."""
    dest = facts.dest
    assert facts.frame.sw is not None
    if dest.sigreturn == "user-size" and facts.frame.sw.xstate_size != dest.user_size:
        return dest.user_size
    if image_bytes(dest.user_size) <= capacity:
        return dest.user_size
    return dest.size_for(keep)


def choose_target(facts: FrameFacts) -> Target:
    keep = keep_mask(facts)
    capacity = in_place_capacity(facts.frame)
    size = target_size(facts, keep, capacity)
    return Target(keep, carried_pkru(facts), size, capacity, image_bytes(size) > capacity)
