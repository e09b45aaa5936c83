"""Plan -> patches. Pure: bytes in, bytes out, no files.

A frame decided ``translate`` or ``relocate`` becomes a normalized XSAVE image for the destination
(research/kernel.md §7):

* the legacy 512 bytes (x87, MXCSR, XMM) are kept as they are (the plan refused a bad MXCSR);
* only the components in use (and PKRU where the destination has protection keys) are kept, each
  copied from the source offset to the destination's standard offset; components in their init state
  leave ``xstate_bv`` and ``xfeatures`` (the kernel initializes them: lossless);
* ``xstate_size`` is the plan's target (the destination user size when the frame has room, which is
  valid under both sigreturn rules), ``extended_size = xstate_size + 4``, magic2 at the new end;
* ``xcomp_bv`` and the reserved header bytes are zero.

The image is written in place when it fits the frame's block, else it is relocated: the caller places
it in new memory and the frame's ``fpstate`` pointer (frame + 232) is rewritten.
"""

from __future__ import annotations

from criu_xstate.frames import RT_SC_FPSTATE
from criu_xstate.plan import FrameAction, FrameDecision, HostFacts
from criu_xstate.records import record
from criu_xstate.x86.xfeatures import PKRU, bits, state_bytes
from criu_xstate.x86.xsave import (
    MIN_XSTATE_SIZE,
    SW_BYTES_OFFSET,
    XSAVE_ALIGN,
    XsaveImage,
    build_image,
)

LEGACY_COPY = SW_BYTES_OFFSET  # bytes 0..463: FXSAVE state and its reserved tail; sw bytes are rebuilt


class TranslateError(ValueError):
    """A decision that cannot be turned into bytes (a bug upstream, never bad input)."""


@record
class MemoryPatch:
    """Write ``new`` at ``vaddr`` in process ``pid``'s memory (the writer records what it replaces)."""

    pid: int
    vaddr: int
    new: bytes


@record
class Relocation:
    """A new XSAVE image that needs fresh memory; ``pointer_at`` is the frame's fpstate field."""

    pid: int
    tid: int
    frame: int
    pointer_at: int
    old_pointer: int
    image: bytes


def normalized_image(decision: FrameDecision, dest: HostFacts) -> bytes:
    """The destination-format XSAVE image (``xstate_size`` bytes + magic2) for one frame."""
    frame = decision.frame
    src = frame.image
    if frame.sw is None or decision.source_offsets is None:
        raise TranslateError(f"frame 0x{frame.address:x} has no XSAVE image to translate")
    target = decision.target_size
    if target < MIN_XSTATE_SIZE:
        raise TranslateError(f"target xstate_size {target} below {MIN_XSTATE_SIZE}")
    keep = decision.keep_mask
    bv = (frame.xstate_bv or 0) & keep
    if decision.pkru is not None and keep >> PKRU & 1:
        bv |= 1 << PKRU
    # At the destination's own size the frame says what a native one would (xfeatures = the host's
    # default features): bits beyond ``keep`` are absent from xstate_bv, so the kernel initializes
    # them, exactly as dropping them from xfeatures would, and the frame stays self-describing.
    xfeatures = dest.default_xfeatures if target == dest.user_size else keep
    return build_image(
        target,
        xfeatures,
        bv,
        legacy=src[:LEGACY_COPY],
        components=_components(decision, dest, bits(keep)),
    )


def _components(decision: FrameDecision, dest: HostFacts, kept: list[int]) -> list[tuple[int, bytes]]:
    """(destination offset, bytes) of each kept component in use, and PKRU where the plan sets it."""
    frame = decision.frame
    target = decision.target_size
    out: list[tuple[int, bytes]] = []
    for n in kept:
        if n < 2:
            continue
        if n not in dest.offsets:
            raise TranslateError(f"component {n} kept but the destination has no offset for it")
        d_off, d_size = dest.offsets[n]
        if d_off + d_size > target:
            raise TranslateError(f"component {n} at {d_off}+{d_size} does not fit {target} bytes")
        if n == PKRU and decision.pkru is not None:
            out.append((d_off, decision.pkru.to_bytes(4, "little")))
            continue
        if not (frame.xstate_bv or 0) >> n & 1:
            continue  # kept in xfeatures, init in the frame: zeros, bit stays clear
        assert decision.source_offsets is not None
        s_off, s_size = decision.source_offsets[n]
        if s_size != d_size:
            raise TranslateError(f"component {n} is {s_size} bytes in the frame, {d_size} on the destination")
        n_state = state_bytes(n, d_size)  # padding stays zero: never copy stack garbage
        out.append((d_off, XsaveImage(frame.image).component(s_off, n_state)))
    return out


def frame_patches(
    pid: int, decision: FrameDecision, dest: HostFacts
) -> tuple[list[MemoryPatch], Relocation | None]:
    """Memory patches for one frame: the image in place, or a relocation plus nothing in place.

    In place, the new image replaces the frame's block (old image, magic2 and the kernel's alignment
    padding, all of which belong to the frame); bytes past the new end are zeroed so no stale magic2
    remains where a kernel of the other sigreturn rule might look for one.
    """
    frame = decision.frame
    if decision.action not in (FrameAction.TRANSLATE, FrameAction.RELOCATE):
        return [], None
    if frame.xsave_address is None or frame.sw is None:
        raise TranslateError(f"frame 0x{frame.address:x} has no XSAVE image")
    image = normalized_image(decision, dest)
    old_len = frame.sw.frame_bytes
    if decision.action is FrameAction.RELOCATE:
        return [], Relocation(
            pid, frame.tid, frame.address, frame.address + RT_SC_FPSTATE, frame.xsave_address, image
        )
    if len(image) > decision.capacity:
        raise TranslateError(f"image of {len(image)} bytes exceeds the in-place capacity {decision.capacity}")
    # Zero the rest of the old block so no stale magic2 is left where the other sigreturn rule looks.
    new = image + bytes(max(0, old_len - len(image)))
    return [MemoryPatch(pid, frame.xsave_address, new)], None


def pointer_patch(reloc: Relocation, new_address: int) -> MemoryPatch:
    """Rewrite the frame's fpstate pointer to the relocated image."""
    if new_address % XSAVE_ALIGN:
        raise TranslateError(f"relocated image at 0x{new_address:x} is not 64-byte aligned")
    return MemoryPatch(reloc.pid, reloc.pointer_at, new_address.to_bytes(8, "little"))
