"""Translation on built frames: the rewritten image passes a model of the destination kernel's sigreturn
checks (research/kernel.md §3.1, §3.2) and carries every in-use component's bytes to the right offset."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from criu_xstate.plan import FrameAction, HostFacts, plan_frame
from criu_xstate.translate import frame_patches, normalized_image, pointer_patch
from criu_xstate.x86.xfeatures import AMD_OFFSETS, INIT_PKRU, INTEL_OFFSETS, PKRU
from criu_xstate.x86.xsave import (
    FP_XSTATE_MAGIC1,
    FP_XSTATE_MAGIC2,
    MAGIC2_SIZE,
    MIN_XSTATE_SIZE,
    MXCSR_OFFSET,
    SW_BYTES_OFFSET,
    XSAVE_HEADER_OFFSET,
)
from tests.test_plan_rules import ICX, SMALL, TCG_MAX_618_BUGGY, ZEN3, ZEN4, built_frame


def kernel_sigreturn(image: bytes, dest: HostFacts) -> str:
    """'full', 'fx-only' or 'sigsegv', as check_xstate_in_sigframe() + XRSTOR would decide."""
    magic1, extended, _xfeatures, size = struct.unpack_from("<IIQI", image, SW_BYTES_OFFSET)
    bv, xcomp = struct.unpack_from("<QQ", image, XSAVE_HEADER_OFFSET)
    if dest.sigreturn == "user-size":
        magic2_at = dest.user_size
        ok = magic1 == FP_XSTATE_MAGIC1
    else:
        magic2_at = size
        ok = magic1 == FP_XSTATE_MAGIC1 and MIN_XSTATE_SIZE <= size <= dest.user_size and size <= extended
    if (
        not ok
        or len(image) < magic2_at + MAGIC2_SIZE
        or struct.unpack_from("<I", image, magic2_at)[0] != FP_XSTATE_MAGIC2
    ):
        return "fx-only"
    mxcsr = struct.unpack_from("<I", image, MXCSR_OFFSET)[0]
    if bv & ~dest.xcr0 or xcomp or any(image[XSAVE_HEADER_OFFSET + 16 : XSAVE_HEADER_OFFSET + 24]):
        return "sigsegv"
    if mxcsr & ~dest.mxcsr_mask:
        return "sigsegv"
    return "full"


def component(image: bytes, table: dict[int, tuple[int, int]], n: int) -> bytes:
    off, size = table[n]
    return image[off : off + size]


def test_bigger_source_frame_is_fx_only_before_and_full_after() -> None:
    f = built_frame(0xE7, 2432, 0xE7, {2: b"\x11" * 256})
    assert kernel_sigreturn(f.image, SMALL) == "fx-only"
    d = plan_frame(f, SMALL)
    img = normalized_image(d, SMALL)
    assert kernel_sigreturn(img, SMALL) == "full"
    assert len(img) == 836 and component(img, AMD_OFFSETS, 2) == b"\x11" * 256
    (patch,), reloc = frame_patches(1, d, SMALL)
    assert reloc is None and patch.vaddr == f.xsave_address
    assert len(patch.new) == 2436 and patch.new[836:] == bytes(1600)  # stale magic2 wiped


def test_intel_frame_moves_to_amd_offsets() -> None:
    data = {
        2: b"\x11" * 256,
        5: b"\x01" * 64,
        6: b"\x02" * 512,
        7: b"\x03" * 1024,
        9: struct.pack("<Q", 0x5555),
    }
    f = built_frame(0x2E7, 2696, 0x2E7, data)
    d = plan_frame(f, ZEN4)
    img = normalized_image(d, ZEN4)
    assert kernel_sigreturn(img, ZEN4) == "full"
    for n in (2, 5, 6, 7):
        assert component(img, AMD_OFFSETS, n) == data[n]
    assert component(img, AMD_OFFSETS, PKRU)[:4] == b"\x55\x55\x00\x00"


def test_growth_is_a_relocation_with_a_pointer_patch() -> None:
    f = built_frame(0x7, 832, 0x7, {2: b"\x11" * 256})
    d = plan_frame(f, TCG_MAX_618_BUGGY)
    assert d.action is FrameAction.RELOCATE
    patches, reloc = frame_patches(1, d, TCG_MAX_618_BUGGY)
    assert patches == [] and reloc is not None
    assert kernel_sigreturn(reloc.image, TCG_MAX_618_BUGGY) == "full"
    assert struct.unpack_from("<I", reloc.image, INTEL_OFFSETS[PKRU][0])[0] == INIT_PKRU
    p = pointer_patch(reloc, 0x10000)
    assert p.vaddr == f.address + 232 and p.new == struct.pack("<Q", 0x10000)


def test_pkru_carried_to_a_pkeys_host() -> None:
    f = built_frame(0x7, 832, 0x7, {2: b"\x11" * 256})
    d = plan_frame(f, ZEN3)
    _, reloc = frame_patches(1, d, ZEN3)
    assert reloc is not None and kernel_sigreturn(reloc.image, ZEN3) == "full"
    assert struct.unpack_from("<Q", reloc.image, XSAVE_HEADER_OFFSET)[0] == 0x207


HOSTS = [SMALL, ZEN3, ZEN4, ICX, TCG_MAX_618_BUGGY]
SOURCES = [
    (0x7, 832, AMD_OFFSETS),
    (0xE7, 2432, AMD_OFFSETS),
    (0x2E7, 2440, AMD_OFFSETS),
    (0x2E7, 2696, INTEL_OFFSETS),
    (0x21F, 2696, INTEL_OFFSETS),
]


@settings(max_examples=80, deadline=None)
@given(
    src=st.sampled_from(SOURCES),
    dest=st.sampled_from(HOSTS),
    seed=st.binary(min_size=1, max_size=8),
    used=st.sets(st.sampled_from([2, 5, 6, 7])),
)
def test_every_translation_is_accepted_in_full_and_lossless(
    src: tuple[int, int, dict[int, tuple[int, int]]], dest: HostFacts, seed: bytes, used: set[int]
) -> None:
    xfeatures, size, table = src
    used = {n for n in used if xfeatures >> n & 1}
    data = {n: (seed * (table[n][1] // len(seed) + 1))[: table[n][1]] for n in used}
    data = {n: b if any(b) else b"\x01" + b[1:] for n, b in data.items()}
    f = built_frame(xfeatures, size, xfeatures & ~(1 << 3), data, offsets=table)
    d = plan_frame(f, dest)
    if d.action is FrameAction.REFUSE:
        assert any(not dest.xcr0 >> n & 1 for n in used)
        return
    img = f.image if d.action is FrameAction.KEEP else normalized_image(d, dest)
    assert kernel_sigreturn(img, dest) == "full"
    for n in used:
        assert component(img, dict(dest.offsets), n) == data[n]


def test_an_fxsave_frame_becomes_an_xsave_image_with_the_default_pkru_on_a_pkeys_host() -> None:
    """A frame from a CPU without XSAVE (512-byte FXSAVE image, no magic2) is restored FX-only by every
    XSAVE kernel: on a host with protection keys that leaves PKRU 0. Translated, it is a full XSAVE image
    keeping x87/SSE (xstate_bv bits 0 and 1: else XRSTOR would reset XMM) and carrying the default."""
    for dest in (ZEN3, TCG_MAX_618_BUGGY):
        f = built_frame(0x0, 512, 0x0)
        assert f.fxsave_only and len(f.image) == 512
        assert kernel_sigreturn(f.image + bytes(dest.user_size), dest) == "fx-only"
        d = plan_frame(f, dest)
        assert d.action is FrameAction.RELOCATE, d.findings
        img = normalized_image(d, dest)
        assert kernel_sigreturn(img, dest) == "full"
        bv = struct.unpack_from("<Q", img, XSAVE_HEADER_OFFSET)[0]
        assert bv == 0x3 | 1 << PKRU
        assert img[:SW_BYTES_OFFSET] == f.image[:SW_BYTES_OFFSET]
        assert struct.unpack_from("<I", img, dest.offsets[PKRU][0])[0] == INIT_PKRU


def test_an_fxsave_frame_is_kept_where_there_are_no_protection_keys() -> None:
    d = plan_frame(built_frame(0x0, 512, 0x0), SMALL)
    assert d.action is FrameAction.KEEP
    assert [x.code for x in d.findings] == ["FXSAVE_FRAME"]
