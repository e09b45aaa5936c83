"""The sigreturn self-test (docs/sigreturn-probe.md): the handler's frame rewrite run on built bytes,
the verdict logic, provenance in profiles/baseline/compare/plan, and the self-test on this machine
checked against an independent C implementation and a negative control."""

from __future__ import annotations

import ctypes
import json
import marshal
import os
import shutil
import signal
import struct
import subprocess
from pathlib import Path

import pytest
import yaml

from criu_xstate import hosts
from criu_xstate.cli import main
from criu_xstate.x86 import sigreturn_probe as sp
from criu_xstate.x86.cpuid import RawFacts, format_dump, parse_dump, probe_raw
from criu_xstate.x86.xsave import FP_XSTATE_MAGIC1, FP_XSTATE_MAGIC2, SW_BYTES, SW_BYTES_OFFSET

REPO = Path(__file__).parents[1]
HOSTS = REPO / "contrib" / "hosts"
FIXTURES = Path(__file__).parent / "fixtures"

# --- the handler's machine code on built frames --------------------------------------------------


def _image(size: int, xfeatures: int) -> bytearray:
    """A kernel-built XSAVE image: sw bytes, magic2 at ``size``, XSTATE_BV, recognisable filler."""
    img = bytearray((i * 7 + 3) & 0xFF for i in range(size + 256))
    sw = SW_BYTES.build(
        {"magic1": FP_XSTATE_MAGIC1, "extended_size": size + 4, "xfeatures": xfeatures, "xstate_size": size}
    )
    img[SW_BYTES_OFFSET : SW_BYTES_OFFSET + SW_BYTES.size] = sw
    struct.pack_into("<I", img, size, FP_XSTATE_MAGIC2)
    struct.pack_into("<QQ", img, 512, xfeatures, 0)
    return img


def _run_handler(page: sp._Page, img: bytearray | None, new_size: int, mask: int) -> bytearray | None:
    """Call the handler as the kernel would, with a ucontext whose fpstate points at ``img``."""
    buf = (ctypes.c_char * len(img)).from_buffer(img) if img is not None else None
    uc = ctypes.create_string_buffer(512)
    struct.pack_into("<Q", uc, 224, ctypes.addressof(buf) if buf is not None else 0)
    page.set_params(new_size, mask)
    page.handler(signal.SIGUSR1, None, ctypes.addressof(uc))
    return img


@pytest.mark.parametrize(
    ("user_size", "xfeatures", "new_size"),
    [(2432, 0xE7, 832), (2696, 0x21F, 832), (832, 0x7, 576), (11008, 0x602E7, 832), (2440, 0x2E7, 0)],
)
def test_handler_rewrites_the_frame_as_specified(user_size: int, xfeatures: int, new_size: int) -> None:
    page = sp._Page()
    before = _image(user_size, xfeatures)
    img = _run_handler(page, bytearray(before), new_size, sp.AVX_MASK)
    assert img is not None
    size = new_size or user_size
    sw = SW_BYTES.parse(bytes(img[SW_BYTES_OFFSET : SW_BYTES_OFFSET + SW_BYTES.size]))
    assert sw == {
        "magic1": FP_XSTATE_MAGIC1,
        "extended_size": size + 4,
        "xfeatures": xfeatures & 0x7,
        "xstate_size": size,
    }
    assert struct.unpack_from("<Q", img, 512)[0] == xfeatures & 0x7
    assert struct.unpack_from("<I", img, size)[0] == FP_XSTATE_MAGIC2
    if new_size:
        assert bytes(img[user_size : user_size + 4]) == bytes(4)  # magic2 gone from the kernel's place
    changed = {*range(468, 472), *range(472, 480), *range(480, 484), *range(512, 520)}
    changed |= {*range(size, size + 4), *range(user_size, user_size + 4)}
    assert [i for i in range(len(img)) if img[i] != before[i] and i not in changed] == []
    assert page.recorded() == (user_size, xfeatures)


def test_handler_leaves_a_frame_without_fpstate_alone() -> None:
    page = sp._Page()
    _run_handler(page, None, 832, sp.AVX_MASK)
    assert page.recorded() == (0, 0)


# --- choosing the size, judging the runs ---------------------------------------------------------


def test_probe_size_prefers_the_end_of_avx() -> None:
    assert sp.probe_size(832, 2432) == 832
    assert sp.probe_size(832, 832) == 576  # XCR0 = 0x7: AVX data stays past xstate_size (kernel.md §0.5)
    assert sp.probe_size(832, 576) is None


@pytest.mark.parametrize(
    ("has_xsave", "xcr0", "user_size", "outcome"),
    [(False, None, 576, "cannot-matter"), (True, 0x3, 576, "cannot-matter"), (True, 0x3, 1088, "unknown")],
)
def test_hosts_where_it_cannot_run(has_xsave: bool, xcr0: int | None, user_size: int, outcome: str) -> None:
    m = sp.precondition(has_xsave, xcr0, user_size)
    assert m is not None and m.outcome == outcome and m.detail
    assert sp.measure(has_xsave=has_xsave, xcr0=xcr0, avx_end=832, user_size=user_size) == m


def test_a_host_with_avx_passes_the_precondition() -> None:
    assert sp.precondition(True, 0x7, 832) is None


KEPT = sp.PATTERN
ZEROED = sp.PATTERN[:16] + bytes(16)


@pytest.mark.parametrize(
    ("control", "probe", "outcome"),
    [
        (KEPT, KEPT, "frame-size"),
        (KEPT, ZEROED, "user-size"),
        (ZEROED, ZEROED, "unknown"),  # control lost: the test proves nothing
        (KEPT, bytes(32), "unknown"),  # XMM lost too: not an FX-only restore
        (KEPT, sp.PATTERN[:16] + b"\x01" * 16, "unknown"),
    ],
)
def test_judge(control: bytes, probe: bytes, outcome: str) -> None:
    m = sp.judge(sp.Run(2432, 0xE7, control), sp.Run(2432, 0xE7, probe), 832)
    assert m.outcome == outcome, m


def test_judge_when_the_handler_never_ran() -> None:
    assert sp.judge(sp.Run(0, 0, KEPT), sp.Run(0, 0, KEPT), 832).outcome == "unknown"


def test_interpret_child_failures() -> None:
    assert sp.interpret(b"", signal.SIGSEGV).detail == "self-test child killed by SIGSEGV"
    assert sp.interpret(b"", 0).outcome == "unknown"
    err = sp.interpret(marshal.dumps({"error": "PermissionError: no exec"}), 256)
    assert err.outcome == "unknown" and "PermissionError" in err.detail
    runs = [[2432, 0xE7, KEPT.hex()], [2432, 0xE7, ZEROED.hex()]]
    assert sp.interpret(marshal.dumps({"size": 832, "runs": runs}), 0).outcome == "user-size"
    assert sp.interpret(marshal.dumps({"size": None, "runs": runs[:1] * 2}), 0).outcome == "cannot-matter"
    for garbage in (b"\xff not marshal", marshal.dumps([1, 2]), marshal.dumps({"runs": 5})[:-1]):
        assert sp.interpret(garbage, 0).outcome == "unknown"


# --- on this machine -----------------------------------------------------------------------------


def _here() -> RawFacts:
    return probe_raw()


def _in_child(sizes: list[int]) -> list[sp.Run]:
    """Round trips with the given xstate sizes (0 = the frame's own), in a child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover
        os.close(r)
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR1})
            page = sp._Page()
            page.install(signal.SIGUSR1)
            runs = [page.round_trip(s, signal.SIGUSR1) for s in sizes]
            os.write(w, json.dumps([[x.frame_size, x.ymm.hex()] for x in runs]).encode())
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    os.waitpid(pid, 0)
    return [sp.Run(a, 0, bytes.fromhex(b)) for a, b in json.loads(text)]


def test_self_test_here_sees_both_kinds_of_restore() -> None:
    """Controls on this kernel: a frame rewritten at its own size keeps YMM15 (any rule), one claiming
    more than the user size gets an x87/SSE-only restore (any rule): the test can see both."""
    facts = _here()
    if facts.xcr0 is None or not facts.xcr0 & 0x4:
        pytest.skip("no AVX here: the self-test cannot observe a restore")
    (own,) = _in_child([0])
    bigger = own.frame_size + 64
    control, negative = _in_child([0, bigger])
    assert control.frame_size == own.frame_size and control.low_kept and control.high == "kept"
    assert negative.low_kept and negative.high == "zeroed"


def test_self_test_here_agrees_with_the_c_probe_dump(tmp_path: Path) -> None:
    """Two implementations (machine code + raw rt_sigaction, C + glibc sigaction) on this kernel."""
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    facts = _here()
    exe = tmp_path / "probe-dump"
    src = REPO / "contrib" / "probe-dump" / "probe-dump.c"
    subprocess.run(["gcc", "-static", "-O2", "-o", str(exe), str(src)], check=True, capture_output=True)
    dumped = parse_dump(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout, "d")
    assert facts.sigreturn == dumped.sigreturn
    if facts.xcr0 is not None and facts.xcr0 & 0x4:
        assert facts.sigreturn in ("frame-size", "user-size"), facts.sigreturn_detail
    profile = hosts.profile_from_facts(facts, "here")
    assert profile.kernel.sigreturn_source == "measured"


# --- provenance ----------------------------------------------------------------------------------


def _facts(release: str, outcome: str | None, detail: str = "d") -> RawFacts:
    base = parse_dump(_DUMP, "x")
    base.release, base.sigreturn, base.sigreturn_detail = release, outcome, detail
    return base


_DUMP = (
    "cpuid 0x0 0x0 0xd 0x68747541 0x444d4163 0x69746e65\ncpuid 0x1 0x0 0xa10f11 0x0 0x0 0x0\n"
    "cpuid 0xd 0x0 0x7 0x340 0x340 0x0\ncpuid 0xd 0x2 0x100 0x240 0x0 0x0\nxcr0 0x7\n"
)


@pytest.mark.parametrize(
    ("release", "outcome", "rule", "source"),
    [
        ("6.16.3", "frame-size", "frame-size", "measured"),  # the release table would say user-size
        ("6.1.0", "user-size", "user-size", "measured"),  # ... and frame-size here
        ("6.12.1", "cannot-matter", "frame-size", "measured"),
        ("6.16.3", "unknown", "user-size", "guessed"),
        ("6.1.0", None, "frame-size", "guessed"),
    ],
)
def test_profile_records_how_the_rule_was_obtained(
    release: str, outcome: str | None, rule: str, source: str
) -> None:
    p = hosts.profile_from_facts(_facts(release, outcome, "child killed"), "h")
    assert (p.kernel.sigreturn, p.kernel.sigreturn_source) == (rule, source)
    if source == "guessed":
        assert p.kernel.sigreturn_reason and release in p.kernel.sigreturn_reason
        assert ("child killed" in p.kernel.sigreturn_reason) == (outcome == "unknown")
    set_ = hosts.profile_from_facts(_facts(release, outcome), "h", sigreturn="user-size")
    assert (set_.kernel.sigreturn, set_.kernel.sigreturn_source) == ("user-size", "set")


def test_dump_line_round_trips() -> None:
    f = _facts("6.16.3", "user-size", "kernel frame of 2696 bytes")
    again = parse_dump(format_dump(f), "again")
    assert (again.sigreturn, again.sigreturn_detail) == ("user-size", "kernel frame of 2696 bytes")


def test_provenance_survives_yaml_and_is_validated(tmp_path: Path) -> None:
    p = hosts.profile_from_facts(_facts("6.16.3", "unknown", "no exec page"), "h")
    path = tmp_path / "h.yaml"
    path.write_text(hosts.dump_profile(p))
    assert hosts.load_profile(path).kernel == p.kernel
    data = yaml.safe_load(path.read_text())
    data["kernel"]["sigreturn_source"] = "rumour"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(hosts.ProfileError, match="sigreturn_source"):
        hosts.load_profile(path)
    del data["kernel"]["sigreturn_source"], data["kernel"]["sigreturn_reason"]
    path.write_text(yaml.safe_dump(data))
    assert hosts.load_profile(path).kernel.sigreturn_source == "set"  # a rule written down is set
    del data["kernel"]["sigreturn"]
    path.write_text(yaml.safe_dump(data))
    k = hosts.load_profile(path).kernel
    assert (k.sigreturn, k.sigreturn_source) == ("frame-size", "guessed") and k.sigreturn_reason


def test_baseline_keeps_the_weakest_provenance_and_compare_names_it() -> None:
    measured = hosts.profile_from_facts(_facts("6.1.0", "frame-size"), "m")
    guessed = hosts.profile_from_facts(_facts("6.16.3", None), "g")
    fleet, _ = hosts.baseline([measured, guessed])
    assert fleet.kernel.sigreturn == "user-size" and fleet.kernel.sigreturn_source == "guessed"
    assert fleet.kernel.sigreturn_reason and fleet.kernel.sigreturn_reason.startswith("g: ")
    both, _ = hosts.baseline([measured, measured])
    assert both.kernel.sigreturn_source == "measured"
    (diff,) = [d for d in hosts.compare(measured, guessed) if d.kind == "sigreturn"]
    assert "guessed" in diff.detail


def test_plan_says_when_the_destination_rule_is_a_guess(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    here = yaml.safe_load((HOSTS / "amd-epyc-zen4-vm-nopku.yaml").read_text())
    for source, warned in (("measured", False), ("guessed", True)):
        here["kernel"].update(sigreturn_source=source, sigreturn_reason="no exec page")
        dest = tmp_path / f"{source}.yaml"
        dest.write_text(yaml.safe_dump(here))
        main(["plan", str(FIXTURES / "siginfo"), "--dest", str(dest)])
        text = capsys.readouterr().out
        assert ("sigreturn rule is a guess: no exec page" in text) == warned, text
        main(["plan", str(FIXTURES / "siginfo"), "--dest", str(dest), "--json"])
        guess = json.loads(capsys.readouterr().out)["dest"]["sigreturn_guess"]
        assert guess == ("no exec page" if warned else None)
