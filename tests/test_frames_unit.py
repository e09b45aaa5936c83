"""Frame discovery on built memory (no files): live chain, nesting, altstack, stale, hostile bytes."""

from __future__ import annotations

import random
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from criu_xstate.frames import Liveness, Sigaction, StackKind, ThreadStacks, find_frames
from criu_xstate.x86.sigframe import SA_ONSTACK, SA_RESTORER, SA_SIGINFO
from criu_xstate.x86.xsave import FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2
from tests.framebuild import RESTORER, FakeMemory, place_frame

STACK_LO = 0x7FFF_0000_0000
STACK_SIZE = 0x20000
STACK_HI = STACK_LO + STACK_SIZE
SIGACTIONS = [
    Sigaction(10, 0x401100, SA_SIGINFO | SA_RESTORER, RESTORER),
    Sigaction(12, 0x401200, SA_RESTORER, RESTORER),
]


def _memory() -> FakeMemory:
    mem = FakeMemory()
    mem.add(STACK_LO, STACK_SIZE)
    return mem


def test_single_live_frame_found_exactly() -> None:
    mem = _memory()
    isp = STACK_HI - 0x1000
    frame, fpstate = place_frame(mem, isp)
    handler_sp = frame - 0x200  # the handler's own call frames below the rt_sigframe
    found = find_frames(ThreadStacks(tid=7, sp=handler_sp), mem, SIGACTIONS)
    assert [(f.address, f.fpstate, f.liveness, f.depth) for f in found.frames] == [
        (frame, fpstate, Liveness.LIVE, 0)
    ]
    f = found.frames[0]
    assert f.signo == 10 and f.kernel_layout and f.stack is StackKind.STACK
    assert f.sw is not None and f.sw.xstate_size == 832 and f.sw.xfeatures == 0x7
    assert f.xstate_bv == 0x7 and f.xcomp_bv == 0 and f.mxcsr == 0x1F80
    assert f.end == fpstate + 832 + 4


def test_nested_frames_chain_outwards() -> None:
    mem = _memory()
    outer, _ = place_frame(mem, STACK_HI - 0x800)
    inner, _ = place_frame(mem, outer - 0x100, signo=12)
    found = find_frames(ThreadStacks(tid=7, sp=inner - 0x80), mem, SIGACTIONS)
    assert [(f.address, f.depth) for f in found.live] == [(inner, 0), (outer, 1)]


def test_altstack_frame_chains_to_normal_stack() -> None:
    mem = _memory()
    alt_lo, alt_size = 0x6000_0000, 0x4000
    mem.add(alt_lo, alt_size)
    outer, _ = place_frame(mem, STACK_HI - 0x800)  # a first signal on the normal stack
    alt_frame, _ = place_frame(mem, outer - 0x40, on_altstack_top=alt_lo + alt_size)
    thread = ThreadStacks(tid=7, sp=alt_frame - 0x100, altstack=(alt_lo, alt_size))
    sas = [Sigaction(10, 0x401100, SA_SIGINFO | SA_RESTORER | SA_ONSTACK, RESTORER)]
    found = find_frames(thread, mem, sas)
    assert [(f.address, f.stack, f.depth) for f in found.live] == [
        (alt_frame, StackKind.SIGALTSTACK, 0),
        (outer, StackKind.STACK, 1),
    ]


def test_stale_frame_below_sp_is_never_live() -> None:
    mem = _memory()
    frame, _ = place_frame(mem, STACK_HI - 0x1000)
    sp_after_return = STACK_HI - 0x1000  # the handler returned: SP is back where it was
    found = find_frames(ThreadStacks(tid=7, sp=sp_after_return), mem, SIGACTIONS)
    assert found.live == []
    assert [(f.address, f.liveness) for f in found.frames] == [(frame, Liveness.STALE)]


def test_no_handlers_no_frames() -> None:
    mem = _memory()
    place_frame(mem, STACK_HI - 0x1000)
    assert find_frames(ThreadStacks(tid=7, sp=STACK_LO + 0x100), mem, []).frames == ()


def test_candidate_failing_magic2_reports_the_check() -> None:
    mem = _memory()
    frame, fpstate = place_frame(mem, STACK_HI - 0x1000)
    mem.write(fpstate + 832, b"\0\0\0\0")
    found = find_frames(ThreadStacks(tid=7, sp=frame - 0x40), mem, SIGACTIONS)
    assert found.live == []
    (f,) = found.frames
    assert f.liveness is Liveness.INVALID
    assert [c.name for c in f.failed] == ["fpstate"] and "magic2" in f.failed[0].detail


def test_lazy_stack_is_reported_unreadable() -> None:
    mem = _memory()
    place_frame(mem, STACK_HI - 0x1000)
    mem.lazy.append((STACK_HI - 0x2000, STACK_HI))
    found = find_frames(ThreadStacks(tid=7, sp=STACK_HI - 0x3000), mem, SIGACTIONS)
    assert found.live == [] and len(found.unreadable) == 1
    assert "lazy" in found.unreadable[0].error.reason


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    plants=st.lists(
        st.tuples(st.integers(0, 0x3FF0), st.sampled_from(["restorer", "magic1", "magic2"])), max_size=40
    ),
)
def test_random_bytes_with_planted_magics_give_no_live_frame(
    seed: int, plants: list[tuple[int, str]]
) -> None:
    noise = random.Random(seed).randbytes(0x4000)
    mem = FakeMemory()
    mem.add(STACK_LO, 0x4000)
    mem.write(STACK_LO, noise)
    for off, kind in plants:
        off &= ~7
        value = {
            "restorer": struct.pack("<Q", RESTORER),
            "magic1": struct.pack("<I", FP_XSTATE_MAGIC1),
            "magic2": struct.pack("<I", FP_XSTATE_MAGIC2),
        }[kind]
        mem.write(STACK_LO + off, value[: 0x4000 - off])
    found = find_frames(ThreadStacks(tid=1, sp=STACK_LO), mem, SIGACTIONS)
    assert found.live == []


def test_ia32_rt_frame_is_detected_and_modelled() -> None:
    """A compat task's rt_sigframe_ia32: u32 pretcode, fpstate at frame+276, FSAVE header, XSAVE image at
    fpstate+112 (kernel.md §1.5)."""
    mem = FakeMemory()
    lo = 0xFFF00000
    mem.add(lo, 0x10000)
    isp = lo + 0xF000
    xsave = (isp - (832 + 4)) & ~63
    fpstate = xsave - 112
    frame = fpstate - 276
    assert (frame + 4) % 16 == 0
    raw = bytearray(268)
    struct.pack_into("<I", raw, 0, 0x8049000)  # pretcode
    struct.pack_into("<I", raw, 4, 10)  # sig
    struct.pack_into("<I", raw, 164 + 28, isp)  # sigcontext_32.sp
    struct.pack_into("<I", raw, 164 + 60, 0x23)  # cs
    struct.pack_into("<I", raw, 164 + 76, fpstate)
    mem.write(frame, bytes(raw))
    from tests.framebuild import xsave_image

    mem.write(xsave, xsave_image(832, 0x7, 0x7))
    sas = [Sigaction(10, 0x8049100, SA_SIGINFO | SA_RESTORER, 0x8049000)]
    found = find_frames(ThreadStacks(tid=3, sp=frame - 0x40, compat=True), mem, sas)
    (f,) = found.live
    assert f.abi.value == "ia32-rt" and f.fpstate == fpstate and f.xsave_address == xsave and f.kernel_layout
    assert f.sw is not None and f.sw.xstate_size == 832


def test_ia32_frame_is_kept_as_is_or_refused() -> None:
    from criu_xstate.frames import Abi, Check, SignalFrame
    from criu_xstate.plan import FrameAction, HostFacts, plan_frame
    from criu_xstate.records import replace
    from criu_xstate.x86.xsave import SwBytes
    from tests.framebuild import xsave_image

    img = xsave_image(832, 0x7, 0x7)
    f = SignalFrame(
        tid=3,
        abi=Abi.IA32_RT,
        address=0x1000,
        stack=StackKind.STACK,
        liveness=Liveness.LIVE,
        depth=0,
        checks=(Check("pretcode", True, ""),),
        fpstate=0x1114,
        xsave_address=0x1180,
        sw=SwBytes(0x46505853, 836, 0x7, 832),
        image=img,
        interrupted_sp=0x3000,
    )
    same = HostFacts("h", 0x7, 832, 0xFFFF, {2: (576, 256)})
    assert plan_frame(f, same).action is FrameAction.KEEP
    bigger = HostFacts("pkeys", 0x207, 2440, 0xFFFF, {2: (576, 256), 9: (2432, 8)})
    d = plan_frame(f, bigger)
    assert d.action is FrameAction.REFUSE and d.findings[0].code == "IA32_FRAME_UNSUPPORTED"
    assert "PKRU_MISSING_OPENS_KEYS" in d.findings[0].detail
    dirty = replace(f, image=img[:540] + b"\x01" + img[541:])  # reserved header byte 28
    assert plan_frame(dirty, same).action is FrameAction.REFUSE


def test_frame_off_the_live_chain_is_a_candidate_not_live() -> None:
    """A valid frame on the sigaltstack while the thread runs on its normal stack (a handler that left
    by siglongjmp, or a suspended user context): reported with its evidence, never live."""
    mem = _memory()
    alt_lo, alt_size = 0x6000_0000, 0x4000
    mem.add(alt_lo, alt_size)
    alt_frame, _ = place_frame(mem, STACK_HI - 0x800, on_altstack_top=alt_lo + alt_size)
    thread = ThreadStacks(tid=7, sp=STACK_HI - 0x2000, altstack=(alt_lo, alt_size))
    found = find_frames(thread, mem, SIGACTIONS)
    assert found.live == []
    (f,) = found.frames
    assert f.address == alt_frame and f.liveness is Liveness.CANDIDATE and not f.failed


def test_declared_layouts_match_the_kernel_offsets() -> None:
    """kernel.md §1.1, §1.5 (verified by research/kernel-probes/layout.c on 6.18)."""
    from criu_xstate.x86.sigframe import RT_SIGFRAME_64, RT_SIGFRAME_IA32, SIGFRAME_IA32

    assert (RT_SIGFRAME_64.size, RT_SIGFRAME_64.offset("fpstate"), RT_SIGFRAME_64.offset("sigmask")) == (
        440,
        232,
        304,
    )
    assert RT_SIGFRAME_64.offset("sp") == 168 and RT_SIGFRAME_64.offset("si_signo") == 312
    assert (RT_SIGFRAME_IA32.size, RT_SIGFRAME_IA32.offset("fpstate")) == (268, 240)
    assert (SIGFRAME_IA32.size, SIGFRAME_IA32.offset("fpstate")) == (736, 84)
    values = {"pretcode": 1, "fpstate": 0x7FFC0000, "si_signo": -1, "cs": 0x33}
    assert {
        k: v for k, v in RT_SIGFRAME_64.parse(RT_SIGFRAME_64.build(values)).items() if k in values
    } == values


def test_altstack_above_the_normal_stack_still_chains() -> None:
    """Across stacks the interrupted SP may lie below the frame (an altstack mapped above the stack)."""
    mem = _memory()
    alt_lo, alt_size = STACK_HI + 0x100000, 0x4000
    mem.add(alt_lo, alt_size)
    outer, _ = place_frame(mem, STACK_HI - 0x800)
    alt_frame, _ = place_frame(mem, outer - 0x40, on_altstack_top=alt_lo + alt_size)
    thread = ThreadStacks(tid=7, sp=alt_frame - 0x100, altstack=(alt_lo, alt_size))
    found = find_frames(thread, mem, SIGACTIONS)
    assert [(f.address, f.depth) for f in found.live] == [(alt_frame, 0), (outer, 1)]


def test_a_stack_full_of_restorer_addresses_costs_bounded_work() -> None:
    """The hostile stack of issue 9 (220 s, 8.8 GB before): refused as unreadable without examining
    each candidate (the work invariant is counted, not timed)."""
    from criu_xstate import frames

    mem = _memory()
    bomb = struct.pack("<Q", RESTORER) * (STACK_SIZE // 8)
    mem.write(STACK_LO, bomb)
    examined = 0
    real = frames.examine_frame_64

    def counting(*args: object, **kw: object) -> object:
        nonlocal examined
        examined += 1
        return real(*args, **kw)  # type: ignore[arg-type]

    frames.examine_frame_64 = counting  # type: ignore[assignment]
    try:
        found = find_frames(ThreadStacks(tid=7, sp=STACK_HI - 0x1000), mem, SIGACTIONS)
    finally:
        frames.examine_frame_64 = real
    assert examined == 0 and found.frames == ()
    assert len(found.unreadable) == 1 and "restorer-address candidates" in found.unreadable[0].error.reason


def test_an_fxsave_frame_at_the_very_top_of_a_sigaltstack_is_found() -> None:
    """A kernel on a CPU without XSAVE writes a 512-byte FXSAVE image and no magic2; at the top of a
    sigaltstack the image ends where the mapping ends (QEMU Nehalem, Linux 6.1: the bytes after it are
    unmapped, so nothing past the 512 bytes may be read)."""
    mem = _memory()
    alt_lo, alt_size = 0x6000_0000, 0x4000
    mem.add(alt_lo, alt_size)
    frame, fpstate = place_frame(
        mem, STACK_HI - 0x800, xstate_size=512, xfeatures=0, xstate_bv=0, on_altstack_top=alt_lo + alt_size
    )
    assert fpstate + 512 == alt_lo + alt_size
    thread = ThreadStacks(tid=7, sp=frame - 0x100, altstack=(alt_lo, alt_size))
    sas = [Sigaction(10, 0x401100, SA_SIGINFO | SA_RESTORER | SA_ONSTACK, RESTORER)]
    (live,) = find_frames(thread, mem, sas).live
    assert live.fxsave_only and live.xstate_bv == 0x3 and live.end == fpstate + 512
    assert live.sw is not None and (live.sw.xstate_size, live.sw.extended_size) == (512, 516)


def test_an_fxsave_size_with_features_beyond_sse_is_not_a_frame() -> None:
    mem = _memory()
    frame, _ = place_frame(mem, STACK_HI - 0x1000, xstate_size=512, xfeatures=0, xstate_bv=0)
    mem.write(frame + 456 + 464 + 8, struct.pack("<Q", 0x7))  # sw bytes' xfeatures claims AVX
    found = find_frames(ThreadStacks(tid=7, sp=frame - 0x200), mem, SIGACTIONS)
    assert found.live == []
