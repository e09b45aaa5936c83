"""Every plan rule on built frames (no files): sizes, magic2 rules, offsets, PKRU, AMX, APX, MXCSR."""

from __future__ import annotations

import struct

import pytest

from criu_xstate.frames import Sigaction, SignalFrame, ThreadStacks, find_frames
from criu_xstate.model import ThreadState, ThreadXsave
from criu_xstate.plan import (
    FrameAction,
    HostFacts,
    SourceFacts,
    Verdict,
    infer_source_offsets,
    make_plan,
    plan_frame,
    plan_thread_state,
)
from criu_xstate.x86.sigframe import SA_RESTORER, SA_SIGINFO
from criu_xstate.x86.xfeatures import AMD_OFFSETS, INIT_PKRU, INTEL_OFFSETS
from tests.framebuild import RESTORER, FakeMemory, place_frame

STACK_LO = 0x7FFF_0000_0000
STACK_HI = STACK_LO + 0x20000
SAS = [Sigaction(10, 0x401100, SA_SIGINFO | SA_RESTORER, RESTORER)]


def host(
    name: str,
    xcr0: int,
    table: dict[int, tuple[int, int]],
    *,
    mask: int = 0xFFFF_FFFF,
    sigreturn: str = "frame-size",
    user_size: int | None = None,
    mxcsr_mask: int = 0xFFFF,
) -> HostFacts:
    offsets = {n: table[n] for n in table if xcr0 >> n & 1}
    end = max([576] + [o + s for n, (o, s) in offsets.items() if n != 18])
    return HostFacts(name, xcr0, user_size or end, mxcsr_mask, offsets, sigreturn)


ZEN3 = host("zen3", 0x207, AMD_OFFSETS, mxcsr_mask=0x2FFFF)  # 2440
ZEN4 = host("zen4", 0x2E7, AMD_OFFSETS, mxcsr_mask=0x2FFFF)  # 2440
ZEN4_NOPKU = host("zen4-nopku", 0xE7, AMD_OFFSETS, mxcsr_mask=0x2FFFF)  # 2432
SMALL = host("avx2-only", 0x7, AMD_OFFSETS, mxcsr_mask=0x2FFFF)  # 832
ICX = host("icelake", 0x2E7, INTEL_OFFSETS)  # 2696
SKX = host("skylake", 0x2FF, INTEL_OFFSETS)  # 2696 (MPX)
SPR = host("sapphire", 0x602E7, INTEL_OFFSETS)  # default user size 2816 (tile data excluded)
TCG_MAX_618_BUGGY = host("tcg-max-6.16", 0x21F, INTEL_OFFSETS, sigreturn="user-size")


def built_frame(
    xfeatures: int,
    xstate_size: int,
    xstate_bv: int,
    data: dict[int, bytes] | None = None,
    *,
    mxcsr: int = 0x1F80,
    offsets: dict[int, tuple[int, int]] | None = None,
) -> SignalFrame:
    mem = FakeMemory()
    mem.add(STACK_LO, 0x20000)
    frame, fpstate = place_frame(
        mem, STACK_HI - 0x4000, xstate_size=xstate_size, xfeatures=xfeatures, xstate_bv=xstate_bv
    )
    mem.write(fpstate + 24, struct.pack("<I", mxcsr))
    table = offsets or infer_source_offsets(xfeatures, xstate_size) or {}
    for n, raw in (data or {}).items():
        mem.write(fpstate + table[n][0], raw)
    (live,) = find_frames(ThreadStacks(1, frame - 0x100), mem, SAS).live
    return live


def thread(
    xstate_bv: int | None,
    in_use: frozenset[int] = frozenset(),
    pkru: int | None = None,
    *,
    compat: bool = False,
    unreadable: tuple[str, ...] = (),
    tid: int = 1,
) -> ThreadState:
    return ThreadState(1, tid, compat, ThreadXsave(xstate_bv, in_use, pkru, None), unreadable)


def codes(decision: object) -> list[str]:
    return sorted(f.code for f in decision.findings)  # type: ignore[attr-defined]


YMM = {2: b"\x11" * 256}


def test_same_host_frame_is_compatible() -> None:
    f = built_frame(0xE7, 2432, 0x7, YMM)
    d = plan_frame(f, ZEN4_NOPKU)
    assert d.action is FrameAction.KEEP and codes(d) == []


def test_layout_inference_by_vendor() -> None:
    assert infer_source_offsets(0xE7, 2432) == {2: (576, 256), 5: (832, 64), 6: (896, 512), 7: (1408, 1024)}
    assert infer_source_offsets(0x2E7, 2696)[5] == (1088, 64)  # type: ignore[index]
    assert infer_source_offsets(0x7, 1000) == {2: (576, 256)}  # oversized, but AVX sits at 576 everywhere
    assert infer_source_offsets(0x27, 2000) is None  # opmask: 1088 on Intel, 832 on AMD, both fit
    assert infer_source_offsets(0x27, 900) == {2: (576, 256), 5: (832, 64)}  # only AMD's layout fits


def test_bigger_source_shrinks_in_place_dropping_init_avx512() -> None:
    f = built_frame(0xE7, 2432, 0xE7, YMM)  # AVX-512 bits set, data all zero (init)
    d = plan_frame(f, SMALL)
    assert d.action is FrameAction.TRANSLATE
    assert codes(d) == ["COMPONENT_INIT_DROPPED"] * 3 + [
        "XSTATE_SIZE_EXCEEDS_DEST"
    ]  # ZMM_Hi256, Hi16_ZMM, opmask
    assert d.keep_mask == 0x7 and d.target_size == 832


def test_avx512_in_use_on_smaller_host_is_refused() -> None:
    f = built_frame(0xE7, 2432, 0xE7, {**YMM, 6: b"\x22" * 512})
    d = plan_frame(f, SMALL)
    assert d.action is FrameAction.REFUSE
    assert codes(d) == [
        "COMPONENT_INIT_DROPPED",
        "COMPONENT_INIT_DROPPED",
        "COMPONENT_IN_USE_MISSING_ON_DEST",
    ]


def test_intel_to_amd_moves_components() -> None:
    f = built_frame(
        0x2E7, 2696, 0x2E7, {**YMM, 5: b"\x01" * 64, 6: b"\x02" * 512, 9: struct.pack("<Q", INIT_PKRU)}
    )
    d = plan_frame(f, ZEN4)
    assert d.action is FrameAction.TRANSLATE
    assert codes(d) == ["COMPONENT_OFFSET_MOVED"] * 3 + [
        "XSTATE_SIZE_EXCEEDS_DEST"
    ]  # opmask, ZMM_Hi256, PKRU
    assert d.target_size == 2440 and d.keep_mask == 0x267


def test_amd_to_intel_needs_relocation() -> None:
    f = built_frame(0x2E7, 2440, 0x267, {**YMM, 6: b"\x02" * 512, 9: struct.pack("<Q", INIT_PKRU)})
    d = plan_frame(f, ICX)
    assert d.action is FrameAction.RELOCATE and codes(d) == [
        "COMPONENT_OFFSET_MOVED",
        "COMPONENT_OFFSET_MOVED",
        "XSAVE_IMAGE_RELOCATED",
    ]
    assert d.target_size == 2696
    refused = plan_frame(f, ICX, allow_relocation=False)
    assert refused.action is FrameAction.REFUSE
    assert codes(refused) == ["COMPONENT_OFFSET_MOVED", "COMPONENT_OFFSET_MOVED", "RELOCATION_REQUIRED"]


def test_smaller_source_on_frame_size_kernel_is_compatible_without_pkeys() -> None:
    f = built_frame(0x7, 832, 0x7, YMM)
    assert plan_frame(f, ZEN4_NOPKU).action is FrameAction.KEEP


def test_user_size_rule_kernel_wants_magic2_at_user_size() -> None:
    f = built_frame(0x7, 832, 0x7, YMM)
    d = plan_frame(f, TCG_MAX_618_BUGGY)
    assert codes(d) == ["MAGIC2_AT_DEST_USER_SIZE", "PKRU_MISSING_OPENS_KEYS", "XSAVE_IMAGE_RELOCATED"]
    assert d.action is FrameAction.RELOCATE
    assert d.target_size == TCG_MAX_618_BUGGY.user_size == 2696


def test_pkru_dest_without_frame_pkru_carries_default() -> None:
    f = built_frame(0x7, 832, 0x7, YMM)
    d = plan_frame(f, ZEN3)
    assert codes(d) == ["PKRU_MISSING_OPENS_KEYS", "XSAVE_IMAGE_RELOCATED"]
    assert d.pkru == INIT_PKRU and d.keep_mask == 0x207


def test_pkru_in_use_to_host_without_pkeys_is_refused() -> None:
    f = built_frame(0x21F, 2696, 0x207, {**YMM, 9: struct.pack("<Q", 0x55555550)})
    d = plan_frame(f, SMALL)
    assert d.action is FrameAction.REFUSE and codes(d) == ["PKRU_IN_USE_DEST_NO_PKEYS"]


def test_default_pkru_to_host_without_pkeys_is_dropped() -> None:
    f = built_frame(0x21F, 2696, 0x217, {**YMM, 9: struct.pack("<Q", INIT_PKRU)})
    d = plan_frame(f, SMALL)
    assert d.action is FrameAction.TRANSLATE and d.keep_mask == 0x7
    assert codes(d) == [
        "COMPONENT_INIT_DROPPED",
        "PKRU_DROPPED_DEFAULT",
        "XSTATE_SIZE_EXCEEDS_DEST",
    ]  # BNDCSR


def test_amx_tile_data_in_use_is_refused_even_on_amx_host() -> None:
    f = built_frame(0x602E7, 11008, 0x60007, {**YMM, 17: b"\x01" + bytes(63), 18: b"\x05" * 8192})
    d = plan_frame(f, SPR)
    assert d.action is FrameAction.REFUSE and codes(d) == ["AMX_TILE_DATA_IN_USE", "PKRU_MISSING_OPENS_KEYS"]


def test_amx_frame_without_tiles_is_compatible_on_amx_host() -> None:
    f = built_frame(0x202E7, 2816, 0x207, {**YMM, 9: struct.pack("<Q", INIT_PKRU)})
    assert plan_frame(f, SPR).action is FrameAction.KEEP


def test_apx_in_use_on_mpx_host_is_refused_and_init_is_dropped() -> None:
    apx_host = HostFacts("apx", 0x802E7, 2816, 0xFFFF, {n: INTEL_OFFSETS[n] for n in (2, 5, 6, 7, 9, 19)})
    table = {n: INTEL_OFFSETS[n] for n in (2, 5, 6, 7, 9, 19)}
    used = built_frame(0x802E7, 2696, 0x80207, {**YMM, 19: b"\x09" * 128}, offsets=table)
    assert plan_frame(used, SKX).action is FrameAction.REFUSE
    idle = built_frame(0x802E7, 2696, 0x80207, YMM, offsets=table)
    d = plan_frame(idle, SKX)
    assert d.action is FrameAction.TRANSLATE and codes(d) == ["COMPONENT_INIT_DROPPED"]  # APX
    assert plan_frame(idle, apx_host).action is FrameAction.KEEP


def test_amd_mxcsr_bit_on_intel_is_refused() -> None:
    f = built_frame(0x7, 832, 0x7, YMM, mxcsr=0x1F80 | (1 << 17))
    d = plan_frame(f, host("intel-avx2", 0x7, INTEL_OFFSETS))
    assert d.action is FrameAction.REFUSE and codes(d) == ["MXCSR_UNSUPPORTED_BITS"]


def test_unknown_layout_is_refused_with_a_remedy() -> None:
    f = built_frame(0x27, 2000, 0x7, YMM, offsets={2: (576, 256)})
    d = plan_frame(f, ZEN4)
    assert d.action is FrameAction.REFUSE and codes(d) == ["SOURCE_LAYOUT_UNKNOWN"]
    assert d.findings[0].remedy


@pytest.mark.parametrize(
    ("in_use", "expected"),
    [
        (frozenset({6}), ["INIT_ABSENT", "IN_USE_MISSING", "INIT_ABSENT"]),  # opmask, ZMM_Hi256, Hi16_ZMM
        (frozenset(), ["INIT_ABSENT"] * 3),
    ],
)
def test_thread_state_rules(in_use: frozenset[int], expected: list[str]) -> None:
    codes = [f.code for f in plan_thread_state(thread(0xE7, in_use), SMALL)]
    assert codes == [f"THREAD_COMPONENT_{e}_ON_DEST" for e in expected]


def test_thread_pkeys_in_use() -> None:
    state = thread(0x207, frozenset({9}), 0x55555550)
    assert [f.code for f in plan_thread_state(state, SMALL)] == ["THREAD_PKRU_IN_USE_DEST_NO_PKEYS"]


def test_verdict_is_the_worst_finding() -> None:
    ok = built_frame(0xE7, 2432, 0x7, YMM)
    bad = built_frame(0xE7, 2432, 0xE7, {**YMM, 6: b"\x01" * 512})
    state = thread(0x7)
    assert make_plan([(state, [ok])], ZEN4_NOPKU).verdict is Verdict.COMPATIBLE
    assert make_plan([(state, [ok])], SMALL).verdict is Verdict.TRANSLATE
    assert make_plan([(state, [ok, bad])], SMALL).verdict is Verdict.REFUSE
    strict = make_plan(
        [(state, [ok])],
        HostFacts("x", 0xE7, 2432, 0xFFFF, AMD_OFFSETS, flags=frozenset({"sse"})),
        SourceFacts(flags=frozenset({"sse", "avx512f"})),
        strict_isa=True,
    )
    assert strict.verdict is Verdict.REFUSE


def test_unreadable_stack_is_a_refusal_naming_the_thread() -> None:
    state = thread(0x7, unreadable=("stack: lazy page not in the image",), tid=6)
    (f,) = plan_thread_state(state, SMALL)
    assert f.code == "STACK_UNREADABLE" and "tid 6" in f.subject and "lazy" in f.detail


def test_padding_after_bndcsr_state_is_not_data() -> None:
    """XSAVE writes 16 of BNDCSR's 64 bytes; the rest is stack garbage (seen in a QEMU guest)."""
    garbage = bytes(16) + b"S\x00I\x00" + bytes(44)
    f = built_frame(0x21F, 2696, 0x217, {**YMM, 4: garbage, 9: struct.pack("<Q", INIT_PKRU)})
    d = plan_frame(f, SMALL)
    assert d.action is FrameAction.TRANSLATE and codes(d) == [
        "COMPONENT_INIT_DROPPED",
        "PKRU_DROPPED_DEFAULT",
        "XSTATE_SIZE_EXCEEDS_DEST",
    ]


def test_isa_flags_implied_by_frames() -> None:
    from criu_xstate.x86.xfeatures import implied_flags

    assert implied_flags(0x2E7) == {"avx", "avx512f", "pku"}
    f = built_frame(0xE7, 2432, 0x7, YMM)
    state = thread(0x7)
    dest = HostFacts("avx2-host", 0x7, 832, 0x2FFFF, AMD_OFFSETS, flags=frozenset({"avx", "avx2"}))
    src = SourceFacts("signal frames", None, implied_flags(0xE7))
    warn = make_plan([(state, [f])], dest, src)
    assert [x.code for x in warn.findings] == ["ISA_FLAGS_MISSING"] and warn.verdict is Verdict.TRANSLATE
    assert make_plan([(state, [f])], dest, src, strict_isa=True).verdict is Verdict.REFUSE


def test_the_plan_decides_what_leaves_core_images() -> None:
    """changeset only reads ThreadPlan.core_drop: init-state components the destination lacks."""
    from criu_xstate.model import ThreadState, ThreadXsave
    from criu_xstate.plan import make_plan
    from criu_xstate.plan.inputs import HostFacts
    from criu_xstate.x86.xfeatures import INIT_PKRU

    dest = HostFacts("avx-only", 0x7, 832, 0xFFFF, {2: (576, 256)})

    def drop_for(in_use: frozenset[int], pkru: int | None) -> int:
        xsave = ThreadXsave(0x2E7, in_use, pkru, 0x1F80)
        plan = make_plan([(ThreadState(1, 1, False, xsave, ()), ())], dest)
        return plan.threads[0].core_drop

    assert drop_for(frozenset({2}), INIT_PKRU) == 0x2E0  # opmask, ZMM_Hi256, Hi16_ZMM, PKRU (default)
    assert drop_for(frozenset({2, 5}), INIT_PKRU) == 0  # opmask holds data: refused, nothing dropped
    assert drop_for(frozenset({2, 9}), 0x12345678) == 0  # keys in use: refused, nothing dropped
