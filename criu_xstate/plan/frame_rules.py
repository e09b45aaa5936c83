"""The rules for one live signal frame, as tables: one row per reason code (README, "Plan JSON and
reason codes"). Each check is the destination kernel's own behaviour (research/kernel.md §3, §6, §7;
docs/plan-rules.md):

* ``MIN_XSTATE_SIZE <= xstate_size <= dest user_size`` and magic2 at ``fpstate + xstate_size`` (or, on
  6.15 .. 7.1-rc5 kernels without the revert, at ``fpstate + dest user_size``), else silent FX-only restore;
* ``xstate_bv`` outside the destination XCR0, non-zero ``xcomp_bv``/reserved header bytes, or MXCSR
  bits outside the destination MXCSR_MASK: SIGSEGV;
* components sit at the *destination's* standard offsets, or they are read from the wrong place;
* a component the destination lacks can be dropped only when it is in its init state.

make.py runs the tables in this order: GATES, COMPONENT_RULES per component (PKRU aside), STATE_RULES,
COMPONENT_OFFSET_MOVED for the PKRU carried, SIGSEGV_RULES; then, unless refused, SIZE_RULES against
the target (target.py); IA32_RULES last, on the decision.
"""

from __future__ import annotations

from criu_xstate.frames import Abi
from criu_xstate.plan.facts import ComponentState, FrameFacts
from criu_xstate.plan.findings import FrameAction, FrameDecision, Hit, Rule, Severity
from criu_xstate.plan.target import Target
from criu_xstate.x86.xfeatures import INIT_PKRU, LEGACY, XTILEDATA
from criu_xstate.x86.xsave import XCOMP_BV_COMPACTED, XsaveImage, image_bytes

APPLY = "criu-xstate apply"

FrameRule = Rule[FrameFacts, None]
ComponentRule = Rule[FrameFacts, ComponentState]
SizeRule = Rule[FrameFacts, Target]
Ia32Rule = Rule[FrameFacts, FrameDecision]


def _image(f: FrameFacts) -> XsaveImage:
    return XsaveImage(f.frame.image)


# --- gates: after one of these nothing else about the frame can be judged -----------------------------


def _no_fpu_context(f: FrameFacts, _: None) -> Hit | None:
    if f.frame.sw is not None and f.frame.xsave_address is not None:
        return None
    return Hit(
        "frame has no FPU context (fpstate NULL): the kernel "
        "initializes the vector state, as it would on the source"
    )


def _compacted(f: FrameFacts, _: None) -> Hit | None:
    xcomp = f.frame.xcomp_bv or 0
    if not xcomp & XCOMP_BV_COMPACTED:
        return None
    return Hit(
        f"xcomp_bv 0x{xcomp:x}: compacted XSAVE format in a signal frame (a kernel never writes one)",
        source=hex(xcomp),
    )


def _layout_unknown(f: FrameFacts, _: None) -> Hit | None:
    sw = f.frame.sw
    if f.offsets is not None or sw is None:
        return None
    return Hit(
        f"no known XSAVE layout ends at {sw.xstate_size} bytes for xfeatures 0x{sw.xfeatures:x}",
        source=f"{hex(sw.xfeatures)}/{sw.xstate_size}",
    )


def _dest_without_xsave(f: FrameFacts, _: None) -> Hit | None:
    if f.dest.has_xsave:
        return None
    lost = [c.name for c in f.components if c.in_use]
    if not lost:
        return Hit(
            f"{f.dest.name} has no XSAVE: its kernel restores the frame's FXSAVE part only, which holds "
            "all of the frame's live state"
        )
    return Hit(
        f"{f.dest.name} has no XSAVE: its kernel restores the frame's FXSAVE part only; "
        f"{', '.join(lost)} would be lost",
        source="in use",
        dest="no xsave",
        severity=Severity.REFUSE,
    )


def _fxsave_frame(f: FrameFacts, _: None) -> Hit | None:
    """Every XSAVE kernel restores an FXSAVE image FX-only (check_xstate_in_sigframe(): xstate_size
    below 576), which is all it holds; only a destination with pkeys loses something (PKRU 0)."""
    if not f.frame.fxsave_only or f.dest_has_pkru:
        return None
    return Hit(
        f"FXSAVE image (the source has no XSAVE): {f.dest.name}'s kernel restores x87 and SSE from it, which "
        "is all it holds, and starts every other component in its init state"
    )


GATES: tuple[FrameRule, ...] = (
    Rule("FRAME_NO_FPU_CONTEXT", Severity.INFO, _no_fpu_context, stop=True),
    Rule("FRAME_COMPACTED_FORMAT", Severity.REFUSE, _compacted, "restore on the source host", stop=True),
    Rule(
        "SOURCE_LAYOUT_UNKNOWN",
        Severity.REFUSE,
        _layout_unknown,
        "pass the source host's profile with --src",
        stop=True,
    ),
    Rule("DEST_WITHOUT_XSAVE", Severity.INFO, _dest_without_xsave, "restore on a host with XSAVE", stop=True),
    Rule("FXSAVE_FRAME", Severity.INFO, _fxsave_frame, stop=True),
)


# --- per component of xstate_bv; a stop ends that component's judgement ------------------------------


def _amx_tiles_in_use(f: FrameFacts, c: ComponentState) -> Hit | None:
    if c.number != XTILEDATA or not c.in_use:
        return None
    return Hit(
        "AMX tile data is in use in the frame; CRIU restores "
        "no AMX permission (ARCH_REQ_XCOMP_PERM) and a restored task's user size excludes tile data"
    )


def _in_use_missing(f: FrameFacts, c: ComponentState) -> Hit | None:
    if f.on_dest(c.number) or not c.in_use:
        return None
    return Hit(
        f"{c.name} holds live data in the frame but {f.dest.name} does not enable it (XCR0 "
        f"0x{f.dest.xcr0:x}): it would be lost",
        source="in use",
        dest="absent",
        name=c.name,
    )


def _init_dropped(f: FrameFacts, c: ComponentState) -> Hit | None:
    if f.on_dest(c.number) or c.in_use:
        return None
    return Hit(
        f"{c.name} is in its init state; {f.dest.name} lacks it, so its bit must leave xstate_bv "
        "(else SIGSEGV at sigreturn)",
        source="init",
        dest="absent",
    )


def _offset_conflict(f: FrameFacts, c: ComponentState) -> Hit | None:
    if c.number not in f.dest.offset_conflicts:
        return None
    return Hit(
        f"{c.name}: the fleet's hosts disagree on its offset, so no single frame is valid on all of them"
    )


def _offset_moved(f: FrameFacts, c: ComponentState) -> Hit | None:
    dest = f.dest.offsets.get(c.number)
    if not c.in_use or dest is None or dest[0] == c.offset:
        return None
    return Hit(
        f"{c.name} sits at {c.offset} in the frame but at {dest[0]} on {f.dest.name}",
        source=c.offset,
        dest=dest[0],
    )


def _size_mismatch(f: FrameFacts, c: ComponentState) -> Hit | None:
    dest = f.dest.offsets.get(c.number)
    if not c.in_use or dest is None or dest[1] == c.size:
        return None
    return Hit(
        f"{c.name} is {c.size} bytes in the frame but {dest[1]} on {f.dest.name}", source=c.size, dest=dest[1]
    )


OFFSET_MOVED: ComponentRule = Rule("COMPONENT_OFFSET_MOVED", Severity.TRANSLATE, _offset_moved, APPLY)

COMPONENT_RULES: tuple[ComponentRule, ...] = (
    Rule(
        "AMX_TILE_DATA_IN_USE",
        Severity.REFUSE,
        _amx_tiles_in_use,
        "let the thread leave the handler before checkpointing, or restore on the source host",
        stop=True,
    ),
    Rule(
        "COMPONENT_IN_USE_MISSING_ON_DEST",
        Severity.REFUSE,
        _in_use_missing,
        "restore on a host with {name}",
        stop=True,
    ),
    Rule("COMPONENT_INIT_DROPPED", Severity.TRANSLATE, _init_dropped, APPLY, stop=True),
    Rule(
        "COMPONENT_OFFSET_CONFLICT",
        Severity.REFUSE,
        _offset_conflict,
        "plan against a single host",
        stop=True,
    ),
    OFFSET_MOVED,
    Rule(
        "COMPONENT_SIZE_MISMATCH",
        Severity.REFUSE,
        _size_mismatch,
        "restore on a host with the same component",
    ),
)


# --- xstate_bv as a whole and PKRU both ways (kernel.md §3.6) -----------------------------------------


def _stray_bits(f: FrameFacts, _: None) -> Hit | None:
    """Bits outside the destination XCR0 that are not components of the frame (e.g. supervisor)."""
    bv = f.frame.xstate_bv or 0
    stray = bv & ~f.dest.xcr0 & ~sum(1 << c.number for c in f.components)
    if not stray & ~LEGACY:
        return None
    return Hit(
        f"xstate_bv 0x{bv:x} has bits 0x{stray:x} outside {f.dest.name}'s XCR0 0x{f.dest.xcr0:x} "
        "with no data known",
        source=hex(bv),
        dest=hex(f.dest.xcr0),
    )


def _pkru_in_use_no_pkeys(f: FrameFacts, _: None) -> Hit | None:
    if f.pkru is None or f.dest_has_pkru or f.pkru in (0, INIT_PKRU):
        return None
    return Hit(
        f"the frame's PKRU 0x{f.pkru:08x} is not the default: the process uses protection keys, which "
        f"{f.dest.name} does not have",
        source=f"0x{f.pkru:08x}",
        dest="absent",
    )


def _pkru_dropped(f: FrameFacts, _: None) -> Hit | None:
    if f.pkru is None or f.dest_has_pkru or f.pkru not in (0, INIT_PKRU):
        return None
    return Hit(
        f"PKRU holds the default 0x{f.pkru:08x}; {f.dest.name} has no protection keys, so the component is "
        "dropped",
        source=f"0x{f.pkru:08x}",
        dest="absent",
    )


def _pkru_missing(f: FrameFacts, _: None) -> Hit | None:
    if f.pkru is not None or not f.dest_has_pkru:
        return None
    return Hit(
        f"the frame carries no PKRU; on {f.dest.name} sigreturn would set PKRU to 0 and open every "
        "protection key",
        source="absent",
        dest="pkeys",
    )


STATE_RULES: tuple[FrameRule, ...] = (
    Rule("XSTATE_BV_OUTSIDE_DEST_XCR0", Severity.TRANSLATE, _stray_bits, APPLY),
    Rule(
        "PKRU_IN_USE_DEST_NO_PKEYS",
        Severity.REFUSE,
        _pkru_in_use_no_pkeys,
        "restore on a host with protection keys (pku/ospke)",
    ),
    Rule("PKRU_DROPPED_DEFAULT", Severity.TRANSLATE, _pkru_dropped, APPLY),
    Rule(
        "PKRU_MISSING_OPENS_KEYS",
        Severity.TRANSLATE,
        _pkru_missing,
        f"{APPLY} (carries the Linux default 0x{INIT_PKRU:08x})",
    ),
)


# --- what XRSTOR faults on (SIGSEGV at sigreturn) -----------------------------------------------------


def _header_reserved(f: FrameFacts, _: None) -> Hit | None:
    if not (f.frame.xcomp_bv or 0) and not any(_image(f).header_reserved_checked):
        return None
    return Hit("xcomp_bv or reserved header bytes 16..23 are not zero: XRSTOR faults (SIGSEGV)")


def _mxcsr_bits(f: FrameFacts, _: None) -> Hit | None:
    mxcsr = f.frame.mxcsr or 0
    mask = f.dest.mxcsr_mask
    if not mxcsr & ~mask:
        return None
    return Hit(
        f"MXCSR 0x{mxcsr:x} sets bits 0x{mxcsr & ~mask:x} outside {f.dest.name}'s MXCSR_MASK 0x{mask:x}: "
        "sigreturn would SIGSEGV, and clearing them changes floating-point behaviour",
        source=hex(mxcsr),
        dest=hex(mask),
    )


SIGSEGV_RULES: tuple[FrameRule, ...] = (
    Rule("XSAVE_HEADER_RESERVED_NONZERO", Severity.TRANSLATE, _header_reserved, APPLY),
    Rule(
        "MXCSR_UNSUPPORTED_BITS",
        Severity.REFUSE,
        _mxcsr_bits,
        "restore on a host whose MXCSR_MASK has these bits",
    ),
)


# --- sizes: the destination's limit, its magic2 rule, and room in place -------------------------------


def _xstate_size(f: FrameFacts) -> int:
    assert f.frame.sw is not None
    return f.frame.sw.xstate_size


def _size_exceeds(f: FrameFacts, _: Target) -> Hit | None:
    size, limit = _xstate_size(f), f.dest.user_size
    if size <= limit:
        return None
    return Hit(
        f"xstate_size {size} > {f.dest.name}'s user size {limit}: sigreturn would silently restore "
        "x87/SSE only",
        source=size,
        dest=limit,
    )


def _magic2_at_user_size(f: FrameFacts, _: Target) -> Hit | None:
    size, limit = _xstate_size(f), f.dest.user_size
    if f.dest.sigreturn != "user-size" or size == limit or f.frame.fxsave_only:  # no magic2 is looked for
        return None
    return Hit(
        f"{f.dest.name}'s kernel looks for magic2 at fpstate + {limit} (6.15 .. 7.1-rc5 rule) but the "
        f"frame has it at +{size}",
        source=size,
        dest=limit,
    )


def _relocation_refused(f: FrameFacts, t: Target) -> Hit | None:
    if not t.relocate or f.allow_relocation:
        return None
    return Hit(
        f"the destination image needs {image_bytes(t.size)} bytes but the frame has {t.capacity} in place, "
        "and relocation is off",
        source=t.capacity,
        dest=image_bytes(t.size),
    )


def _relocated(f: FrameFacts, t: Target) -> Hit | None:
    if not t.relocate or not f.allow_relocation:
        return None
    return Hit(
        f"the destination image needs {image_bytes(t.size)} bytes but the frame has {t.capacity} in place: "
        "it moves to new memory and the fpstate pointer is rewritten",
        source=t.capacity,
        dest=image_bytes(t.size),
    )


SIZE_RULES: tuple[SizeRule, ...] = (
    Rule("XSTATE_SIZE_EXCEEDS_DEST", Severity.TRANSLATE, _size_exceeds, APPLY),
    Rule("MAGIC2_AT_DEST_USER_SIZE", Severity.TRANSLATE, _magic2_at_user_size, APPLY),
    Rule("RELOCATION_REQUIRED", Severity.REFUSE, _relocation_refused, "allow relocation", stop=True),
    Rule("XSAVE_IMAGE_RELOCATED", Severity.TRANSLATE, _relocated, APPLY),
)


# --- compat (ia32) frames: judged by the same rules, kept only when nothing would change --------------


def _ia32_needs_change(f: FrameFacts, d: FrameDecision) -> Hit | None:
    """ia32 frames carry the same XSAVE image after a 112-byte FSAVE header; their FSAVE header and the
    stricter compat sigreturn path (kernel.md §3.1) are not translated."""
    if f.frame.abi is Abi.X86_64:
        return None
    if d.action is FrameAction.KEEP and not any(_image(f).header_reserved):
        return None
    needs = ", ".join(sorted({x.code for x in d.findings if x.severity >= Severity.TRANSLATE}))
    why = needs or "non-zero reserved XSAVE header bytes (the compat path rejects them)"
    return Hit(
        f"{f.frame.abi.value} signal frame of a compat (32-bit) task would need: {why}; its FSAVE header "
        "and the stricter compat sigreturn path are not translated"
    )


IA32_RULES: tuple[Ia32Rule, ...] = (
    Rule(
        "IA32_FRAME_UNSUPPORTED",
        Severity.REFUSE,
        _ia32_needs_change,
        "restore on a host with the same XSAVE features, layout and size",
    ),
)
