"""Which source facts win (plan/inputs.py): a --src profile, else cpuinfo.img, else the frames."""

from __future__ import annotations

from pathlib import Path

from criu_xstate import hosts
from criu_xstate.plan import SourceFacts, source_facts, with_frame_flags
from tests.test_plan_rules import YMM, built_frame

ZEN4 = hosts.load_profile(Path(__file__).parents[1] / "contrib" / "hosts" / "amd-zen4.yaml")
CPUINFO = hosts.PartialProfile("AuthenticAMD", 25, 17, "x", 0x2E7, 2440, 2440, ("avx", "sse"))


def test_src_profile_wins_over_cpuinfo() -> None:
    src = source_facts(ZEN4, CPUINFO)
    assert src is not None and src.name == ZEN4.name
    assert src.flags == frozenset(ZEN4.flags) and src.offsets == {
        n: (c.offset, c.size) for n, c in ZEN4.xsave.components.items()
    }


def test_cpuinfo_gives_flags_but_no_layout() -> None:
    assert source_facts(None, CPUINFO) == SourceFacts("cpuinfo.img", None, frozenset({"avx", "sse"}))
    no_flags = hosts.PartialProfile("AuthenticAMD", 25, 17, "x", 0x2E7, 2440, 2440, ())
    assert source_facts(None, no_flags) == SourceFacts("cpuinfo.img", None, None)
    assert source_facts(None, None) is None


def test_frames_reveal_flags_only_when_nothing_else_gave_them() -> None:
    avx512 = [built_frame(0xE7, 2432, 0x7, YMM)]
    assert with_frame_flags(None, avx512) == SourceFacts("signal frames", None, frozenset({"avx", "avx512f"}))
    layout_only = SourceFacts("p", {2: (576, 256)}, None)
    assert with_frame_flags(layout_only, avx512) == SourceFacts(
        "signal frames", {2: (576, 256)}, frozenset({"avx", "avx512f"})
    )
    known = SourceFacts("cpuinfo.img", None, frozenset({"sse"}))
    assert with_frame_flags(known, avx512) is known
    assert with_frame_flags(None, []) is None
