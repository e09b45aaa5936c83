"""Every reason code, one positive and one negative case each, on built frames and thread states.

Each case asserts the exact list of codes the plan reports (in order), so a rule that fires where it
should not, or a second rule firing along, fails too. The README's table must equal the rule tables.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from criu_xstate.frames import Abi
from criu_xstate.glibc import GlibcUnread
from criu_xstate.plan import HostFacts, SourceFacts, make_plan, plan_frame, plan_thread_state
from criu_xstate.plan.checkpoint_rules import CHECKPOINT_RULES
from criu_xstate.plan.frame_rules import (
    COMPONENT_RULES,
    GATES,
    IA32_RULES,
    SIGSEGV_RULES,
    SIZE_RULES,
    STATE_RULES,
)
from criu_xstate.plan.glibc_rules import AREA_RULES, GLIBC_RULES
from criu_xstate.plan.thread_rules import ABSENT_COMPONENT_RULES, PKRU_RULES, STACK_RULES, THREAD_RULES
from criu_xstate.records import replace
from criu_xstate.x86.xfeatures import INIT_PKRU, INTEL_OFFSETS
from criu_xstate.x86.xsave import XSAVE_HEADER_OFFSET
from tests.test_glibc import AMD as GAMD
from tests.test_glibc import FLAGS as GFLAGS
from tests.test_glibc import codes as glibc_codes
from tests.test_glibc import dest as gdest
from tests.test_glibc import state as gstate
from tests.test_plan_rules import (
    ICX,
    SMALL,
    SPR,
    TCG_MAX_618_BUGGY,
    YMM,
    ZEN3,
    ZEN4,
    ZEN4_NOPKU,
    built_frame,
    host,
    thread,
)

README = Path(__file__).parents[1] / "README.md"
GZEN4 = gdest("zen4", 0xE7, GAMD)
FXSAVE_ONLY = host("nehalem", 0x3, {}, user_size=512)
PKRU_DEFAULT = {9: struct.pack("<Q", INIT_PKRU)}
PKRU_KEYS = {9: struct.pack("<Q", 0x55555550)}
AVX2_INTEL = host("intel-avx2", 0x7, INTEL_OFFSETS)


def frame_codes(frame_args: dict[str, object], dest: HostFacts, **kw: object) -> list[str]:
    f = built_frame(**frame_args)  # type: ignore[arg-type]
    return [x.code for x in plan_frame(f, dest, **kw).findings]  # type: ignore[arg-type]


def header_byte(offset: int, value: int) -> Callable[[], list[str]]:
    """A frame (AVX on an AVX host) with one XSAVE header byte changed."""

    def run() -> list[str]:
        f = built_frame(0xE7, 2432, 0x7, YMM)
        pos = XSAVE_HEADER_OFFSET + offset
        image = f.image[:pos] + bytes([value]) + f.image[pos + 1 :]
        return [x.code for x in plan_frame(replace(f, image=image), ZEN4_NOPKU).findings]

    return run


def compacted(xcomp_bv: int) -> Callable[[], list[str]]:
    def run() -> list[str]:
        f = built_frame(0xE7, 2432, 0x7, YMM)
        pos = XSAVE_HEADER_OFFSET + 8
        image = f.image[:pos] + struct.pack("<Q", xcomp_bv) + f.image[pos + 8 :]
        return [x.code for x in plan_frame(replace(f, image=image), ZEN4_NOPKU).findings]

    return run


def no_fpu(fpstate: bool) -> list[str]:
    f = built_frame(0xE7, 2432, 0x7, YMM)
    if not fpstate:
        f = replace(f, fpstate=None, xsave_address=None, sw=None, image=b"")
    return [x.code for x in plan_frame(f, ZEN4_NOPKU).findings]


def ia32(dest: HostFacts) -> list[str]:
    f = replace(built_frame(0x7, 832, 0x7, YMM), abi=Abi.IA32_RT)
    return [x.code for x in plan_frame(f, dest).findings]


def conflict(conflicts: frozenset[int]) -> list[str]:
    dest = replace(ZEN4_NOPKU, offset_conflicts=conflicts)
    return frame_codes(
        {"xfeatures": 0xE7, "xstate_size": 2432, "xstate_bv": 0x27, "data": {**YMM, 5: b"\1" * 8}}, dest
    )


def size_mismatch(ymm_size: int) -> list[str]:
    dest = replace(ZEN4_NOPKU, offsets={**ZEN4_NOPKU.offsets, 2: (576, ymm_size)})
    return frame_codes({"xfeatures": 0xE7, "xstate_size": 2432, "xstate_bv": 0x7, "data": YMM}, dest)


def thread_codes(dest: HostFacts, **kw: object) -> list[str]:
    return [x.code for x in plan_thread_state(thread(**kw), dest)]  # type: ignore[arg-type]


def isa(dest_flags: frozenset[str], strict: bool = False) -> list[tuple[str, str]]:
    dest = replace(ZEN4_NOPKU, flags=dest_flags)
    plan = make_plan(
        [(thread(0x7), [])], dest, SourceFacts(flags=frozenset({"avx", "avx512f"})), strict_isa=strict
    )
    return [(x.code, x.severity.name) for x in plan.findings]


def frame(xfeatures: int, size: int, bv: int, data: dict[int, bytes], **kw: object) -> dict[str, object]:
    return {"xfeatures": xfeatures, "xstate_size": size, "xstate_bv": bv, "data": data, **kw}


AVX = frame(0x7, 832, 0x7, YMM)
AVX512_ZMM_IN_USE = frame(0xE7, 2432, 0xE7, {**YMM, 6: b"\x22" * 512})
AVX512_INIT = frame(0xE7, 2432, 0xC7, YMM)
INTEL_OPMASK = frame(0x2E7, 2696, 0x227, {**YMM, 5: b"\1" * 64, **PKRU_DEFAULT})
AMD_PKRU = frame(0x2E7, 2440, 0x207, {**YMM, **PKRU_DEFAULT})
PKEYS_DEFAULT = frame(0x207, 2440, 0x207, {**YMM, **PKRU_DEFAULT})
PKEYS_USED = frame(0x207, 2440, 0x207, {**YMM, **PKRU_KEYS})
AMX = {17: b"\x01" + bytes(63), **PKRU_DEFAULT}
AMD_MXCSR = frame(0x7, 832, 0x7, YMM, mxcsr=0x1F80 | 1 << 17)
MSG = "MAGIC2_AT_DEST_USER_SIZE"
FXSAVE_FRAME = frame(0x0, 512, 0x0, {})  # from a CPU without XSAVE

Case = tuple[Callable[[], object], object]
# code: (positive case, the exact findings), (negative case, the exact findings)
CASES: dict[str, tuple[Case, Case]] = {
    "FRAME_NO_FPU_CONTEXT": ((lambda: no_fpu(False), ["FRAME_NO_FPU_CONTEXT"]), (lambda: no_fpu(True), [])),
    "FRAME_COMPACTED_FORMAT": (
        (compacted(1 << 63 | 0x7), ["FRAME_COMPACTED_FORMAT"]),
        (compacted(0x7), ["XSAVE_HEADER_RESERVED_NONZERO"]),
    ),
    "XSAVE_HEADER_RESERVED_NONZERO": (
        (header_byte(16, 1), ["XSAVE_HEADER_RESERVED_NONZERO"]),
        (header_byte(24, 1), []),  # bytes 24..63 are not checked by a 64-bit sigreturn
    ),
    "SOURCE_LAYOUT_UNKNOWN": (
        (
            lambda: frame_codes(frame(0x27, 2000, 0x7, YMM, offsets={2: (576, 256)}), ZEN4),
            ["SOURCE_LAYOUT_UNKNOWN"],
        ),
        (lambda: frame_codes(frame(0x27, 900, 0x7, YMM), ZEN4_NOPKU), []),  # only AMD's layout fits
    ),
    "AMX_TILE_DATA_IN_USE": (
        (
            lambda: frame_codes(frame(0x602E7, 11008, 0x60207, {**YMM, **AMX, 18: b"\x05" * 8192}), SPR),
            ["AMX_TILE_DATA_IN_USE"],
        ),
        (
            lambda: frame_codes(frame(0x602E7, 11008, 0x60207, {**YMM, **AMX}), SPR),
            ["XSTATE_SIZE_EXCEEDS_DEST"],
        ),
    ),
    "COMPONENT_IN_USE_MISSING_ON_DEST": (
        (
            lambda: frame_codes(AVX512_ZMM_IN_USE, SMALL),
            ["COMPONENT_INIT_DROPPED", "COMPONENT_IN_USE_MISSING_ON_DEST", "COMPONENT_INIT_DROPPED"],
        ),
        (lambda: frame_codes(AVX512_ZMM_IN_USE, ZEN4_NOPKU), []),
    ),
    "COMPONENT_INIT_DROPPED": (
        (
            lambda: frame_codes(AVX512_INIT, SMALL),
            ["COMPONENT_INIT_DROPPED", "COMPONENT_INIT_DROPPED", "XSTATE_SIZE_EXCEEDS_DEST"],
        ),
        (lambda: frame_codes(AVX512_INIT, ZEN4_NOPKU), []),
    ),
    "COMPONENT_OFFSET_CONFLICT": (
        (lambda: conflict(frozenset({5})), ["COMPONENT_OFFSET_CONFLICT"]),
        (lambda: conflict(frozenset({6})), []),  # a conflict on a component the frame does not use
    ),
    "COMPONENT_OFFSET_MOVED": (
        (  # opmask, then the PKRU carried
            lambda: frame_codes(INTEL_OPMASK, ZEN4),
            ["COMPONENT_OFFSET_MOVED", "COMPONENT_OFFSET_MOVED", "XSTATE_SIZE_EXCEEDS_DEST"],
        ),
        (lambda: frame_codes(INTEL_OPMASK, ICX), []),
    ),
    "COMPONENT_SIZE_MISMATCH": (
        (lambda: size_mismatch(128), ["COMPONENT_SIZE_MISMATCH"]),
        (lambda: size_mismatch(256), []),
    ),
    "XSTATE_BV_OUTSIDE_DEST_XCR0": (
        (lambda: frame_codes(frame(0x7, 832, 0x7 | 1 << 13, YMM), SMALL), ["XSTATE_BV_OUTSIDE_DEST_XCR0"]),
        (lambda: frame_codes(AVX, SMALL), []),
    ),
    "MXCSR_UNSUPPORTED_BITS": (
        (lambda: frame_codes(AMD_MXCSR, AVX2_INTEL), ["MXCSR_UNSUPPORTED_BITS"]),
        (lambda: frame_codes(AMD_MXCSR, SMALL), []),
    ),
    "PKRU_MISSING_OPENS_KEYS": (
        (lambda: frame_codes(AVX, ZEN3), ["PKRU_MISSING_OPENS_KEYS", "XSAVE_IMAGE_RELOCATED"]),
        (lambda: frame_codes(PKEYS_DEFAULT, ZEN3), []),
    ),
    "PKRU_DROPPED_DEFAULT": (
        (lambda: frame_codes(PKEYS_DEFAULT, SMALL), ["PKRU_DROPPED_DEFAULT", "XSTATE_SIZE_EXCEEDS_DEST"]),
        (lambda: frame_codes(PKEYS_USED, SMALL), ["PKRU_IN_USE_DEST_NO_PKEYS"]),
    ),
    "PKRU_IN_USE_DEST_NO_PKEYS": (
        (lambda: frame_codes(PKEYS_USED, SMALL), ["PKRU_IN_USE_DEST_NO_PKEYS"]),
        (lambda: frame_codes(PKEYS_USED, ZEN3), []),
    ),
    "XSTATE_SIZE_EXCEEDS_DEST": (
        (lambda: frame_codes(frame(0xE7, 2432, 0x7, YMM), SMALL), ["XSTATE_SIZE_EXCEEDS_DEST"]),
        (lambda: frame_codes(AVX, SMALL), []),
    ),
    MSG: (
        (
            lambda: frame_codes(AVX, TCG_MAX_618_BUGGY),
            ["PKRU_MISSING_OPENS_KEYS", MSG, "XSAVE_IMAGE_RELOCATED"],
        ),
        (
            lambda: frame_codes(AVX, replace(TCG_MAX_618_BUGGY, sigreturn="frame-size")),
            ["PKRU_MISSING_OPENS_KEYS", "XSAVE_IMAGE_RELOCATED"],
        ),
    ),
    "XSAVE_IMAGE_RELOCATED": (
        (lambda: frame_codes(AMD_PKRU, ICX), ["COMPONENT_OFFSET_MOVED", "XSAVE_IMAGE_RELOCATED"]),
        (lambda: frame_codes(AMD_PKRU, ZEN4), []),
    ),
    "RELOCATION_REQUIRED": (
        (
            lambda: frame_codes(AMD_PKRU, ICX, allow_relocation=False),
            ["COMPONENT_OFFSET_MOVED", "RELOCATION_REQUIRED"],
        ),
        (lambda: frame_codes(AMD_PKRU, ZEN4, allow_relocation=False), []),
    ),
    "IA32_FRAME_UNSUPPORTED": (
        (lambda: ia32(ZEN3), ["IA32_FRAME_UNSUPPORTED", "PKRU_MISSING_OPENS_KEYS", "XSAVE_IMAGE_RELOCATED"]),
        (lambda: ia32(SMALL), []),
    ),
    "THREAD_XSAVE_DEST_WITHOUT_XSAVE": (
        (lambda: thread_codes(FXSAVE_ONLY, xstate_bv=0x3), ["THREAD_XSAVE_DEST_WITHOUT_XSAVE"]),
        (lambda: thread_codes(FXSAVE_ONLY, xstate_bv=None), []),
    ),
    "DEST_WITHOUT_XSAVE": (
        (
            lambda: frame_codes(dict(xfeatures=0x7, xstate_size=832, xstate_bv=0x7, data=YMM), FXSAVE_ONLY),
            ["DEST_WITHOUT_XSAVE"],
        ),
        (lambda: frame_codes(dict(xfeatures=0x7, xstate_size=832, xstate_bv=0x7, data=YMM), SMALL), []),
    ),
    "FXSAVE_FRAME": (
        (lambda: frame_codes(FXSAVE_FRAME, SMALL), ["FXSAVE_FRAME"]),
        # with protection keys the FXSAVE image becomes an XSAVE one carrying the default PKRU
        (lambda: frame_codes(FXSAVE_FRAME, ZEN3), ["PKRU_MISSING_OPENS_KEYS", "XSAVE_IMAGE_RELOCATED"]),
    ),
    "COMPAT_THREAD": (
        (lambda: thread_codes(SMALL, xstate_bv=0x7, compat=True), ["COMPAT_THREAD"]),
        (lambda: thread_codes(SMALL, xstate_bv=0x7), []),
    ),
    "STACK_UNREADABLE": (
        (
            lambda: thread_codes(SMALL, xstate_bv=0x7, unreadable=("stack: lazy", "sigaltstack: lazy")),
            ["STACK_UNREADABLE"] * 2,
        ),
        (lambda: thread_codes(SMALL, xstate_bv=0x7), []),
    ),
    "THREAD_COMPONENT_IN_USE_MISSING_ON_DEST": (
        (
            lambda: thread_codes(SMALL, xstate_bv=0xE7, in_use=frozenset({6})),
            [
                "THREAD_COMPONENT_INIT_ABSENT_ON_DEST",
                "THREAD_COMPONENT_IN_USE_MISSING_ON_DEST",
                "THREAD_COMPONENT_INIT_ABSENT_ON_DEST",
            ],
        ),
        (lambda: thread_codes(ZEN4_NOPKU, xstate_bv=0xE7, in_use=frozenset({6})), []),
    ),
    "THREAD_COMPONENT_INIT_ABSENT_ON_DEST": (
        (lambda: thread_codes(SMALL, xstate_bv=0x27), ["THREAD_COMPONENT_INIT_ABSENT_ON_DEST"]),
        (lambda: thread_codes(ZEN4_NOPKU, xstate_bv=0x27), []),
    ),
    "THREAD_PKRU_IN_USE_DEST_NO_PKEYS": (
        (
            lambda: thread_codes(SMALL, xstate_bv=0x207, in_use=frozenset({9}), pkru=0x55555550),
            ["THREAD_PKRU_IN_USE_DEST_NO_PKEYS"],
        ),
        (lambda: thread_codes(SMALL, xstate_bv=0x207, in_use=frozenset({9}), pkru=INIT_PKRU), []),
    ),
    "THREAD_PKRU_MISSING_OPENS_KEYS": (
        (lambda: thread_codes(ZEN3, xstate_bv=0x7), ["THREAD_PKRU_MISSING_OPENS_KEYS"]),
        (lambda: thread_codes(ZEN3, xstate_bv=0x7, pkru=0), []),  # a source with pkeys, PKRU really 0
    ),
    "GLIBC_STATE_UNREAD": (
        (lambda: glibc_codes(GlibcUnread(7, None, "no loader here"), GZEN4), ["GLIBC_STATE_UNREAD"]),
        (lambda: glibc_codes(gstate(2496), GZEN4), []),
    ),
    "GLIBC_BOUND_AT_START": (
        (lambda: glibc_codes(gstate(2496, lazy=()), GZEN4), ["GLIBC_BOUND_AT_START"]),
        (lambda: glibc_codes(gstate(2496), GZEN4), []),
    ),
    "GLIBC_FEATURE_MISSING_ON_DEST": (
        (
            lambda: glibc_codes(gstate(832 + 64), gdest("sandy", 0x7, GAMD, GFLAGS - {"avx2"})),
            ["GLIBC_FEATURE_MISSING_ON_DEST"],
        ),
        (lambda: glibc_codes(gstate(832 + 64), gdest("haswell", 0x7, GAMD)), []),
    ),
    "GLIBC_TRAMPOLINE_UNSUPPORTED": (
        (
            lambda: glibc_codes(gstate(896), gdest("old", 0x7, GAMD, GFLAGS - {"xsavec"})),
            ["GLIBC_TRAMPOLINE_UNSUPPORTED"],
        ),
        (lambda: glibc_codes(gstate(896, "xsave"), gdest("old", 0x7, GAMD, GFLAGS - {"xsavec"})), []),
    ),
    "GLIBC_SAVE_AREA_TOO_SMALL": (
        (lambda: glibc_codes(gstate(896), GZEN4), ["GLIBC_SAVE_AREA_TOO_SMALL"]),
        (lambda: glibc_codes(gstate(2496), GZEN4), []),
    ),
    "ISA_FLAGS_MISSING": (
        (lambda: isa(frozenset({"avx"})), [("ISA_FLAGS_MISSING", "WARNING")]),
        (lambda: isa(frozenset({"avx", "avx512f"})), []),
    ),
}


@pytest.mark.parametrize("code", sorted(CASES))
def test_code_positive(code: str) -> None:
    run, expected = CASES[code][0]
    assert run() == expected


@pytest.mark.parametrize("code", sorted(CASES))
def test_code_negative(code: str) -> None:
    run, expected = CASES[code][1]
    assert run() == expected


def test_strict_isa_makes_missing_flags_a_refusal() -> None:
    assert isa(frozenset({"avx"}), strict=True) == [("ISA_FLAGS_MISSING", "REFUSE")]


TABLES = (
    GATES,
    COMPONENT_RULES,
    STATE_RULES,
    SIGSEGV_RULES,
    SIZE_RULES,
    IA32_RULES,
    THREAD_RULES,
    STACK_RULES,
    ABSENT_COMPONENT_RULES,
    PKRU_RULES,
    CHECKPOINT_RULES,
    GLIBC_RULES,
    AREA_RULES,
)


def rule_rows() -> list[tuple[str, str]]:
    return [(r.code, r.severity.name.lower()) for table in TABLES for r in table]


def readme_codes() -> list[tuple[str, str]]:
    section = README.read_text().split("## Plan JSON and reason codes", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([A-Z0-9_]+)` \| ([a-z]+)", section, re.MULTILINE)
    return [(code, severity) for code, severity in rows]


def test_readme_reason_codes_are_the_rule_tables() -> None:
    rows = rule_rows()
    assert len(rows) == len(set(rows)), "a code in two rows"
    assert len({c for c, _ in rows}) == len(rows), "a code with two severities"
    assert sorted(readme_codes()) == sorted(rows)


def test_every_code_has_its_cases() -> None:
    assert sorted(CASES) == sorted(c for c, _ in rule_rows())


def test_a_thread_from_a_cpu_without_xsave_gets_the_default_pkru_too() -> None:
    """core-<tid>.img from a CPU without XSAVE has FPU registers and no xsave: CRIU restores x87/SSE
    alone, so on a host with pkeys the thread runs with PKRU 0. No FPU registers at all: nothing."""
    assert thread_codes(ZEN3, xstate_bv=None) == ["THREAD_PKRU_MISSING_OPENS_KEYS"]
    no_fpu = thread(None)
    no_fpu = replace(no_fpu, xsave=replace(no_fpu.xsave, fpregs=False))
    assert [x.code for x in plan_thread_state(no_fpu, ZEN3)] == []
