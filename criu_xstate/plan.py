"""Rules -> findings -> verdict. Pure: no I/O.

For every live frame and every thread of a checkpoint, decide against one destination host whether the
restore is safe as is (``keep``), safe after ``apply`` (``translate`` / ``relocate``), or unsafe
(``refuse``), with a stable reason code, the values on both sides and a remedy.

The rules are the destination kernel's (research/kernel.md §3, §6, §7):

* ``576 <= xstate_size <= dest user_size`` and magic2 at ``fpstate + xstate_size`` (or, on 6.15 ..
  7.1-rc5 kernels without the revert, at ``fpstate + dest user_size``), else silent FX-only restore;
* ``xstate_bv`` outside the destination XCR0, non-zero ``xcomp_bv``/reserved header bytes 8..23, or
  MXCSR bits outside the destination MXCSR_MASK: SIGSEGV;
* components sit at the *destination's* standard offsets, or they are read from the wrong place;
* a component the destination lacks can be dropped only when it is in its init state.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum, StrEnum

from criu_xstate.frames import Abi, SignalFrame
from criu_xstate.x86.sigframe import XSAVE_HEADER_OFFSET
from criu_xstate.x86.xfeatures import (
    AMD_OFFSETS,
    APX,
    BNDREGS,
    INIT_PKRU,
    INTEL_OFFSETS,
    LEGACY,
    PKRU,
    XTILEDATA,
    bits,
    component_name,
    state_bytes,
)

SCHEMA = "criu-xstate/plan/v1"

XCOMP_BV_COMPACTED = 1 << 63


class Severity(IntEnum):
    INFO = 0
    WARNING = 1
    TRANSLATE = 2
    REFUSE = 3


class Verdict(StrEnum):
    COMPATIBLE = "compatible"
    TRANSLATE = "translate"
    REFUSE = "refuse"


class FrameAction(StrEnum):
    KEEP = "keep"
    TRANSLATE = "translate"
    RELOCATE = "relocate"
    REFUSE = "refuse"


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    subject: str
    detail: str
    remedy: str = ""
    source: str | None = None
    dest: str | None = None

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {
            "code": self.code,
            "severity": self.severity.name.lower(),
            "subject": self.subject,
            "detail": self.detail,
        }
        if self.remedy:
            out["remedy"] = self.remedy
        if self.source is not None:
            out["source"] = self.source
        if self.dest is not None:
            out["dest"] = self.dest
        return out


@dataclass(frozen=True)
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
    def default_xfeatures(self) -> int:
        """The ``xfeatures`` a kernel-built frame of a new task on this host carries."""
        return self.xcr0 & ~self.dynamic

    def size_for(self, mask: int) -> int:
        """End of the highest-placed component of ``mask`` (at least the 576-byte legacy+header)."""
        end = 576
        for n in bits(mask):
            if n >= 2 and n in self.offsets:
                off, size = self.offsets[n]
                end = max(end, off + size)
        return end


@dataclass(frozen=True)
class SourceFacts:
    """What is known of the source host: from a ``--src`` profile, a cpuinfo.img, or only from frames."""

    name: str = "source"
    offsets: Mapping[int, tuple[int, int]] | None = None
    flags: frozenset[str] | None = None


@dataclass(frozen=True)
class ComponentState:
    number: int
    offset: int
    size: int
    in_use: bool  # bit set in xstate_bv and bytes not in the init state

    @property
    def name(self) -> str:
        return component_name(self.number)


@dataclass(frozen=True)
class FrameDecision:
    """The plan for one live frame; translate.py turns it into bytes."""

    frame: SignalFrame
    action: FrameAction
    findings: tuple[Finding, ...]
    source_offsets: Mapping[int, tuple[int, int]] | None = None
    keep_mask: int = 0  # components kept in xstate_bv and xfeatures
    target_size: int = 0  # xstate_size of the rewritten image
    capacity: int = 0  # bytes available in place at fpstate (image + magic2 + padding)
    pkru: int | None = None  # PKRU value to carry when the destination has protection keys

    def to_json(self) -> dict[str, object]:
        f = self.frame
        out: dict[str, object] = {
            "frame": hex(f.address),
            "fpstate": hex(f.fpstate) if f.fpstate is not None else None,
            "stack": f.stack.value,
            "live": f.live,
            "depth": f.depth,
            "abi": f.abi.value,
            "signo": f.signo,
            "xfeatures": hex(f.sw.xfeatures) if f.sw else None,
            "xstate_size": f.sw.xstate_size if f.sw else None,
            "xstate_bv": hex(f.xstate_bv) if f.xstate_bv is not None else None,
            "action": self.action.value,
            "reasons": [x.to_json() for x in self.findings],
        }
        if self.action in (FrameAction.TRANSLATE, FrameAction.RELOCATE):
            out["target"] = {"xfeatures": hex(self.keep_mask), "xstate_size": self.target_size}
        return out


@dataclass(frozen=True)
class ThreadState:
    """A thread's current FPU state as core-<tid>.img holds it (layout-free)."""

    pid: int
    tid: int
    compat: bool
    xstate_bv: int | None  # None: no xsave in the image
    in_use: frozenset[int] = frozenset()  # components whose saved data is not all zero
    pkru: int | None = None
    unreadable: tuple[str, ...] = ()  # stacks whose pages the checkpoint does not hold (lazy pages)


@dataclass(frozen=True)
class ThreadPlan:
    state: ThreadState
    frames: tuple[FrameDecision, ...]
    findings: tuple[Finding, ...]

    @property
    def action(self) -> str:
        if any(f.severity is Severity.REFUSE for f in self.findings) or any(
            d.action is FrameAction.REFUSE for d in self.frames
        ):
            return "refuse"
        if any(d.action is not FrameAction.KEEP for d in self.frames) or any(
            f.severity is Severity.TRANSLATE for f in self.findings
        ):
            return "translate"
        return "keep"

    def to_json(self) -> dict[str, object]:
        return {
            "pid": self.state.pid,
            "tid": self.state.tid,
            "compat": self.state.compat,
            "xstate_bv": hex(self.state.xstate_bv) if self.state.xstate_bv is not None else None,
            "action": self.action,
            "frames": [d.to_json() for d in self.frames],
            "reasons": [f.to_json() for f in self.findings],
        }


@dataclass(frozen=True)
class Plan:
    dest: HostFacts
    threads: tuple[ThreadPlan, ...]
    findings: tuple[Finding, ...] = field(default=())

    def all_findings(self) -> list[Finding]:
        out = list(self.findings)
        for t in self.threads:
            out.extend(t.findings)
            for d in t.frames:
                out.extend(d.findings)
        return out

    @property
    def verdict(self) -> Verdict:
        worst = max((f.severity for f in self.all_findings()), default=Severity.INFO)
        if worst is Severity.REFUSE:
            return Verdict.REFUSE
        if worst is Severity.TRANSLATE:
            return Verdict.TRANSLATE
        return Verdict.COMPATIBLE

    def to_json(self) -> dict[str, object]:
        return {
            "schema": SCHEMA,
            "verdict": self.verdict.value,
            "dest": {
                "name": self.dest.name,
                "xcr0": hex(self.dest.xcr0),
                "user_size": self.dest.user_size,
                "sigreturn": self.dest.sigreturn,
                "sigreturn_guess": self.dest.sigreturn_guess,
            },
            "threads": [t.to_json() for t in self.threads],
            "reasons": [f.to_json() for f in self.findings],
        }


# --- source layouts ---------------------------------------------------------------------------------


def _layout_end(offsets: Mapping[int, tuple[int, int]], mask: int) -> int | None:
    end = 576
    for n in bits(mask):
        if n < 2:
            continue
        if n not in offsets:
            return None
        off, size = offsets[n]
        end = max(end, off + size)
    return end


def infer_source_offsets(
    xfeatures: int, xstate_size: int, hint: Mapping[int, tuple[int, int]] | None = None
) -> dict[int, tuple[int, int]] | None:
    """The source CPU's standard offsets for a frame, when they can be known.

    A frame's ``xfeatures`` and ``xstate_size`` are the source kernel's; the vendor layout whose end for
    those features equals ``xstate_size`` is the one that built it. AMX frames end at XTILECFG when the
    task had no tile data (default user size). ``hint`` (a ``--src`` profile) wins when it fits.
    """
    mask = xfeatures & ~LEGACY
    if mask >> APX & 1 and mask >> BNDREGS & 1:
        return None  # APX and MPX share 960: no real CPU enumerates both
    candidates: list[Mapping[int, tuple[int, int]]] = []
    if hint is not None:
        candidates.append(hint)
    candidates += [INTEL_OFFSETS, AMD_OFFSETS]
    for table in candidates:
        if _layout_end(table, mask) == xstate_size:
            return {n: table[n] for n in bits(mask) if n >= 2}
        # AMX task without tile-data permission: the frame ends before XTILEDATA
        if mask >> XTILEDATA & 1 and _layout_end(table, mask & ~(1 << XTILEDATA)) == xstate_size:
            return {n: table[n] for n in bits(mask & ~(1 << XTILEDATA)) if n >= 2}
    # A frame sized larger than its features need (a rewritten one, or a handler's own): the layout is
    # known only if every table that fits agrees on where each component sits.
    fitting = [t for t in candidates if (end := _layout_end(t, mask)) is not None and end <= xstate_size]
    layouts = [{n: t[n] for n in bits(mask) if n >= 2} for t in fitting]
    if layouts and all(lay == layouts[0] for lay in layouts):
        return layouts[0]
    return None


# --- component state in a frame -------------------------------------------------------------------


def frame_components(frame: SignalFrame, offsets: Mapping[int, tuple[int, int]]) -> dict[int, ComponentState]:
    """Per component of the frame's xstate_bv (>= 2): where it is and whether it holds non-init data."""
    bv = frame.xstate_bv or 0
    out: dict[int, ComponentState] = {}
    for n in bits(bv):
        if n < 2 or n not in offsets:
            continue
        off, size = offsets[n]
        data = frame.image[off : off + state_bytes(n, size)]
        out[n] = ComponentState(n, off, size, in_use=any(data))
    return out


def frame_pkru(frame: SignalFrame, offsets: Mapping[int, tuple[int, int]]) -> int | None:
    if not (frame.xstate_bv or 0) >> PKRU & 1 or PKRU not in offsets:
        return None
    off = offsets[PKRU][0]
    return int(struct.unpack_from("<I", frame.image, off)[0])


def _in_place_capacity(frame: SignalFrame) -> int:
    """Bytes at fpstate that belong to the frame: the image, magic2 and the kernel's alignment padding.

    Above that lies the interrupted context's red zone (same stack) or the altstack top; the padding
    the kernel left is between the end of the image and that limit, at most 63 bytes.
    """
    assert frame.sw is not None and frame.xsave_address is not None
    used = frame.sw.xstate_size + 4
    limit = frame.interrupted_sp - 128
    pad = limit - (frame.xsave_address + used)
    if 0 <= pad < 64:
        return used + pad
    return used


# --- the rules ----------------------------------------------------------------------------------------


def plan_frame(
    frame: SignalFrame,
    dest: HostFacts,
    source: SourceFacts | None = None,
    *,
    allow_relocation: bool = True,
) -> FrameDecision:
    """Decide what one live frame needs on ``dest``.

    ia32 frames carry the same XSAVE image (after a 112-byte FSAVE header) and are judged by the same
    rules; one that would need any change is refused, because their FSAVE header and the stricter
    compat sigreturn path (kernel.md §3.1) are not translated. As they are, they are kept.
    """
    decision = _plan_xsave_frame(frame, dest, source, allow_relocation=allow_relocation)
    if frame.abi is Abi.X86_64:
        return decision
    header = frame.image[XSAVE_HEADER_OFFSET + 16 : XSAVE_HEADER_OFFSET + 64]
    if decision.action is FrameAction.KEEP and not any(header):
        return decision
    needs = ", ".join(sorted({f.code for f in decision.findings if f.severity >= Severity.TRANSLATE}))
    why = needs or "non-zero reserved XSAVE header bytes (the compat path rejects them)"
    refusal = Finding(
        "IA32_FRAME_UNSUPPORTED",
        Severity.REFUSE,
        f"tid {frame.tid} frame 0x{frame.address:x}",
        f"{frame.abi.value} signal frame of a compat (32-bit) task would need: {why}; its FSAVE header "
        "and the stricter compat sigreturn path are not translated",
        "restore on a host with the same XSAVE features, layout and size",
    )
    return FrameDecision(frame, FrameAction.REFUSE, (refusal, *decision.findings))


def _plan_xsave_frame(
    frame: SignalFrame,
    dest: HostFacts,
    source: SourceFacts | None = None,
    *,
    allow_relocation: bool = True,
) -> FrameDecision:
    subject = f"tid {frame.tid} frame 0x{frame.address:x}"
    findings: list[Finding] = []

    def add(
        code: str, sev: Severity, detail: str, remedy: str = "", src: object = None, dst: object = None
    ) -> None:
        findings.append(
            Finding(
                code,
                sev,
                subject,
                detail,
                remedy,
                None if src is None else str(src),
                None if dst is None else str(dst),
            )
        )

    def refuse() -> FrameDecision:
        return FrameDecision(frame, FrameAction.REFUSE, tuple(findings))

    if frame.sw is None or frame.xsave_address is None:
        add(
            "FRAME_NO_FPU_CONTEXT",
            Severity.INFO,
            "frame has no FPU context (fpstate NULL): the kernel "
            "initializes the vector state, as it would on the source",
        )
        return FrameDecision(frame, FrameAction.KEEP, tuple(findings))

    sw = frame.sw
    bv = frame.xstate_bv or 0
    xcomp = frame.xcomp_bv or 0
    if xcomp & XCOMP_BV_COMPACTED:
        add(
            "FRAME_COMPACTED_FORMAT",
            Severity.REFUSE,
            f"xcomp_bv 0x{xcomp:x}: compacted XSAVE format in a signal frame (a kernel never writes one)",
            "restore on the source host",
            src=hex(xcomp),
        )
        return refuse()
    offsets = infer_source_offsets(sw.xfeatures, sw.xstate_size, source.offsets if source else None)
    if offsets is None:
        add(
            "SOURCE_LAYOUT_UNKNOWN",
            Severity.REFUSE,
            f"no known XSAVE layout ends at {sw.xstate_size} bytes for xfeatures 0x{sw.xfeatures:x}",
            "pass the source host's profile with --src",
            src=f"{hex(sw.xfeatures)}/{sw.xstate_size}",
        )
        return refuse()
    comps = frame_components(frame, offsets)
    keep = LEGACY
    refused = False
    pkru = frame_pkru(frame, offsets)
    dest_has_pkru = bool(dest.xcr0 >> PKRU & 1)

    for n, c in sorted(comps.items()):
        on_dest = bool(dest.xcr0 >> n & 1)
        if n == XTILEDATA and c.in_use:
            add(
                "AMX_TILE_DATA_IN_USE",
                Severity.REFUSE,
                "AMX tile data is in use in the frame; CRIU restores "
                "no AMX permission (ARCH_REQ_XCOMP_PERM) and a restored task's user size excludes tile data",
                "let the thread leave the handler before checkpointing, or restore on the source host",
            )
            refused = True
            continue
        if n == PKRU:
            continue  # handled below
        if not on_dest:
            if c.in_use:
                add(
                    "COMPONENT_IN_USE_MISSING_ON_DEST",
                    Severity.REFUSE,
                    f"{c.name} holds live data in the frame but {dest.name} does not enable it (XCR0 "
                    f"0x{dest.xcr0:x}): it would be lost",
                    f"restore on a host with {c.name}",
                    src="in use",
                    dst="absent",
                )
                refused = True
            else:
                add(
                    "COMPONENT_INIT_DROPPED",
                    Severity.TRANSLATE,
                    f"{c.name} is in its init state; {dest.name} lacks it, so its bit must leave xstate_bv "
                    "(else SIGSEGV at sigreturn)",
                    "criu-xstate apply",
                    src="init",
                    dst="absent",
                )
            continue
        if n in dest.offset_conflicts:
            add(
                "COMPONENT_OFFSET_CONFLICT",
                Severity.REFUSE,
                f"{c.name}: the fleet's hosts disagree on its "
                "offset, so no single frame is valid on all of them",
                "plan against a single host",
            )
            refused = True
            continue
        if not c.in_use:
            continue  # init state on a host that has it: a rewrite drops it losslessly, else it stays
        keep |= 1 << n
        dest_off = dest.offsets.get(n)
        if dest_off is not None and dest_off[0] != c.offset:
            add(
                "COMPONENT_OFFSET_MOVED",
                Severity.TRANSLATE,
                f"{c.name} sits at {c.offset} in the frame but at {dest_off[0]} on {dest.name}",
                "criu-xstate apply",
                src=c.offset,
                dst=dest_off[0],
            )
        if dest_off is not None and dest_off[1] != c.size:
            add(
                "COMPONENT_SIZE_MISMATCH",
                Severity.REFUSE,
                f"{c.name} is {c.size} bytes in the frame but {dest_off[1]} on {dest.name}",
                "restore on a host with the same component",
                src=c.size,
                dst=dest_off[1],
            )
            refused = True

    # Bits outside the destination XCR0 that are not separate components of the frame (e.g. supervisor).
    stray = bv & ~dest.xcr0 & ~sum(1 << n for n in comps)
    if stray & ~LEGACY:
        add(
            "XSTATE_BV_OUTSIDE_DEST_XCR0",
            Severity.TRANSLATE,
            f"xstate_bv 0x{bv:x} has bits 0x{stray:x} "
            f"outside {dest.name}'s XCR0 0x{dest.xcr0:x} with no data known",
            "criu-xstate apply",
            src=hex(bv),
            dst=hex(dest.xcr0),
        )

    # PKRU both ways (kernel.md §3.6).
    if pkru is not None and not dest_has_pkru:
        if pkru not in (0, INIT_PKRU):
            add(
                "PKRU_IN_USE_DEST_NO_PKEYS",
                Severity.REFUSE,
                f"the frame's PKRU 0x{pkru:08x} is not the "
                f"default: the process uses protection keys, which {dest.name} does not have",
                "restore on a host with protection keys (pku/ospke)",
                src=f"0x{pkru:08x}",
                dst="absent",
            )
            refused = True
        else:
            add(
                "PKRU_DROPPED_DEFAULT",
                Severity.TRANSLATE,
                f"PKRU holds the default 0x{pkru:08x}; {dest.name} "
                "has no protection keys, so the component is dropped",
                "criu-xstate apply",
                src=f"0x{pkru:08x}",
                dst="absent",
            )
    carry_pkru: int | None = None
    if dest_has_pkru:
        if pkru is None:
            carry_pkru = INIT_PKRU
            add(
                "PKRU_MISSING_OPENS_KEYS",
                Severity.TRANSLATE,
                f"the frame carries no PKRU; on {dest.name} "
                "sigreturn would set PKRU to 0 and open every protection key",
                f"criu-xstate apply (carries the Linux default 0x{INIT_PKRU:08x})",
                src="absent",
                dst="pkeys",
            )
        else:
            carry_pkru = pkru
        keep |= 1 << PKRU
        pk_off = offsets.get(PKRU)
        if pkru is not None and pk_off is not None and dest.offsets.get(PKRU, pk_off)[0] != pk_off[0]:
            add(
                "COMPONENT_OFFSET_MOVED",
                Severity.TRANSLATE,
                f"PKRU sits at {pk_off[0]} in the frame but at {dest.offsets[PKRU][0]} on {dest.name}",
                "criu-xstate apply",
                src=pk_off[0],
                dst=dest.offsets[PKRU][0],
            )

    # Header and MXCSR (SIGSEGV rules).
    header = frame.image[XSAVE_HEADER_OFFSET : XSAVE_HEADER_OFFSET + 64]
    if xcomp or any(header[16:24]):
        add(
            "XSAVE_HEADER_RESERVED_NONZERO",
            Severity.TRANSLATE,
            "xcomp_bv or reserved header bytes 16..23 are not zero: XRSTOR faults (SIGSEGV)",
            "criu-xstate apply",
        )
    mxcsr = frame.mxcsr or 0
    if mxcsr & ~dest.mxcsr_mask:
        add(
            "MXCSR_UNSUPPORTED_BITS",
            Severity.REFUSE,
            f"MXCSR 0x{mxcsr:x} sets bits 0x{mxcsr & ~dest.mxcsr_mask:x}"
            f" outside {dest.name}'s MXCSR_MASK 0x{dest.mxcsr_mask:x}: sigreturn would SIGSEGV, and clearing "
            "them changes floating-point behaviour",
            "restore on a host whose MXCSR_MASK has these bits",
            src=hex(mxcsr),
            dst=hex(dest.mxcsr_mask),
        )
        refused = True

    if refused:
        return refuse()

    # Sizes: the destination's limit and magic2 rule.
    capacity = _in_place_capacity(frame)
    needed = dest.size_for(keep)
    target = dest.user_size if dest.user_size + 4 <= capacity else needed
    if sw.xstate_size > dest.user_size:
        add(
            "XSTATE_SIZE_EXCEEDS_DEST",
            Severity.TRANSLATE,
            f"xstate_size {sw.xstate_size} > {dest.name}'s user "
            f"size {dest.user_size}: sigreturn would silently restore x87/SSE only",
            "criu-xstate apply",
            src=sw.xstate_size,
            dst=dest.user_size,
        )
    if dest.sigreturn == "user-size" and sw.xstate_size != dest.user_size:
        add(
            "MAGIC2_AT_DEST_USER_SIZE",
            Severity.TRANSLATE,
            f"{dest.name}'s kernel looks for magic2 at fpstate + "
            f"{dest.user_size} (6.15 .. 7.1-rc5 rule) but the frame has it at +{sw.xstate_size}",
            "criu-xstate apply",
            src=sw.xstate_size,
            dst=dest.user_size,
        )
        target = dest.user_size
    relocate = target + 4 > capacity
    if relocate:
        if not allow_relocation:
            add(
                "RELOCATION_REQUIRED",
                Severity.REFUSE,
                f"the destination image needs {target + 4} bytes but the "
                f"frame has {capacity} in place, and relocation is off",
                "allow relocation",
                src=capacity,
                dst=target + 4,
            )
            return refuse()
        add(
            "XSAVE_IMAGE_RELOCATED",
            Severity.TRANSLATE,
            f"the destination image needs {target + 4} bytes but "
            f"the frame has {capacity} in place: it moves to new memory and the fpstate pointer is rewritten",
            "criu-xstate apply",
            src=capacity,
            dst=target + 4,
        )

    needs_change = any(f.severity >= Severity.TRANSLATE for f in findings)
    if not needs_change:
        return FrameDecision(
            frame, FrameAction.KEEP, tuple(findings), offsets, sw.xfeatures, sw.xstate_size, capacity, pkru
        )
    action = FrameAction.RELOCATE if relocate else FrameAction.TRANSLATE
    return FrameDecision(frame, action, tuple(findings), offsets, keep, target, capacity, carry_pkru)


def plan_thread_state(state: ThreadState, dest: HostFacts) -> list[Finding]:
    """Rules for the thread's current FPU state (core-<tid>.img), which CRIU itself re-lays out."""
    subject = f"tid {state.tid} registers"
    out: list[Finding] = []
    if state.compat:
        out.append(
            Finding(
                "COMPAT_THREAD",
                Severity.WARNING,
                subject,
                "32-bit (compat) thread: its signal frames are not translated",
            )
        )
    for why in state.unreadable:
        out.append(
            Finding(
                "STACK_UNREADABLE",
                Severity.REFUSE,
                subject,
                f"the thread's stack cannot be read from the checkpoint ({why}): an in-flight signal frame "
                "there could be neither checked nor translated",
                "dump without --lazy-pages (or with the pages transferred) and plan again",
            )
        )
    if state.xstate_bv is None:
        return out
    for n in bits(state.xstate_bv & ~LEGACY):
        if dest.xcr0 >> n & 1:
            continue
        if n == PKRU:
            if state.pkru not in (None, 0, INIT_PKRU):
                out.append(
                    Finding(
                        "THREAD_PKRU_IN_USE_DEST_NO_PKEYS",
                        Severity.REFUSE,
                        subject,
                        f"PKRU 0x{state.pkru:08x} is not the default: the process uses protection "
                        f"keys, which {dest.name} does not have",
                        "restore on a host with pkeys",
                    )
                )
            continue
        if n in state.in_use:
            out.append(
                Finding(
                    "THREAD_COMPONENT_IN_USE_MISSING_ON_DEST",
                    Severity.REFUSE,
                    subject,
                    f"{component_name(n)} holds live data but {dest.name} lacks it: CRIU would drop "
                    "it silently",
                    f"restore on a host with {component_name(n)}",
                    "in use",
                    "absent",
                )
            )
        else:
            out.append(
                Finding(
                    "THREAD_COMPONENT_INIT_ABSENT_ON_DEST",
                    Severity.INFO,
                    subject,
                    f"{component_name(n)} is in its init state; CRIU leaves it out on {dest.name}",
                )
            )
    return out


def isa_findings(
    source_flags: Iterable[str] | None, dest: HostFacts, *, strict: bool, source_name: str = "the source"
) -> list[Finding]:
    if source_flags is None or not dest.flags:
        return []
    missing = sorted(set(source_flags) - dest.flags)
    if not missing:
        return []
    sev = Severity.REFUSE if strict else Severity.WARNING
    shown = ", ".join(missing[:12]) + (f" and {len(missing) - 12} more" if len(missing) > 12 else "")
    return [
        Finding(
            "ISA_FLAGS_MISSING",
            sev,
            "checkpoint",
            f"{dest.name} lacks CPU flags the source had (per {source_name}): "
            f"{shown}; code that chose them at start-up would get SIGILL",
            "restore on a host with these flags, or re-run without --strict-isa to accept the risk",
            dest=",".join(missing),
        )
    ]


def make_plan(
    threads: Sequence[tuple[ThreadState, Sequence[SignalFrame]]],
    dest: HostFacts,
    source: SourceFacts | None = None,
    *,
    allow_relocation: bool = True,
    strict_isa: bool = False,
    extra: Sequence[Finding] = (),
) -> Plan:
    plans: list[ThreadPlan] = []
    for state, frames in threads:
        decisions = tuple(
            plan_frame(f, dest, source, allow_relocation=allow_relocation) for f in frames if f.live
        )
        plans.append(ThreadPlan(state, decisions, tuple(plan_thread_state(state, dest))))
    general = list(extra)
    general += isa_findings(
        source.flags if source else None, dest, strict=strict_isa, source_name=source.name if source else ""
    )
    return Plan(dest, tuple(plans), tuple(general))
