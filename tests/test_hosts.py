"""Host profiles: probe against an independent C reading, --from-dump, validation, shipped profiles,
baseline and compare."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from criu_xstate import hosts
from criu_xstate.cli import main
from criu_xstate.errors import ProfileError

REPO = Path(__file__).parents[1]
HOSTS = REPO / "contrib" / "hosts"


def _gcc(src: Path, out: Path) -> Path:
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed")
    subprocess.run(["gcc", "-static", "-O2", "-o", str(out), str(src)], check=True, capture_output=True)
    return out


def test_probe_agrees_with_an_independent_c_reading(tmp_path: Path) -> None:
    exe = _gcc(REPO / "tests" / "probe_helpers" / "cpuid_print.c", tmp_path / "cpuid_print")
    facts: dict[str, str] = {}
    comps: dict[int, tuple[int, int]] = {}
    for line in subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout.splitlines():
        k, *v = line.split()
        if k == "component":
            comps[int(v[0])] = (int(v[1]), int(v[2]))
        else:
            facts[k] = v[0]
    p = hosts.probe_local("t")
    xcr0 = int(facts["xcr0"], 16)
    assert p.xsave.xcr0 == xcr0  # XCR0 holds user-state bits only (PKRU is bit 9): all of them count
    assert p.xsave.max_user_size == int(facts["xsave_size"])
    assert p.xsave.mxcsr_mask == int(facts["mxcsr_mask"], 16)
    assert {n: (c.offset, c.size) for n, c in p.xsave.components.items()} == {
        n: oc for n, oc in comps.items() if xcr0 >> n & 1
    }
    # AT_MINSIGSTKSZ = round_up(736 + 15 + max_size + 4 + 112 + 63, 16) with IA32 emulation (kernel.md §1.3)
    assert int(facts["minsigstksz"]) == (736 + 15 + p.xsave.max_user_size + 4 + 112 + 63 + 15) & ~15
    assert not [n for n in p.notes if n.startswith("disagreement")]


def test_probe_from_dump_equals_probe(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exe = _gcc(REPO / "contrib" / "probe-dump" / "probe-dump.c", tmp_path / "probe-dump")
    dump = tmp_path / "dump.txt"
    dump.write_text(subprocess.run([str(exe)], capture_output=True, text=True, check=True).stdout)
    assert main(["probe", "--from-dump", str(dump), "--name", "x", "-o", str(tmp_path / "a.yaml")]) == 0
    assert main(["probe", "--name", "x", "-o", str(tmp_path / "b.yaml")]) == 0
    a, b = hosts.load_profile(tmp_path / "a.yaml"), hosts.load_profile(tmp_path / "b.yaml")
    assert a.xsave == b.xsave and a.cpu == b.cpu and a.kernel == b.kernel and a.flags == b.flags
    capsys.readouterr()


@pytest.mark.parametrize("path", sorted(HOSTS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_profiles_validate_and_name_sources(path: Path) -> None:
    p = hosts.load_profile(path)
    assert p.name == path.stem
    assert path.read_text().startswith("#"), "each profile names its sources in a comment"


BASE = {
    "schema": "criu-xstate/host/v1",
    "name": "t",
    "xsave": {"xcr0": "0x7", "user_size": 832, "components": {2: {"offset": 576, "size": 256}}},
}


@pytest.mark.parametrize(
    ("patch", "expect"),
    [
        ({"bogus": 1}, "unknown key"),
        ({"xsave": {**BASE["xsave"], "xcr0": "0x207"}}, "lacks offsets"),  # type: ignore[dict-item]
        ({"xsave": {**BASE["xsave"], "xcr0": "0x27"}}, "only part of AVX-512"),  # type: ignore[dict-item]
        ({"xsave": {**BASE["xsave"], "xcr0": "0x20007"}}, "only part of AMX"),  # type: ignore[dict-item]
        ({"xsave": {**BASE["xsave"], "xcr0": "0xf"}}, "only part of MPX"),  # type: ignore[dict-item]
        ({"xsave": {**BASE["xsave"], "xcr0": "0xe3"}}, "AVX-512 needs AVX"),  # type: ignore[dict-item]
        ({"xsave": {**BASE["xsave"], "user_size": 700}}, "smaller than"),  # type: ignore[dict-item]
        (
            {
                "xsave": {
                    **BASE["xsave"],
                    "components": {2: {"offset": 576, "size": 256}, 9: {"offset": 800, "size": 8}},
                    "xcr0": "0x207",
                }
            },
            "overlap",
        ),
        ({"xsave": {**BASE["xsave"], "components": {9: {"offset": 832, "size": 8}}}}, "not in xcr0"),  # type: ignore[dict-item]
        ({"xsave": {**BASE["xsave"], "xcr0": "zz"}}, "not a number"),  # type: ignore[dict-item]
        ({"schema": "v0"}, "schema"),
        ({"kernel": {"sigreturn": "maybe"}}, "sigreturn"),
    ],
)
def test_invalid_profiles_are_refused_clearly(tmp_path: Path, patch: dict[str, object], expect: str) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**BASE, **patch}))
    with pytest.raises(ProfileError, match=expect):
        hosts.load_profile(path)


def test_profile_round_trip(tmp_path: Path) -> None:
    p = hosts.load_profile(HOSTS / "intel-sapphire-rapids.yaml")
    out = tmp_path / "x.yaml"
    out.write_text(hosts.dump_profile(p))
    assert hosts.load_profile(out) == p


def test_baseline_spr_zen4_here(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = [
        HOSTS / "intel-sapphire-rapids.yaml",
        HOSTS / "amd-zen4.yaml",
        HOSTS / "amd-epyc-zen4-vm-nopku.yaml",
    ]
    fleet, gave_up = hosts.baseline([hosts.load_profile(f) for f in files])
    assert fleet.xsave.xcr0 == 0xE7  # no PKRU here, no AMX on AMD
    assert fleet.xsave.offset_conflicts == (5, 6, 7)  # Intel keeps the MPX hole, AMD does not
    assert fleet.xsave.user_size == 2432 and fleet.xsave.mxcsr_mask == 0xFFFF
    assert any("AMX XTILEDATA" in g for g in gave_up["intel-sapphire-rapids"])
    assert any("PKRU" in g for g in gave_up["amd-zen4"])
    mine = gave_up["amd-epyc-zen4-vm-nopku"]
    assert any(g.startswith("mxcsr_mask") for g in mine)  # AMD's MM bit: Intel lacks it
    assert not any(g.startswith(("AVX", "PKRU", "AMX", "user_size")) for g in mine)  # no XSAVE state lost
    out = tmp_path / "fleet.yaml"
    assert main(["baseline", *map(str, files), "-o", str(out)]) == 0
    assert hosts.load_profile(out).xsave.offset_conflicts == (5, 6, 7)
    capsys.readouterr()


def test_compare_names_what_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["compare", str(HOSTS / "intel-sapphire-rapids.yaml"), str(HOSTS / "amd-zen3.yaml")])
    out = capsys.readouterr().out
    assert rc == 1 and "AVX-512 opmask" in out and "AMX XTILEDATA" in out and "avx512f" in out
    assert main(["compare", str(HOSTS / "amd-zen3.yaml"), str(HOSTS / "amd-zen4.yaml")]) == 0


@pytest.mark.parametrize(
    ("release", "rule"),
    [
        ("6.12.117", "frame-size"),
        ("6.16.3", "user-size"),
        ("7.0.1", "user-size"),
        ("6.18.44-fc", "frame-size"),
        ("6.18.10", "user-size"),
        ("7.1-rc5", "user-size"),
        ("7.1-rc6", "frame-size"),
        ("7.2.13", "frame-size"),
    ],
)
def test_sigreturn_rule_from_release(release: str, rule: str) -> None:
    assert hosts.sigreturn_rule(release)[0] == rule


XS = BASE["xsave"]
BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
    for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (BOMB, "anchors and aliases"),  # the 1.6 KB "billion laughs" (51 s and 3.5 GB before)
        ("name: !!python/object/apply:os.system [true]\n", "tag"),
        ("x: " + "[" * 40 + "]" * 40 + "\n", "nested deeper"),
        (yaml.safe_dump({**BASE, "flags": 5}), "flags: expected a list"),
        (yaml.safe_dump({**BASE, "xsave": {**XS, "xcr0": "1" * 5000}}), "characters"),  # type: ignore[dict]
        (yaml.safe_dump({**BASE, "xsave": {**XS, "user_size": 10**30}}), "64 bits"),  # type: ignore[dict]
        (yaml.safe_dump({**BASE, "xsave": {**XS, "xcr0": hex(1 << 63 | 7)}}), "reserved or supervisor"),  # type: ignore[dict]
        (yaml.safe_dump({**BASE, "xsave": {**XS, "xcr0": "0x107"}}), "reserved or supervisor"),  # type: ignore[dict]
        (
            yaml.safe_dump(
                {
                    **BASE,
                    "xsave": {
                        **XS,
                        "xcr0": "0x207",
                        "user_size": 1 << 30,  # type: ignore[dict]
                        "components": {2: {"offset": 576, "size": 256}, 9: {"offset": 1 << 30, "size": 8}},
                    },
                }
            ),
            "beyond any XSAVE area",
        ),
        (yaml.safe_dump({**BASE, "name": "evil\x1b[2J\x1b[31mname"}), "printable"),
        (yaml.safe_dump({**BASE, "name": ["a"]}), "expected a string"),
        ("\x00\x01\x02", "not valid YAML"),
        (yaml.safe_dump(BASE) + "name: other\n", "'name' appears twice"),  # safe_load keeps the last
        ("schema: x\nxsave:\n  xcr0: 7\n  xcr0: 0xffff\n", "'xcr0' appears twice"),
        ("{[1, 2]: 3}\n", "as a YAML key"),
    ],
    ids=[
        "alias-bomb",
        "python-tag",
        "deep",
        "flags-int",
        "5000-digits",
        "huge-int",
        "bit63",
        "supervisor",
        "1GiB-offset",
        "ansi-name",
        "name-list",
        "binary",
        "duplicate-top-key",
        "duplicate-nested-key",
        "list-as-key",
    ],
)
@pytest.mark.parametrize("pure", [False, True], ids=["libyaml", "pure-python"])
def test_hostile_profiles_are_one_line_errors_fast(
    tmp_path: Path, text: str, expect: str, pure: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from criu_xstate import safeyaml

    monkeypatch.setattr(safeyaml, "FORCE_PURE", pure)

    path = tmp_path / "p.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    t0 = time.monotonic()
    with pytest.raises(ProfileError, match=expect) as exc:
        hosts.load_profile(path)
    assert time.monotonic() - t0 < 2 and "\n" not in str(exc.value)


def test_both_yaml_loaders_read_every_shipped_profile_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    from criu_xstate import safeyaml

    for path in sorted((Path(hosts.__file__).parent / "data" / "hosts").glob("*.yaml")):
        text = path.read_text()
        fast = safeyaml.load(text, path)
        monkeypatch.setattr(safeyaml, "FORCE_PURE", True)
        assert safeyaml.load(text, path) == fast, path.name
        monkeypatch.setattr(safeyaml, "FORCE_PURE", False)


def test_a_fifo_as_profile_does_not_block(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "p.yaml")
    with pytest.raises(ProfileError, match="not a regular file"):
        hosts.load_profile(tmp_path / "p.yaml")
