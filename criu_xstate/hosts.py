"""Host profiles (DESIGN.md §4): load, validate, save, probe, CRIU cpuinfo.img, baseline, compare.

A profile says what a destination kernel will accept in a signal frame: its user XCR0, the default
and maximal user xstate sizes, the dynamic features, the MXCSR mask, each component's standard
offset and size, the kernel's sigreturn rule and the CPU flags. YAML is read with ``safe_load`` only.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from criu_xstate import safeyaml
from criu_xstate.errors import ProfileError
from criu_xstate.records import field, record, replace
from criu_xstate.x86.cpuid import RawFacts
from criu_xstate.x86.xfeatures import DYNAMIC as DYNAMIC_FEATURES
from criu_xstate.x86.xfeatures import SUPERVISOR, XTILEDATA, component_name
from criu_xstate.x86.xsave import MIN_XSTATE_SIZE

FXSAVE_SIZE = 512  # the whole FPU state of a CPU without XSAVE

SCHEMA = "criu-xstate/host/v1"
SIGRETURN_RULES = ("frame-size", "user-size")
SIGRETURN_SOURCES = ("measured", "set", "guessed")  # strongest first


@record
class Component:
    """Where one XSAVE component sits in the standard (non-compacted) format."""

    offset: int
    size: int


@record
class XsaveInfo:
    """A host's XSAVE facts: XCR0, the sizes the kernel uses, the component layout."""

    xcr0: int
    user_size: int
    max_user_size: int
    dynamic: int = 0
    mxcsr_mask: int = 0xFFFF
    components: Mapping[int, Component] = field(default_factory=dict)
    offset_conflicts: tuple[int, ...] = ()  # fleet profiles: components whose offsets differ


@record
class CpuInfo:
    """Which CPU a profile was taken on (for people: the rules judge xsave facts and flags)."""

    vendor: str = "unknown"
    family: int | None = None
    model: int | None = None
    model_name: str | None = None


@record
class KernelInfo:
    """How the host's kernel judges a frame at rt_sigreturn, and how that was learned."""

    release: str | None = None
    sigreturn: str = "frame-size"
    sigreturn_source: str = "set"  # measured | set | guessed
    sigreturn_reason: str | None = None  # guessed: why it could not be measured


@record
class HostProfile:
    """One host or fleet profile: what a plan judges a checkpoint against (DESIGN.md)."""

    name: str
    cpu: CpuInfo
    kernel: KernelInfo
    xsave: XsaveInfo
    flags: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    members: tuple[str, ...] = ()  # fleet profiles: the hosts it was built from


# --- parsing and validation ---------------------------------------------------------------------------

MAX_NUMBER_CHARS = 40
MAX_TEXT_CHARS = 1000
MAX_XSAVE_BYTES = 1 << 16  # architectural XSAVE areas are ~11 KiB with AMX; 64 KiB bounds any future one
_TOP = {"schema", "name", "cpu", "kernel", "xsave", "flags", "notes", "members"}
_CPU = {"vendor", "family", "model", "model_name"}
_KERNEL = {"release", "sigreturn", "sigreturn_source", "sigreturn_reason"}
_XSAVE = {"xcr0", "user_size", "max_user_size", "dynamic", "mxcsr_mask", "components", "offset_conflicts"}


def _int(value: object, where: str, source: str) -> int:
    if isinstance(value, bool):
        raise ProfileError(source, f"{where}: expected a number, got {value!r}")
    if isinstance(value, int):
        result = value
    elif isinstance(value, str):
        if len(value) > MAX_NUMBER_CHARS:
            raise ProfileError(source, f"{where}: a number of {len(value)} characters")
        try:
            result = int(value, 0)
        except ValueError:
            raise ProfileError(source, f"{where}: {value!r} is not a number (use 0x.. for hex)") from None
    else:
        raise ProfileError(source, f"{where}: expected a number, got {type(value).__name__}")
    if result < 0:
        raise ProfileError(source, f"{where}: must not be negative")
    if result.bit_length() > 64:
        raise ProfileError(source, f"{where}: larger than 64 bits")
    return result


def _text(value: object, where: str, source: str) -> str:
    """A printable string: names reach terminals and reports, so no control characters."""
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        raise ProfileError(source, f"{where}: expected a string, got {type(value).__name__}")
    text = str(value)
    if not text.isprintable() or len(text) > MAX_TEXT_CHARS:
        raise ProfileError(source, f"{where}: must be printable text of at most {MAX_TEXT_CHARS} characters")
    return text


def _texts(value: object, where: str, source: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise ProfileError(source, f"{where}: expected a list, got {type(value).__name__}")
    return tuple(_text(v, f"{where} item", source) for v in value)


def _list(value: object, where: str, source: str) -> list[object]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ProfileError(source, f"{where}: expected a list, got {type(value).__name__}")
    return value


def _mapping(value: object, where: str, source: str, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ProfileError(source, f"{where}: expected a mapping")
    unknown = sorted(str(k) for k in value if k not in allowed)
    if unknown:
        raise ProfileError(
            source, f"{where}: unknown key(s) {', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})"
        )
    return value


def _opt_text(d: Mapping[str, Any], key: str, where: str, source: str) -> str | None:
    return _text(d[key], where, source) if d.get(key) is not None else None


def _cpu_from(d: Mapping[str, Any], source: str) -> CpuInfo:
    return CpuInfo(
        vendor=_text(d.get("vendor", "unknown"), "cpu.vendor", source),
        family=_int(d["family"], "cpu.family", source) if "family" in d else None,
        model=_int(d["model"], "cpu.model", source) if "model" in d else None,
        model_name=_opt_text(d, "model_name", "cpu.model_name", source),
    )


def _kernel_from(d: Mapping[str, Any], source: str) -> KernelInfo:
    sigreturn = d.get("sigreturn", "frame-size")
    if sigreturn not in SIGRETURN_RULES:
        raise ProfileError(
            source, f"kernel.sigreturn must be one of {', '.join(SIGRETURN_RULES)}, got {sigreturn!r}"
        )
    sigreturn_source = d.get("sigreturn_source", "set" if "sigreturn" in d else "guessed")
    if sigreturn_source not in SIGRETURN_SOURCES:
        allowed = ", ".join(SIGRETURN_SOURCES)
        raise ProfileError(
            source, f"kernel.sigreturn_source must be one of {allowed}, got {sigreturn_source!r}"
        )
    reason = d.get("sigreturn_reason")
    if "sigreturn" not in d and reason is None:
        reason = "the profile names no kernel.sigreturn rule"
    return KernelInfo(
        release=_opt_text(d, "release", "kernel.release", source),
        sigreturn=str(sigreturn),
        sigreturn_source=str(sigreturn_source),
        sigreturn_reason=_text(reason, "kernel.sigreturn_reason", source) if reason is not None else None,
    )


def _components_from(value: object, source: str) -> dict[int, Component]:
    if not isinstance(value, dict):
        raise ProfileError(
            source, "xsave.components: expected a mapping of component number to {offset, size}"
        )
    comps: dict[int, Component] = {}
    for k, v in value.items():
        n = _int(k, "xsave.components key", source)
        cd = _mapping(v, f"xsave.components.{n}", source, {"offset", "size"})
        comps[n] = Component(
            _int(cd.get("offset"), f"components.{n}.offset", source),
            _int(cd.get("size"), f"components.{n}.size", source),
        )
    return comps


def _xsave_from(value: object, source: str) -> XsaveInfo:
    xs = _mapping(value, "xsave", source, _XSAVE)
    for key in ("xcr0", "user_size", "components"):
        if key not in xs:
            raise ProfileError(source, f"xsave: missing required key {key!r}")
    user_size = _int(xs["user_size"], "xsave.user_size", source)
    return XsaveInfo(
        xcr0=_int(xs["xcr0"], "xsave.xcr0", source),
        user_size=user_size,
        max_user_size=_int(xs.get("max_user_size", user_size), "xsave.max_user_size", source),
        dynamic=_int(xs.get("dynamic", 0), "xsave.dynamic", source),
        mxcsr_mask=_int(xs.get("mxcsr_mask", 0xFFFF), "xsave.mxcsr_mask", source),
        components=_components_from(xs["components"], source),
        offset_conflicts=tuple(
            _int(c, "xsave.offset_conflicts", source)
            for c in _list(xs.get("offset_conflicts"), "xsave.offset_conflicts", source)
        ),
    )


def profile_from_dict(data: object, source: str) -> HostProfile:
    """A profile from parsed YAML: every key known, every value of its type, then validated."""
    top = _mapping(data, "profile", source, _TOP)
    if top.get("schema") != SCHEMA:
        raise ProfileError(source, f"schema must be {SCHEMA!r}, got {top.get('schema')!r}")
    for key in ("name", "xsave"):
        if key not in top:
            raise ProfileError(source, f"missing required key {key!r}")
    cpu_d = _mapping(top.get("cpu") or {}, "cpu", source, _CPU)
    kernel_d = _mapping(top.get("kernel") or {}, "kernel", source, _KERNEL)
    profile = HostProfile(
        name=_text(top["name"], "name", source),
        cpu=_cpu_from(cpu_d, source),
        kernel=_kernel_from(kernel_d, source),
        xsave=_xsave_from(top["xsave"], source),
        flags=_texts(top.get("flags"), "flags", source),
        notes=_texts(top.get("notes"), "notes", source),
        members=_texts(top.get("members"), "members", source),
    )
    validate(profile, source)
    return profile


# XSETBV raises #GP for these XCR0 values (Intel SDM vol. 1 §13.3, "Enabling the XSAVE feature set"):
# a CPU never runs with them, so a profile that has one describes no host.
_XCR0_ALL_OR_NONE = (
    (0x18, "MPX (bits 3 and 4)"),
    (0xE0, "AVX-512 (bits 5, 6 and 7)"),
    (0x60000, "AMX (bits 17 and 18)"),
)
_XCR0_NEEDS = ((0x4, 0x2, "AVX (bit 2) needs SSE (bit 1)"), (0xE0, 0x4, "AVX-512 needs AVX (bit 2)"))


def _check_xcr0_groups(xcr0: int, source: str) -> None:
    for group, what in _XCR0_ALL_OR_NONE:
        if xcr0 & group not in (0, group):
            raise ProfileError(
                source, f"xsave.xcr0 0x{xcr0:x} enables only part of {what}: XSETBV refuses it (SDM 13.3)"
            )
    for feature, needed, what in _XCR0_NEEDS:
        if xcr0 & feature and not xcr0 & needed:
            raise ProfileError(source, f"xsave.xcr0 0x{xcr0:x}: {what}; XSETBV refuses it (SDM 13.3)")


def validate(p: HostProfile, source: str) -> None:
    xs = p.xsave
    if not xs.xcr0 & 0x3 == 0x3:
        raise ProfileError(source, f"xsave.xcr0 0x{xs.xcr0:x} lacks x87/SSE (bits 0 and 1)")
    if xs.xcr0 >> 63 or xs.xcr0 & SUPERVISOR:
        raise ProfileError(
            source, f"xsave.xcr0 0x{xs.xcr0:x} has reserved or supervisor bits (XCR0 holds user state only)"
        )
    _check_xcr0_groups(xs.xcr0, source)
    for what, size in (("user_size", xs.user_size), ("max_user_size", xs.max_user_size)):
        if size > MAX_XSAVE_BYTES:
            raise ProfileError(
                source, f"xsave.{what} {size} is beyond any XSAVE area ({MAX_XSAVE_BYTES} limit)"
            )
    if xs.mxcsr_mask >> 32:
        raise ProfileError(source, f"xsave.mxcsr_mask 0x{xs.mxcsr_mask:x} is wider than MXCSR (32 bits)")
    for n, c in xs.components.items():
        if n < 2:
            raise ProfileError(
                source, f"xsave.components.{n}: x87/SSE live in the legacy area, not in components"
            )
        if not xs.xcr0 >> n & 1:
            raise ProfileError(
                source, f"xsave.components.{n} ({component_name(n)}) is not in xcr0 0x{xs.xcr0:x}"
            )
        if c.offset < MIN_XSTATE_SIZE or c.size == 0 or c.offset + c.size > MAX_XSAVE_BYTES:
            raise ProfileError(
                source, f"xsave.components.{n}: offset {c.offset} size {c.size} is not a standard slot"
            )
    missing = [n for n in range(2, 64) if xs.xcr0 >> n & 1 and n not in xs.components]
    if missing:
        raise ProfileError(source, f"xsave.components lacks offsets for xcr0 component(s) {missing}")
    ordered = sorted(xs.components.items(), key=lambda kv: kv[1].offset)
    for (a, ca), (b, cb) in itertools.pairwise(ordered):
        if ca.offset + ca.size > cb.offset:
            raise ProfileError(
                source, f"xsave.components {a} ({ca.offset}+{ca.size}) and {b} (at {cb.offset}) overlap"
            )
    if xs.user_size == FXSAVE_SIZE and xs.max_user_size == FXSAVE_SIZE and xs.xcr0 == 0x3:
        return  # a CPU without XSAVE: FXSAVE frames only
    static_end = max(
        [MIN_XSTATE_SIZE] + [c.offset + c.size for n, c in xs.components.items() if not xs.dynamic >> n & 1]
    )
    full_end = max([MIN_XSTATE_SIZE] + [c.offset + c.size for c in xs.components.values()])
    if xs.user_size < static_end:
        raise ProfileError(
            source, f"xsave.user_size {xs.user_size} is smaller than the components' end {static_end}"
        )
    if xs.max_user_size < max(xs.user_size, full_end):
        raise ProfileError(
            source, f"xsave.max_user_size {xs.max_user_size} is smaller than user_size/components end"
        )
    if xs.dynamic & ~xs.xcr0:
        raise ProfileError(source, f"xsave.dynamic 0x{xs.dynamic:x} names features outside xcr0")


def profile_to_dict(p: HostProfile) -> dict[str, Any]:
    cpu: dict[str, Any] = {"vendor": p.cpu.vendor}
    if p.cpu.family is not None:
        cpu["family"] = p.cpu.family
    if p.cpu.model is not None:
        cpu["model"] = p.cpu.model
    if p.cpu.model_name:
        cpu["model_name"] = p.cpu.model_name
    xs = p.xsave
    out: dict[str, Any] = {
        "schema": SCHEMA,
        "name": p.name,
        "cpu": cpu,
        "kernel": _kernel_to_dict(p.kernel),
        "xsave": {
            "xcr0": hex(xs.xcr0),
            "user_size": xs.user_size,
            "max_user_size": xs.max_user_size,
            "dynamic": hex(xs.dynamic),
            "mxcsr_mask": hex(xs.mxcsr_mask),
            "components": {n: {"offset": c.offset, "size": c.size} for n, c in sorted(xs.components.items())},
        },
        "flags": list(p.flags),
    }
    if xs.offset_conflicts:
        out["xsave"]["offset_conflicts"] = list(xs.offset_conflicts)
    if p.notes:
        out["notes"] = list(p.notes)
    if p.members:
        out["members"] = list(p.members)
    return out


def _kernel_to_dict(k: KernelInfo) -> dict[str, Any]:
    out: dict[str, Any] = {"release": k.release, "sigreturn": k.sigreturn}
    out["sigreturn_source"] = k.sigreturn_source
    if k.sigreturn_reason:
        out["sigreturn_reason"] = k.sigreturn_reason
    return out


def dump_profile(p: HostProfile, *, as_json: bool = False) -> str:
    data = profile_to_dict(p)
    if as_json:
        import json

        return json.dumps(data, indent=2) + "\n"
    import yaml  # only when a profile is written: the hook's start-up does not pay for it

    return str(yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100))


def load_profile(path: Path) -> HostProfile:
    """A profile file, read as hostile input (safeyaml: bounded, no aliases or tags; then validated)."""
    return profile_from_dict(safeyaml.load(safeyaml.read_text(path), path), str(path))


def load_profiles(path: Path) -> list[HostProfile]:
    """A profile file, or every ``*.yaml``/``*.yml`` of a directory (sorted by name)."""
    if path.is_dir():
        files = sorted([*path.glob("*.yaml"), *path.glob("*.yml")])
        if not files:
            raise ProfileError(path, "directory holds no *.yaml host profiles")
        return [load_profile(f) for f in files]
    return [load_profile(path)]


# --- building a profile from raw facts (probe and --from-dump) ----------------------------------------

_REVERT_KNOWN = {(6, 18): 44}  # stable branches measured to carry the 2026 revert, from this patch level


def sigreturn_rule(release: str | None) -> tuple[str, str | None]:
    """The kernel's magic2 rule guessed from its release (only when the self-test could not answer,
    docs/sigreturn-probe.md), with a note when the answer is a conservative guess."""
    if not release:
        return "user-size", "kernel release unknown: assuming the stricter user-size rule"
    m = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?(-rc(\d+))?", release)
    if not m:
        return "user-size", f"kernel release {release!r} not understood: assuming the stricter user-size rule"
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    rc = int(m.group(5)) if m.group(5) else None
    ver = (major, minor)
    if ver < (6, 15) or ver > (7, 1) or (ver == (7, 1) and (rc is None or rc >= 6)):
        return "frame-size", None
    known = _REVERT_KNOWN.get(ver)
    if known is not None and patch >= known:
        return "frame-size", f"{release}: stable branch carries the revert of dc8aa31a7ac2 (measured)"
    return "user-size", (
        f"{release} is in the 6.15 .. 7.1-rc5 window (magic2 at user_size); if this build carries the "
        "revert 44eeff9bc467, set kernel.sigreturn: frame-size"
    )


def sigreturn_of(facts: RawFacts, explicit: str | None) -> KernelInfo:
    """The rule, with how it was obtained: set by the user, measured by the self-test, else guessed."""
    if explicit is not None:
        return KernelInfo(facts.release, explicit, "set")
    if facts.sigreturn in SIGRETURN_RULES:
        return KernelInfo(facts.release, facts.sigreturn, "measured")
    if facts.sigreturn == "cannot-matter":  # both rules accept the same frames: name the laxer one
        return KernelInfo(facts.release, "frame-size", "measured", f"cannot matter: {facts.sigreturn_detail}")
    why = facts.sigreturn_detail if facts.sigreturn == "unknown" else "no self-test result in the facts"
    rule, note = sigreturn_rule(facts.release)
    guess = note or f"{facts.release}: outside the 6.15 .. 7.1-rc5 window"
    return KernelInfo(facts.release, rule, "guessed", f"not measured ({why}); from the release: {guess}")


def _sigreturn_note(k: KernelInfo, detail: str) -> str:
    if k.sigreturn_source == "measured":
        return f"sigreturn rule {k.sigreturn} measured: {k.sigreturn_reason or detail}"
    if k.sigreturn_source == "set":
        return f"sigreturn rule set explicitly to {k.sigreturn}"
    return f"sigreturn rule {k.sigreturn} guessed: {k.sigreturn_reason}"


def _vendor(facts: RawFacts) -> str:
    _, b, c, d = facts.cpuid.get((0, 0), (0, 0, 0, 0))
    raw = struct_pack_u32(b) + struct_pack_u32(d) + struct_pack_u32(c)
    return raw.decode("ascii", "replace").strip("\0") or "unknown"


def struct_pack_u32(v: int) -> bytes:
    return int(v & 0xFFFFFFFF).to_bytes(4, "little")


def _family_model(facts: RawFacts) -> tuple[int | None, int | None]:
    if (1, 0) not in facts.cpuid:
        return None, None
    eax = facts.cpuid[(1, 0)][0]
    base_family = (eax >> 8) & 0xF
    family = base_family + ((eax >> 20) & 0xFF if base_family == 0xF else 0)
    model = (eax >> 4) & 0xF
    if base_family in (0x6, 0xF):
        model |= ((eax >> 16) & 0xF) << 4
    return family, model


def profile_from_facts(facts: RawFacts, name: str, *, sigreturn: str | None = None) -> HostProfile:
    notes: list[str] = [f"{k}: {v}" for k, v in facts.sources.items() if k != "cpuid"]
    d0 = facts.cpuid.get((0xD, 0))
    osxsave = facts.cpuid.get((1, 0), (0, 0, 1 << 27, 0))[2] >> 27 & 1
    if d0 is None or not osxsave:
        return _fxsave_profile(facts, name, notes, sigreturn)
    supported = d0[0] | (d0[3] << 32)
    xcr0 = facts.xcr0 if facts.xcr0 is not None else supported
    if facts.xcr0 is None:
        notes.append("XCR0 not read (no XGETBV): using CPUID 0xD.0 supported features")
    user_xcr0 = xcr0 & ~SUPERVISOR
    if facts.xcomp_supp is not None:
        if facts.xcomp_supp != user_xcr0:
            notes.append(
                f"disagreement: XCR0 user part 0x{user_xcr0:x} vs ARCH_GET_XCOMP_SUPP "
                f"0x{facts.xcomp_supp:x}; using the kernel's"
            )
        user_xcr0 = facts.xcomp_supp
    comps: dict[int, Component] = {}
    dynamic = 0
    for n in range(2, 20):
        if not user_xcr0 >> n & 1:
            continue
        leaf = facts.cpuid.get((0xD, n))
        if leaf is None or leaf[0] == 0:
            raise ProfileError(name, f"XCR0 enables component {n} but CPUID 0xD.{n} describes no size")
        comps[n] = Component(offset=leaf[1], size=leaf[0])
        if (1 << n) & DYNAMIC_FEATURES:
            dynamic |= 1 << n
    ends = [MIN_XSTATE_SIZE] + [c.offset + c.size for n, c in comps.items() if not dynamic >> n & 1]
    user_size = max(ends)
    max_user = max([user_size] + [c.offset + c.size for c in comps.values()])
    if d0[1] != max_user:
        notes.append(f"disagreement: CPUID 0xD.0 EBX {d0[1]} vs components' end {max_user}")
    if facts.minsigstksz is not None:
        expect_ia32 = _round16(736 + 15 + max_user + 4 + 112 + 63)
        expect_64 = _round16(440 + 15 + max_user + 4 + 63)
        if facts.minsigstksz not in (expect_ia32, expect_64):
            notes.append(
                f"disagreement: AT_MINSIGSTKSZ {facts.minsigstksz} vs {expect_ia32} expected for a "
                f"{max_user}-byte XSAVE area (kernel.md §1.3)"
            )
    kernel = sigreturn_of(facts, sigreturn)
    notes.append(_sigreturn_note(kernel, facts.sigreturn_detail))
    family, model = _family_model(facts)
    profile = HostProfile(
        name=name,
        cpu=CpuInfo(vendor=_vendor(facts), family=family, model=model, model_name=facts.model_name),
        kernel=kernel,
        xsave=XsaveInfo(
            xcr0=user_xcr0,
            user_size=user_size,
            max_user_size=max_user,
            dynamic=dynamic,
            mxcsr_mask=facts.mxcsr_mask if facts.mxcsr_mask is not None else 0xFFFF,
            components=comps,
        ),
        flags=tuple(facts.flags),
        notes=tuple(notes),
    )
    validate(profile, name)
    return profile


def _fxsave_profile(facts: RawFacts, name: str, notes: list[str], sigreturn: str | None) -> HostProfile:
    """A CPU (or kernel) without XSAVE: signal frames and CRIU's images carry the 512-byte FXSAVE area
    only. Written as XCR0 0x3 (what FXSAVE holds) with a user size of FXSAVE_SIZE and no components."""
    notes.append("no XSAVE (no CPUID leaf 0xD or OSXSAVE clear): FXSAVE frames of 512 bytes")
    kernel = sigreturn_of(facts, sigreturn)
    family, model = _family_model(facts)
    profile = HostProfile(
        name=name,
        cpu=CpuInfo(vendor=_vendor(facts), family=family, model=model, model_name=facts.model_name),
        kernel=kernel,
        xsave=XsaveInfo(
            xcr0=0x3,
            user_size=FXSAVE_SIZE,
            max_user_size=FXSAVE_SIZE,
            dynamic=0,
            mxcsr_mask=facts.mxcsr_mask if facts.mxcsr_mask is not None else 0xFFFF,
            components={},
        ),
        flags=tuple(facts.flags),
        notes=tuple(notes),
    )
    validate(profile, name)
    return profile


def _round16(v: int) -> int:
    return (v + 15) & ~15


def probe_local(name: str, *, sigreturn: str | None = None, skip_self_test: str | None = None) -> HostProfile:
    from criu_xstate.x86.cpuid import probe_raw

    return profile_from_facts(probe_raw(skip_self_test=skip_self_test), name, sigreturn=sigreturn)


# --- CRIU cpuinfo.img -------------------------------------------------------------------------------

# compel x86_capability word 9 = CPUID 7.0 EBX, word 4 = CPUID 1 ECX: a few flags worth naming.
_CAP_FLAGS = {
    (0, 25): "sse",
    (0, 26): "sse2",
    (4, 0): "pni",
    (4, 9): "ssse3",
    (4, 19): "sse4_1",
    (4, 20): "sse4_2",
    (4, 26): "xsave",
    (4, 28): "avx",
    (4, 12): "fma",
    (9, 5): "avx2",
    (9, 16): "avx512f",
    (9, 17): "avx512dq",
    (9, 28): "avx512cd",
    (9, 30): "avx512bw",
    (9, 31): "avx512vl",
    (11, 3): "pku",
    (11, 4): "ospke",
    (18, 24): "amx_tile",
    (18, 22): "amx_bf16",
    (18, 25): "amx_int8",
}


@record
class PartialProfile:
    """What a CRIU ``cpuinfo.img`` tells about the *source* host (criu.md §4)."""

    vendor: str
    family: int
    model: int
    model_name: str
    xfeatures: int  # lacks bits 1 (SSE) and 3 (BNDREGS) by a CRIU quirk; SSE is added back
    xsave_size: int  # CPUID 0xD.0 EBX (enabled features), not the signal-frame size
    xsave_size_max: int
    flags: tuple[str, ...]


def profile_from_cpuinfo_img(entry: Any) -> PartialProfile:
    vendor = {1: "GenuineIntel", 2: "AuthenticAMD"}.get(int(entry.vendor_id), "unknown")
    words = [int(w) for w in entry.capability]
    flags = sorted(
        name for (word, bit), name in _CAP_FLAGS.items() if word < len(words) and words[word] >> bit & 1
    )
    return PartialProfile(
        vendor=vendor,
        family=int(entry.cpu_family),
        model=int(entry.model),
        model_name=bytes(entry.model_id).decode("utf-8", "replace"),
        xfeatures=int(entry.xfeatures_mask) | 0x2,
        xsave_size=int(entry.xsave_size),
        xsave_size_max=int(entry.xsave_size_max),
        flags=tuple(flags),
    )


# --- baseline and compare ---------------------------------------------------------------------------


@record
class Difference:
    """One way two profiles differ (`hosts compare`, fleet baselines)."""

    kind: str  # component | flag | size | mxcsr | sigreturn | offset
    subject: str
    detail: str


def compare(a: HostProfile, b: HostProfile) -> list[Difference]:
    """What ``b`` lacks that ``a`` has (a checkpoint made on ``a`` restored on ``b``)."""
    out: list[Difference] = []
    for n in range(2, 64):
        if a.xsave.xcr0 >> n & 1 and not b.xsave.xcr0 >> n & 1:
            out.append(Difference("component", component_name(n), f"{a.name} enables it, {b.name} does not"))
        elif a.xsave.xcr0 >> n & 1 and n in a.xsave.components and n in b.xsave.components:
            ca, cb = a.xsave.components[n], b.xsave.components[n]
            if ca.offset != cb.offset:
                out.append(
                    Difference(
                        "offset",
                        component_name(n),
                        f"offset {ca.offset} on {a.name}, {cb.offset} on {b.name}",
                    )
                )
    if b.xsave.user_size < a.xsave.user_size:
        out.append(
            Difference(
                "size", "user_size", f"{a.xsave.user_size} on {a.name}, {b.xsave.user_size} on {b.name}"
            )
        )
    lost = a.xsave.mxcsr_mask & ~b.xsave.mxcsr_mask
    if lost:
        out.append(Difference("mxcsr", "mxcsr_mask", f"bits 0x{lost:x} valid on {a.name} only"))
    if b.kernel.sigreturn == "user-size" and a.kernel.sigreturn != "user-size":
        out.append(
            Difference(
                "sigreturn",
                "kernel",
                f"{b.name} looks for magic2 at its user size (6.15 .. 7.1-rc5 rule; {_provenance(b.kernel)})",
            )
        )
    if b.flags:
        for f in sorted(set(a.flags) - set(b.flags)):
            out.append(Difference("flag", f, f"{a.name} has it, {b.name} does not"))
    return out


def baseline(
    profiles: Sequence[HostProfile], name: str | None = None
) -> tuple[HostProfile, dict[str, list[str]]]:
    """One profile every host satisfies, and per host what it gave up."""
    if not profiles:
        raise ProfileError(None, "baseline needs at least one profile")
    xcr0 = 0xFFFFFFFFFFFFFFFF
    for p in profiles:
        xcr0 &= p.xsave.xcr0
    comps: dict[int, Component] = {}
    conflicts: list[int] = []
    notes: list[str] = []
    for n in range(2, 64):
        if not xcr0 >> n & 1:
            continue
        seen = {p.xsave.components[n] for p in profiles}
        if len(seen) == 1:
            comps[n] = next(iter(seen))
        else:
            comps[n] = min(seen, key=lambda c: c.offset)
            conflicts.append(n)
            where = ", ".join(f"{p.name}: {p.xsave.components[n].offset}" for p in profiles)
            notes.append(f"{component_name(n)} offsets disagree ({where}): frames using it are refused")
    user_size = min(p.xsave.user_size for p in profiles)
    static_end = max([MIN_XSTATE_SIZE] + [c.offset + c.size for n, c in comps.items() if n != XTILEDATA])
    if user_size < static_end:
        notes.append(f"smallest user size {user_size} is below the common components' end {static_end}")
        user_size = static_end
    strict = [p for p in profiles if p.kernel.sigreturn == "user-size"]
    if len({p.xsave.user_size for p in strict}) > 1:
        notes.append(
            "hosts with the user-size sigreturn rule differ in user size: no single frame suits them all"
        )
    mask = 0xFFFFFFFF
    for p in profiles:
        mask &= p.xsave.mxcsr_mask
    flag_sets = [set(p.flags) for p in profiles if p.flags]
    flags = sorted(set.intersection(*flag_sets)) if flag_sets else []
    dynamic = xcr0
    for p in profiles:
        dynamic &= p.xsave.dynamic
    fleet = HostProfile(
        name=name or "fleet-baseline",
        cpu=CpuInfo(vendor=_common((p.cpu.vendor for p in profiles), "mixed")),
        kernel=_weakest_kernel(profiles, "user-size" if strict else "frame-size"),
        xsave=XsaveInfo(
            xcr0=xcr0,
            user_size=user_size,
            max_user_size=max(user_size, min(p.xsave.max_user_size for p in profiles)),
            dynamic=dynamic,
            mxcsr_mask=mask,
            components=comps,
            offset_conflicts=tuple(conflicts),
        ),
        flags=tuple(flags),
        notes=tuple(notes),
        members=tuple(p.name for p in profiles),
    )
    validate(fleet, fleet.name)
    gave_up = {p.name: [f"{d.subject}: {d.detail}" for d in compare(p, fleet)] for p in profiles}
    return fleet, gave_up


def _provenance(k: KernelInfo) -> str:
    return k.sigreturn_source + (f": {k.sigreturn_reason}" if k.sigreturn_source == "guessed" else "")


def _weakest_kernel(profiles: Sequence[HostProfile], rule: str) -> KernelInfo:
    """A fleet's rule is only as sure as its least sure host's."""
    weakest = max(profiles, key=lambda p: SIGRETURN_SOURCES.index(p.kernel.sigreturn_source))
    source = weakest.kernel.sigreturn_source
    reason = f"{weakest.name}: {weakest.kernel.sigreturn_reason}" if source == "guessed" else None
    return KernelInfo(release=None, sigreturn=rule, sigreturn_source=source, sigreturn_reason=reason)


def _common(values: Iterable[str], mixed: str) -> str:
    s = set(values)
    return s.pop() if len(s) == 1 else mixed


def with_name(p: HostProfile, name: str) -> HostProfile:
    return replace(p, name=name)
