"""What glibc cached at start-up, read from real CRIU dumps (issue 15).

The truth comes from two places criu-xstate does not use: the workload's own glibc API
(<sys/platform/x86.h> CPU_FEATURE_ACTIVE, gnu_get_libc_version), and tests/workloads/glibc_oracle.c,
which computes glibc's save-area sizes again from CPUID. Both loaders: bookworm's 2.36 (the system's)
and trixie's 2.41 (CRIU's private prefix, run through its own loader), dynamic and static, with and
without GLIBC_TUNABLES masking AVX2. Nothing here assumes the CPU: the expectations are measured.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from criu_xstate import records
from criu_xstate.cli import main
from criu_xstate.elf import Elf, ElfError
from criu_xstate.glibc import IFUNC_FEATURES, GlibcState, SaveArea, needed, read_code, rewritten, save_extent
from criu_xstate.plan import HostFacts
from criu_xstate.plan.make import plan_glibc
from tests.realcriu import CACHE, WORKLOADS, criu, skip_reason

TRIXIE_LIBS = CACHE / "criu-4.1.1" / "usr" / "lib" / "x86_64-linux-gnu"

# --- pure: the rules ---------------------------------------------------------------------------------

AMD = {2: (576, 256), 5: (832, 64), 6: (896, 512), 7: (1408, 1024), 9: (2432, 8)}
INTEL = {2: (576, 256), 3: (960, 64), 4: (1024, 64), 5: (1088, 64), 6: (1152, 512), 7: (1664, 1024)}
FLAGS = frozenset({f.flag for f in IFUNC_FEATURES} | {"xsave", "xsavec"})


def dest(
    name: str, xcr0: int, offsets: dict[int, tuple[int, int]], flags: frozenset[str] = FLAGS
) -> HostFacts:
    return HostFacts(name, xcr0, 0, 0xFFFF, offsets, flags=flags)


def state(
    value: int,
    trampoline: str = "xsavec",
    active: frozenset[str] = frozenset({"AVX2"}),
    lazy: tuple[str, ...] | None = ("/lib/libc.so.6",),
) -> GlibcState:
    area = SaveArea(0x7F0000001000, value, frozenset({"xsave", "xsavec"}), 0xEE, True)
    return GlibcState(7, "/lib/ld.so", "2.36", trampoline, active, (area,), False, lazy)


def codes(s: GlibcState, d: HostFacts) -> list[str]:
    return [f.code for f in plan_glibc(s, d).findings]


def test_extent_of_each_format() -> None:
    assert save_extent("xsavec", 0xEE, 0xE7, AMD) == 2432  # 576 + 256 + 64 + 512 + 1024
    assert save_extent("xsave", 0xEE, 0x2FF, INTEL) == 2688  # standard format: the MPX hole included
    assert save_extent("xsavec", 0xEE, 0x2FF, INTEL) == 576 + 256 + 64 + 64 + 512 + 1024
    assert save_extent("xsavec", 0xEE, 0x7, AMD) == 832
    assert save_extent("xsave", 0xEE, 0x3, AMD) == 576


def test_a_save_area_too_small_is_rewritten_never_shrunk() -> None:
    avx_only = state(896)  # what glibc 2.36 caches on an XCR0 0x7 CPU with XSAVEC
    zen4 = dest("zen4", 0xE7, AMD)
    assert codes(avx_only, zen4) == ["GLIBC_SAVE_AREA_TOO_SMALL"]
    (patch,) = plan_glibc(avx_only, zen4).size_patches
    assert patch == (0x7F0000001000, 2560) and needed(avx_only.areas[0], "xsavec", 0xE7, AMD) == 2496
    assert codes(state(2496), zen4) == [] and plan_glibc(state(2496), zen4).size_patches == ()
    assert rewritten(state(9000).areas[0], 2496) == 9000
    assert codes(state(896), dest("avx", 0x7, AMD)) == []
    assert codes(state(0, "fxsave"), zen4) == []  # FXSAVE trampolines: a fixed 512-byte area
    assert codes(state(896, lazy=()), zen4) == ["GLIBC_BOUND_AT_START"]  # the area is never used
    assert plan_glibc(state(896, lazy=()), zen4).size_patches == ()
    assert codes(state(896, lazy=None), zen4) == ["GLIBC_SAVE_AREA_TOO_SMALL"]  # not known: rewritten


def test_features_and_xsavec_the_destination_lacks_are_refused_by_name() -> None:
    no_avx2 = dest("sandy", 0x7, AMD, FLAGS - {"avx2"})
    plan = plan_glibc(state(896), no_avx2)
    assert [f.code for f in plan.findings] == ["GLIBC_FEATURE_MISSING_ON_DEST"]
    assert "AVX2" in plan.findings[0].detail and "glibc.cpu.hwcaps=-AVX2" in plan.findings[0].remedy
    assert codes(state(896), dest("old", 0x7, AMD, FLAGS - {"xsavec"})) == ["GLIBC_TRAMPOLINE_UNSUPPORTED"]
    assert codes(state(896, "xsave"), dest("old", 0x7, AMD, FLAGS - {"xsavec"})) == []
    assert codes(state(896), dest("unknown flags", 0x7, AMD, frozenset())) == []  # nothing to judge by


# --- real dumps ----------------------------------------------------------------------------------------


def _build(tmp: Path, *, static: bool, loader: str) -> Path:
    """The workload; for 2.41, with trixie's loader as its interpreter and its libraries first (the
    process is then restorable: its executable is itself, not the loader)."""
    out = tmp / f"glibc_features-{loader}{'-static' if static else ''}"
    cmd = ["gcc", "-O2", "-Wall", *(["-static"] if static else []), "-o", str(out)]
    if loader == "2.41":
        # A copy: CRIU runs through trixie's loader itself, and a restored process that maps the file
        # CRIU's own executable is cannot be given its mm (PR_SET_MM_MAP: EBUSY; docs/glibc-state.md).
        interp = tmp / "ld" / "ld-linux-x86-64.so.2"
        interp.parent.mkdir(exist_ok=True)
        shutil.copy2(TRIXIE_LIBS / "ld-linux-x86-64.so.2", interp)
        cmd += [f"-Wl,--dynamic-linker={interp}", f"-Wl,-rpath,{TRIXIE_LIBS}"]
    subprocess.run([*cmd, str(WORKLOADS / "glibc_features.c")], check=True, capture_output=True)
    return out


def _oracle(tmp: Path) -> dict[str, list[int]]:
    exe = tmp / "glibc_oracle"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(WORKLOADS / "glibc_oracle.c")], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()
    return {ln.split()[0]: [int(x) for x in ln.split()[1:]] for ln in lines}


def _start(
    tmp: Path, loader: str, static: bool, tunables: str | None
) -> tuple[subprocess.Popen[bytes], Path]:
    work = tmp / "wl"
    work.mkdir()
    cmd = [str(_build(tmp, static=static, loader=loader)), str(work)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLIBC_")}
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 20
    while not (work / "ready").exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the workload did not start"
        time.sleep(0.02)
    return proc, work


def _truth(work: Path) -> tuple[str, set[str]]:
    lines = dict(
        ln.split(" ", 1) if " " in ln else (ln, "") for ln in (work / "truth").read_text().splitlines()
    )
    return lines["version"], set(lines["active"].split())


def _dump(tmp: Path, proc: subprocess.Popen[bytes]) -> Path:
    images = tmp / "images"
    images.mkdir()
    try:
        criu("dump", "-t", str(proc.pid), "-D", str(images), log_dir=images, log="dump.log")
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    return images


def _show(images: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, object]:
    capsys.readouterr()
    assert main(["show", str(images), "--json"]) == 0
    (p,) = json.loads(capsys.readouterr().out)["processes"]
    glibc = p["glibc"]
    assert isinstance(glibc, dict)
    return glibc


@pytest.mark.criu
@pytest.mark.slow
@pytest.mark.parametrize(
    ("loader", "static", "tunables"),
    [
        ("2.36", False, None),
        ("2.36", False, "glibc.cpu.hwcaps=-AVX2"),
        ("2.36", True, None),
        ("2.36", True, "glibc.cpu.hwcaps=-AVX2,-AVX512F"),
        ("2.41", False, None),
        ("2.41", False, "glibc.cpu.hwcaps=-AVX2"),
    ],
)
def test_what_glibc_cached_is_read_from_the_dump(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], loader: str, static: bool, tunables: str | None
) -> None:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    proc, work = _start(tmp_path, loader, static, tunables)
    version, active = _truth(work)
    images = _dump(tmp_path, proc)
    glibc = _show(images, capsys)
    oracle = _oracle(tmp_path)
    assert glibc["read"] is True and glibc["version"] == version == loader, glibc
    assert glibc["static"] is static
    assert set(glibc["usable"]) == active, (glibc["usable"], active)  # type: ignore[arg-type]
    if tunables:
        masked = {t.lstrip("-") for t in tunables.split("=", 1)[1].split(",")}
        assert not masked & set(glibc["usable"])  # type: ignore[arg-type]
    assert glibc["tunables"] == tunables
    lazy = glibc["lazy_binding"]
    assert (
        lazy == []
        if static
        else (isinstance(lazy, list) and str(_build(tmp_path, static=False, loader=loader)) in lazy)
    )
    sizes = [a["size"] for a in glibc["save_areas"]]  # type: ignore[union-attr]
    assert sizes == oracle[loader], (sizes, oracle)


@pytest.mark.criu
@pytest.mark.slow
def test_a_rewritten_save_area_restores_and_keeps_working(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The translation on a real restore: glibc 2.41 planned for this host with AMX and APX added (its
    lazy-binding trampolines save APX state, its TLS-descriptor ones tile state too: both areas must
    grow), applied, restored here with CRIU; the process then binds functions lazily through its
    trampolines, in the area of the rewritten size, and reports its result."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    from criu_xstate.applying import Options, apply_to_copy
    from criu_xstate.commands.planning import load_destinations

    proc, work = _start(tmp_path, "2.41", False, None)
    images = _dump(tmp_path, proc)
    here = tmp_path / "here.yaml"
    assert main(["probe", "-o", str(here), "--name", "here"]) == 0
    (facts,) = load_destinations([str(here)])
    end = max(o + s for o, s in facts.offsets.values())
    tile_cfg = (end + 63) // 64 * 64
    amx = records.replace(
        facts,
        name="here-with-amx",
        xcr0=facts.xcr0 | 0xE0000,
        offsets={**facts.offsets, 17: (tile_cfg, 64), 18: (tile_cfg + 64, 8192), 19: (tile_cfg + 8256, 128)},
        dynamic=0x40000,
    )
    before = _show(images, capsys)["save_areas"]
    fixed = tmp_path / "fixed"
    outcome = apply_to_copy(images, fixed, amx, Options(), self_contained=True)
    assert any(f.code == "GLIBC_SAVE_AREA_TOO_SMALL" for f in outcome.plan.all_findings())
    after = _show(fixed, capsys)["save_areas"]
    patches = {hex(a): v for a, v in outcome.plan.processes[0].size_patches}
    assert isinstance(before, list) and isinstance(after, list)
    assert [a["size"] for a in after] == [patches.get(b["address"], b["size"]) for b in before]
    grown = [(b["size"], a["size"]) for a, b in zip(after, before, strict=True) if a["size"] != b["size"]]
    assert [a["name"] for a in after if a["address"] in patches] == ["xsave_state_size", "tlsdesc state size"]
    (resolve, tlsdesc) = [new - old for old, new in grown]
    assert resolve >= 128 and tlsdesc >= 8192 + 128, grown  # APX, and the tile data, fit now
    shutil.rmtree(work)
    work.mkdir()
    criu("restore", "-D", str(fixed), "-d", log_dir=fixed, log="restore.log")
    (work / "go").touch()
    deadline = time.monotonic() + 20
    while not (work / "done").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (work / "result").read_text().startswith("ok "), (fixed / "restore.log").read_text()[-2000:]


# --- hostile loaders ---------------------------------------------------------------------------------

SYSTEM_LOADER = Path("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2")


@pytest.mark.skipif(not SYSTEM_LOADER.exists(), reason="no glibc loader on this system")
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(
            st.sampled_from(["head", "anywhere"]), st.integers(0, 1 << 20), st.binary(min_size=1, max_size=8)
        ),
        min_size=1,
        max_size=6,
    )
)
def test_a_damaged_loader_gives_only_elf_errors(edits: list[tuple[str, int, bytes]]) -> None:
    """Headers, tables and code of a real ld.so with bytes overwritten: reading it raises ElfError
    or works, never anything else (the file is as hostile as any image)."""
    data = bytearray(_loader_bytes())
    for where, pos, new in edits:
        at = {"head": pos % 4096, "tail": len(data) - 1 - pos % 4096}.get(where, pos % len(data))
        data[at : at + len(new)] = new
    try:
        elf = Elf(SYSTEM_LOADER, bytes(data))
        read_code(elf)
        elf.build_id()
    except ElfError:
        pass


@functools.cache
def _loader_bytes() -> bytes:
    return SYSTEM_LOADER.read_bytes()
