"""Which standard offsets built a frame: the source CPU's XSAVE layout, inferred from the frame.

A frame does not say which vendor's offsets it uses; its ``xfeatures`` and ``xstate_size`` are the
source kernel's, and the vendor table whose end for those features equals ``xstate_size`` is the one
(docs/plan-rules.md, "Source layout"). No match is SOURCE_LAYOUT_UNKNOWN, never a guess.
"""

from __future__ import annotations

from collections.abc import Mapping

from criu_xstate.x86.xfeatures import AMD_OFFSETS, APX, BNDREGS, INTEL_OFFSETS, LEGACY, XTILEDATA, bits
from criu_xstate.x86.xsave import LEGACY_AREA_SIZE, layout_end

_layout_end = layout_end  # unknown components make the end unknown (None)


def _restricted(table: Mapping[int, tuple[int, int]], mask: int) -> dict[int, tuple[int, int]]:
    return {n: table[n] for n in bits(mask) if n >= 2}


def infer_source_offsets(
    xfeatures: int, xstate_size: int, hint: Mapping[int, tuple[int, int]] | None = None
) -> dict[int, tuple[int, int]] | None:
    """The source CPU's standard offsets for a frame, when they can be known.

    A frame's ``xfeatures`` and ``xstate_size`` are the source kernel's; the vendor layout whose end for
    those features equals ``xstate_size`` is the one that built it. AMX frames end at XTILECFG when the
    task had no tile data (default user size). ``hint`` (a ``--src`` profile) wins when it fits.
    """
    mask = xfeatures & ~LEGACY
    if mask == 0 and xstate_size == LEGACY_AREA_SIZE:
        return {}  # an FXSAVE image (a CPU without XSAVE): the legacy area alone
    if mask >> APX & 1 and mask >> BNDREGS & 1:
        return None  # APX and MPX share 960: no real CPU enumerates both
    candidates: list[Mapping[int, tuple[int, int]]] = []
    if hint is not None:
        candidates.append(hint)
    candidates += [INTEL_OFFSETS, AMD_OFFSETS]
    no_tiles = mask & ~(1 << XTILEDATA)
    for table in candidates:
        if _layout_end(table, mask) == xstate_size:
            return _restricted(table, mask)
        # AMX task without tile-data permission: the frame ends before XTILEDATA
        if mask >> XTILEDATA & 1 and _layout_end(table, no_tiles) == xstate_size:
            return _restricted(table, no_tiles)
    # A frame sized larger than its features need (a rewritten one, or a handler's own): the layout is
    # known only if every table that fits agrees on where each component sits.
    fitting = [t for t in candidates if (end := _layout_end(t, mask)) is not None and end <= xstate_size]
    layouts = [_restricted(t, mask) for t in fitting]
    if layouts and all(lay == layouts[0] for lay in layouts):
        return layouts[0]
    return None
