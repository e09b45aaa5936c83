"""The cross-CPU proof matrix (issue 11): real kernels on chosen CPUs in QEMU as sources and destinations.

    python -m tests.matrix [--subset full|ci] [--out docs/matrix] [--work DIR] [--cells REGEX]

Phases, one QEMU guest at a time:
  1. each (CPU model, kernel) that is a source or a destination boots once: ``probe-dump`` describes it
     (``criu-xstate probe --from-dump`` turns that into its profile, sigreturn rule measured), and the
     oracle workload (tests/workloads/oracle.c) is started and dumped by CRIU 4.1.1 in every variant
     the cells need from it;
  2. on this machine, per cell: ``criu-xstate plan --json`` against the destination's profile, and
     ``apply --out --self-contained`` (a separate directory: the dump itself is never written);
  3. each destination boots once and restores, for every cell assigned to it, the unmodified dump
     (the control: what the kernel does) and the applied copy, releases the workload and keeps what
     its oracle reported after each rt_sigreturn and in each thread.

A cell passes when the applied copy restores with every register intact, or when the plan refused
with a code that names the true cause (computed here from what the source oracle held and what the
destination has) and apply wrote nothing. docs/matrix.md explains the choice of cells.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tests import qemu_guest, realcriu
from tests.qemu_guest import SHARED, run_guest
from tests.realcriu import CACHE, REPO, WORKLOADS

ORACLE = f"{SHARED}/bin/oracle"
VARIANTS = ("single", "threads", "nested", "altstack", "stale", "pkeys", "nohandler")
KERNELS = {"6.1": "frame-size", "6.16": "user-size"}
INIT_PKRU = 0x55555554
HOST = "host"  # this machine itself: its dumps and restores run here, with its own kernel


@dataclass(frozen=True)
class Cpu:
    name: str
    qemu: str  # the -cpu argument
    accel: str
    about: str


CPUS = {
    c.name: c
    for c in (
        Cpu("max", "max", "tcg", "TCG max: x87 SSE AVX MPX PKRU, Intel layout"),
        Cpu("max-nopku", "max,-pku", "tcg", "TCG max without protection keys: MPX, no PKRU"),
        Cpu("max-nompx", "max,-mpx", "tcg", "TCG max without MPX: PKRU at Intel's 2688 behind a hole"),
        Cpu("avx", "Haswell-noTSX", "tcg", "Haswell: AVX only"),
        Cpu("sse", "Denverton-v2", "tcg", "Denverton (Goldmont): XSAVE without AVX"),
        Cpu("fx", "Nehalem", "tcg", "Nehalem: no XSAVE, FXSAVE frames"),
        Cpu("kvm", "host,-arch-capabilities", "kvm", "this machine's CPU under KVM (vendor layout)"),
        Cpu(HOST, "-", "none", "this machine itself, no QEMU: its CPU, vendor layout and kernel"),
    )
}

# Each destination gets a source that differs from it in XSAVE state, chosen so that together they
# take the distinct code paths: a bigger frame into a smaller one (drop PKRU/MPX, shrink), a smaller
# one into a bigger one (magic2 at the user size on 6.16, relocation, PKRU carried into a pkeys host),
# MPX out / PKRU in, YMM in use into a CPU without AVX (refusal), XSAVE frames into an FXSAVE CPU and
# FXSAVE frames into an XSAVE CPU with pkeys. The pkeys variant needs a source with protection keys.
PAIRS = {  # destination: source for every variant but pkeys
    "max": "avx",
    "max-nopku": "max",
    "max-nompx": "max-nopku",
    "avx": "max",
    "sse": "avx",
    "fx": "sse",
    "kvm": "max",
    HOST: "max",  # Intel's layout (MPX hole, PKRU at 2688) into this CPU's vendor layout, for real
}
PKEYS_SOURCE = {"max": "max-nompx"}  # default: max
# (source, destination): FXSAVE frames into pkeys; the host's CPU as a source (KVM, and this machine)
EXTRA = [("fx", "max"), ("kvm", "avx"), (HOST, "max-nompx")]


@dataclass(frozen=True)
class Cell:
    src: str
    dst: str
    kernel: str
    variant: str

    @property
    def id(self) -> str:
        return f"{self.src}-to-{self.dst}-{self.kernel}-{self.variant}"


def full_cells(include_kvm: bool = True) -> list[Cell]:
    cells = []
    for kernel in KERNELS:
        for dst, src in PAIRS.items():
            for v in VARIANTS:
                s = PKEYS_SOURCE.get(dst, "max") if v == "pkeys" else src
                cells.append(Cell(s, dst, kernel, v))
        for src, dst in EXTRA:
            cells += [Cell(src, dst, kernel, v) for v in VARIANTS if v != "pkeys"]
    return [c for c in cells if include_kvm or "kvm" not in (c.src, c.dst)]


# The CI subset: every translate code and every refusal the TCG models reach, both kernels, every
# variant at least once, in four source boots and four destination boots per kernel pair.
CI = [
    # MAGIC2_AT_DEST_USER_SIZE, XSAVE_IMAGE_RELOCATED, PKRU_MISSING_OPENS_KEYS
    ("avx", "max", "6.16", "single"),
    ("avx", "max", "6.1", "threads"),
    # XSTATE_SIZE_EXCEEDS_DEST, PKRU_DROPPED_DEFAULT, COMPONENT_INIT_DROPPED; control: YMM lost
    ("max", "avx", "6.1", "nested"),
    ("max", "avx", "6.16", "altstack"),
    ("max", "avx", "6.1", "stale"),
    # PKRU_IN_USE_DEST_NO_PKEYS, THREAD_PKRU_IN_USE_DEST_NO_PKEYS
    ("max", "avx", "6.16", "pkeys"),
    # MPX bits outside the destination's XCR0: the control dies (SIGSEGV), apply restores intact
    ("max", "max-nompx", "6.16", "pkeys"),
    ("max-nopku", "max-nompx", "6.1", "altstack"),
    # COMPONENT_IN_USE_MISSING_ON_DEST, THREAD_COMPONENT_IN_USE_MISSING_ON_DEST; control: SIGILL
    ("avx", "sse", "6.1", "single"),
    ("avx", "sse", "6.16", "nohandler"),
    ("avx", "max", "6.1", "nohandler"),
    # THREAD_XSAVE_DEST_WITHOUT_XSAVE, DEST_WITHOUT_XSAVE: CRIU 4.1.1 itself refuses the control
    ("max", "fx", "6.1", "pkeys"),
    # FXSAVE-only frames into a pkeys CPU: relocated into an XSAVE image with the default PKRU (threads
    # without xsave: THREAD_PKRU_MISSING_OPENS_KEYS); at the very top of a sigaltstack on 6.1
    ("fx", "max", "6.1", "single"),
    ("fx", "max", "6.1", "altstack"),
    # THREAD_PKRU_MISSING_OPENS_KEYS: idle threads from a CPU without pkeys get the default PKRU
    ("max-nopku", "max-nompx", "6.16", "stale"),
    # this machine itself, as destination (Intel's layout into its vendor's: on AMD with pkeys, PKRU
    # moves from 2688 to 2432, COMPONENT_OFFSET_MOVED) and as source (its vector width and layout)
    ("max", HOST, "6.16", "single"),
    ("max", HOST, "6.1", "pkeys"),
    (HOST, "max-nompx", "6.1", "threads"),
]


def ci_cells() -> list[Cell]:
    return [Cell(*c) for c in CI]


# ---------------------------------------------------------------- guests


def build_binaries(bindir: Path) -> dict[str, Path]:
    """The oracle and probe-dump, built for this run (not in the shared cache other worktrees use)."""
    bindir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, src, libs in (
        ("oracle", WORKLOADS / "oracle.c", ["-lpthread"]),
        ("probe-dump", REPO / "contrib" / "probe-dump" / "probe-dump.c", []),
    ):
        exe = bindir / name
        if not exe.exists() or exe.stat().st_mtime < src.stat().st_mtime:
            subprocess.run(
                ["gcc", "-static", "-O2", "-Wall", "-o", str(exe), str(src), *libs],
                check=True,
                capture_output=True,
            )
        out[name] = exe
    return out


GUEST_PIDS = 40000  # above a host's usual pid_max (32768): a dump only guests restore meets no host pid
HOST_SPACING = 28  # pids per dump in a window of this machine's (PID_WINDOW holds 2 kernels x 7 variants)


def pid_base(cpu: str, kernel: str, variant: str, host_windows: dict[str, int]) -> int:
    """A pid range per source dump, unique in the whole matrix: a destination restores many dumps. A
    source whose dumps this machine restores, or this machine itself, gets a window of pids free here
    (qemu_guest.free_pid_window: below the last pid, which the host moves away from until it wraps)."""
    k = list(KERNELS).index(kernel) if kernel in KERNELS else 0
    if cpu in host_windows:
        return host_windows[cpu] + HOST_SPACING * (k * len(VARIANTS) + VARIANTS.index(variant))
    index = (list(CPUS).index(cpu) * len(KERNELS) + k) * len(VARIANTS)
    return GUEST_PIDS + 400 * (index + VARIANTS.index(variant))


def host_pid_windows(cpus: list[str]) -> dict[str, int]:
    """One free window of this machine's pids per CPU in ``cpus``, none overlapping."""
    out: dict[str, int] = {}
    held: list[int] = []
    for cpu in cpus:
        base = qemu_guest.free_pid_window(avoid=held)
        held.append(base)
        out[cpu] = base
    return out


def workdir_of(variant: str) -> str:
    return f"{SHARED}/m/{variant}"


def source_scenario(variants: list[str], pids: dict[str, int]) -> str:
    lines = ["/bin/probe-dump > /out/probe.txt 2>&1", "grep -m1 'model name' /proc/cpuinfo > /out/cpu.txt"]
    for v in variants:
        w = workdir_of(v)
        lines.append(f"""
W={w}; O=/out/src/{v}
mkdir -p $W $O/images && chown 1000:1000 $W
echo {pids[v]} > /proc/sys/kernel/ns_last_pid
su -s /bin/sh user -c "cd / && setsid {ORACLE} $W 11 {v} </dev/null >/dev/null 2>&1 &"
sleep 0.2
for i in $(seq 1 300); do [ -e $W/ready ] && break; pidof oracle >/dev/null || break; sleep 0.1; done
if [ -e $W/ready ]; then
  sleep 0.3
  PID=$(pidof oracle); echo $PID > $O/pid
  /criu/criu dump -t $PID -D $O/images -o dump.log -v4
  echo "dump {v} exit $?"
else
  echo "start {v} failed"; rmdir $O/images
fi
cp $W/truth-*.json $W/result $O/ 2>/dev/null
pidof oracle && kill -9 $(pidof oracle)
""")
    return "\n".join(lines)


def dest_scenario(runs: list[tuple[str, str, int, str]]) -> str:
    """runs: (output name, images dir in the guest, pid, variant): restore, release, collect."""
    lines = ["/bin/probe-dump > /out/probe.txt 2>&1"]
    for name, images, pid, variant in runs:
        w = workdir_of(variant)
        lines.append(f"""
W={w}; O=/out/dst/{name}
rm -rf $W; mkdir -p $W $O && chown 1000:1000 $W
/criu/criu restore -D {images} -d -o $O/restore.log -v4
echo $? > $O/restore-exit
kill -USR2 {pid} 2>/dev/null
for i in $(seq 1 150); do [ -e $W/done ] && break; [ -d /proc/{pid} ] || break; sleep 0.1; done
sleep 0.1
cp $W/result $O/result 2>/dev/null; [ -e $W/done ] && touch $O/done
[ -d /proc/{pid} ] && {{ cat /proc/{pid}/status > $O/still-running; kill -9 {pid}; }}
for i in $(seq 1 50); do [ -d /proc/{pid} ] || break; sleep 0.1; done
echo "restored {name}: $(cat $O/restore-exit)"
""")
    lines.append("dmesg > /out/dmesg-all.txt")
    return "\n".join(lines)


def run_here(scenario: str, files: dict[str, Path], where: Path, timeout: float) -> qemu_guest.GuestResult:
    """A guest's scenario run on this machine itself: the same shell script, the guest's fixed paths
    (/out, /in, /bin, /criu) mapped to this machine's, the workload run as root (a sandbox's root may
    lack CAP_SYS_RESOURCE, and CRIU's prlimit on another user's task then fails: "Can't get rlimit").
    Files at absolute paths (the oracle under SHARED) are put at those paths: a restored process maps
    its executable by path."""
    root, out = where / "root", where / "out"
    shutil.rmtree(where, ignore_errors=True)
    out.mkdir(parents=True)
    for dest, src in files.items():
        target = Path(dest) if dest.startswith("/") else root / dest
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, target, symlinks=True)
        else:
            shutil.copy2(src, target)
    here = (
        scenario.replace("/criu/criu", str(realcriu.criu_path()))
        .replace("/bin/probe-dump", str(root / "bin" / "probe-dump"))
        .replace("/out/", f"{out}/")
        .replace(" /in/", f" {root}/in/")
        .replace('su -s /bin/sh user -c "', 'sh -c "')  # as root: CRIU here may lack CAP_SYS_RESOURCE
    )
    start = time.monotonic()
    with (out / "scenario.log").open("w") as log:
        subprocess.run(
            ["bash", "-c", here], stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False
        )
    dmesg = subprocess.run(["dmesg"], capture_output=True, text=True, check=False).stdout
    (out / "dmesg.txt").write_text(dmesg)
    return qemu_guest.GuestResult(out, "", time.monotonic() - start)


def boot(
    cpu: Cpu, kernel: str, scenario: str, files: dict[str, Path], where: Path, timeout: float
) -> qemu_guest.GuestResult:
    if cpu.name == HOST:
        return run_here(scenario, files, where, timeout)
    return run_guest(
        scenario,
        files,
        where,
        cpu=cpu.qemu,
        accel=cpu.accel,
        kernel_version=kernel,
        timeout=timeout,
        memory="1G",
    )


def kvm_usable(bins: dict[str, Path], work: Path) -> str | None:
    """None when a KVM guest boots here, else why not (a nested hypervisor may refuse it)."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "no /dev/kvm"
    try:
        g = boot(
            CPUS["kvm"],
            "6.1",
            "/bin/probe-dump > /out/probe.txt\n",
            {"bin/probe-dump": bins["probe-dump"]},
            work / "kvm-check",
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        pvm = (
            " (/dev/kvm is kvm_pvm here: PVM runs only guest kernels built for it, not Debian's)"
            if Path("/sys/module/kvm_pvm").exists()
            else ""
        )
        return f"a KVM guest (-cpu {CPUS['kvm'].qemu}) did not boot within 60 s{pvm}"
    except RuntimeError as e:
        return f"a KVM guest (-cpu {CPUS['kvm'].qemu}) did not boot here: {str(e).splitlines()[0][:200]}"
    return None if (g.out / "probe.txt").exists() else "KVM guest gave no probe output"


# ---------------------------------------------------------------- host side


def cli(*args: str) -> tuple[int, str, str]:
    r = subprocess.run([sys.executable, "-m", "criu_xstate", *args], capture_output=True, text=True, cwd=REPO)
    return r.returncode, r.stdout, r.stderr


def profile_of(probe_txt: Path, name: str, out: Path) -> tuple[dict[str, Any], str]:
    """The guest's profile (``probe --from-dump``), or {} and criu-xstate's error when it has none."""
    rc, _, err = cli("probe", "--from-dump", str(probe_txt), "--name", name, "-o", str(out))
    if rc != 0:
        return {}, err.strip()
    rc, js, err = cli("probe", "--from-dump", str(probe_txt), "--name", name, "--json")
    return (json.loads(js), "") if rc == 0 else ({}, err.strip())


def tree_digest(path: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        if p.is_file() and not p.is_symlink():
            h.update(str(p.relative_to(path)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def codes_of(plan: dict[str, Any]) -> dict[str, str]:
    """Every reason code in a plan with its severity."""
    found: dict[str, str] = {}

    def take(reasons: list[dict[str, Any]]) -> None:
        for r in reasons:
            found.setdefault(r["code"], r.get("severity", ""))

    take(plan.get("reasons", []))
    for t in plan.get("threads", []):
        take(t.get("reasons", []))
        for f in t.get("frames", []):
            take(f.get("reasons", []))
    return found


# ---------------------------------------------------------------- judging


def read_result(d: Path) -> dict[str, Any]:
    """What one restore gave: restore exit, the oracle's lines, and a classification."""
    if not d.exists():
        return {"status": "not-run"}
    rc_file = d / "restore-exit"
    rc = int(rc_file.read_text().strip() or "-1") if rc_file.exists() else -1
    lines = []
    if (d / "result").exists():
        for line in (d / "result").read_text().splitlines():
            try:
                lines.append(json.loads(line))
            except json.JSONDecodeError:
                lines.append({"unparsed": line})
    checks = [x for x in lines if "kind" in x]
    signals = [x for x in lines if x.get("event") == "signal"]
    lost = sorted({f"{c['kind']}{c['level']}@{c['tid']}:{r}" for c in checks for r in c.get("lost", [])})
    out: dict[str, Any] = {"restore_exit": rc, "checks": len(checks), "done": (d / "done").exists()}
    if rc != 0:
        out["status"] = "restore-failed"
        log = d / "restore.log"
        errs = (
            [x for x in log.read_text(errors="replace").splitlines() if "Error" in x] if log.exists() else []
        )
        generic = ("Restoring FAILED", "Killing processes because of failure")
        errs = [x for x in errs if not any(g in x for g in generic)] or errs
        out["error"] = errs[0][:300] if errs else ""
    elif signals:
        names = {4: "SIGILL", 6: "SIGABRT", 7: "SIGBUS", 8: "SIGFPE", 11: "SIGSEGV"}
        out["status"] = "killed"
        out["signal"] = names.get(signals[0]["signo"], str(signals[0]["signo"]))
    elif not out["done"]:
        out["status"] = "died" if not (d / "still-running").exists() else "hung"
    elif lost:
        out["status"] = "lost"
    else:
        out["status"] = "intact" if checks and all(c.get("ok") for c in checks) else "no-checks"
    out["lost"] = lost
    pkru = sorted({f"{c['kind']}{c['level']}@{c['tid']}={c['pkru']}" for c in checks if c.get("pkru")})
    if pkru:
        out["pkru"] = pkru
    return out


def summary(r: dict[str, Any]) -> str:
    s = r.get("status", "?")
    if s == "lost":
        regs = sorted(
            {
                x.split(":", 1)[1].split(".")[0].rstrip("0123456789") + (".hi" if ".hi" in x else "")
                for x in r["lost"]
            }
        )
        return f"lost {'/'.join(regs)} ({len(r['lost'])})"
    if s == "killed":
        return f"killed {r.get('signal')}"
    return str(s)


def true_causes(
    src_start: dict[str, Any], src: dict[str, Any], dst: dict[str, Any], variant: str
) -> set[str]:
    """The refusal codes that name a real reason this checkpoint cannot be restored exactly on dst:
    state the source process holds (vector width, non-default PKRU) that the destination lacks."""
    dxcr0 = int(str(dst.get("xsave", {}).get("xcr0", "0")), 0)
    causes: set[str] = set()
    width = int(src_start.get("width", 0))
    needed = {256: 0x4, 512: 0xE4}.get(width, 0) if width >= 256 else 0
    if needed and dxcr0 & needed != needed:
        causes |= {"COMPONENT_IN_USE_MISSING_ON_DEST", "THREAD_COMPONENT_IN_USE_MISSING_ON_DEST"}
    if variant == "pkeys" and not dxcr0 >> 9 & 1:
        causes |= {"PKRU_IN_USE_DEST_NO_PKEYS", "THREAD_PKRU_IN_USE_DEST_NO_PKEYS"}
    src_xsave = int(str(src.get("xsave", {}).get("user_size", 0))) >= 576
    if src_xsave and int(str(dst.get("xsave", {}).get("user_size", 0))) < 576:  # no XSAVE there
        causes |= {"THREAD_XSAVE_DEST_WITHOUT_XSAVE", "DEST_WITHOUT_XSAVE"}
    mask = int(str(dst.get("xsave", {}).get("mxcsr_mask", "0xffff")), 0)
    if 0xDFC0 & ~mask:  # the oracle's MXCSR values use bits 6, 7-12, 13-15
        causes.add("MXCSR_UNSUPPORTED_BITS")
    return causes


def known_gap(cell: dict[str, Any]) -> bool:
    """A miss of THREAD_PKRU_MISSING_OPENS_KEYS, named as such: threads in no handler, from a source
    without protection keys, restored on a destination with them, run with PKRU 0 (CRIU restores no
    PKRU component; 0 opens every key) while everything else is intact."""
    applied = cell.get("applied", {})
    lost = applied.get("lost", [])
    return (
        applied.get("status") == "lost"
        and cell.get("source_oracle", {}).get("pku") is False
        and bool(lost)
        and all(x.startswith("idle") and x.endswith(":pkru") for x in lost)
        and all(v.endswith("=0x00000000") for v in applied.get("pkru", []) if v.startswith("idle"))
    )


def judge(cell: dict[str, Any]) -> tuple[str, str]:
    """(outcome, why): pass, fail, or not-run (the cell could not be run here: no KVM guest; a
    destination without XSAVE, which criu-xstate cannot describe and CRIU refuses to restore to)."""
    verdict = cell.get("verdict")
    applied, control = cell.get("applied", {}), cell.get("control", {})
    if cell.get("skipped"):
        return "not-run", str(cell["skipped"])
    if verdict == "refuse":
        refusing = {c for c, s in cell["codes"].items() if s == "refuse"}
        causes = set(cell["true_causes"])
        if not cell.get("apply_wrote_nothing"):
            return "fail", "refused, but apply changed files"
        if not refusing & causes:
            return "fail", f"refused without a true cause ({', '.join(sorted(refusing))})"
        if refusing - causes:
            return (
                "fail",
                f"refused with codes beyond the true cause ({', '.join(sorted(refusing - causes))})",
            )
        return "pass", "refused, true cause: " + ", ".join(sorted(refusing))
    if verdict in ("compatible", "translate"):
        if applied.get("status") == "intact":
            if cell["true_causes"]:
                return "fail", f"not refused although {', '.join(sorted(cell['true_causes']))}"
            return "pass", "intact after apply (control " + summary(control) + ")"
        note = (
            " (idle threads from a CPU without pkeys run with PKRU 0: THREAD_PKRU_MISSING_OPENS_KEYS missed)"
            if known_gap(cell)
            else ""
        )
        if cell.get("applied_identical") and summary(control) != summary(applied):
            note += (
                " (not reproducible: the applied copy is byte-identical to the control, which gave"
                f" {summary(control)})"
            )
        return "fail", f"after apply: {summary(applied)}{note}"
    if str(cell.get("plan_error", "")).startswith("destination profile") and control.get("status") == (
        "restore-failed"
    ):
        return "not-run", (
            f"no destination profile ({cell['plan_error'].split('error: ')[-1]}); "
            f"CRIU refuses the restore itself: {control.get('error', '').split(': ', 1)[-1]}"
        )
    return "fail", f"plan failed: {cell.get('plan_error', verdict)}"


# ---------------------------------------------------------------- the run


def kernel_of(cpu: str, kernel: str) -> str:
    """The kernel a CPU runs in a cell: a guest's is the cell's, this machine's its own."""
    return "here" if cpu == HOST else kernel


def guest_key(cpu: str, kernel: str) -> str:
    return f"{cpu}@{kernel_of(cpu, kernel)}"


@dataclass
class Run:
    cells: list[Cell]
    work: Path
    subset: str
    guests: dict[str, dict[str, Any]] = field(default_factory=dict)
    results: list[dict[str, Any]] = field(default_factory=list)
    skipped_cpus: dict[str, str] = field(default_factory=dict)
    boots: list[dict[str, Any]] = field(default_factory=list)
    host_windows: dict[str, int] = field(default_factory=dict)

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def execute(self) -> None:
        start = time.monotonic()
        self.work.mkdir(parents=True, exist_ok=True)
        bins = build_binaries(self.work / "bin")
        files = {ORACLE: bins["oracle"], "bin/probe-dump": bins["probe-dump"]}
        if any("kvm" in (c.src, c.dst) for c in self.cells):
            why = kvm_usable(bins, self.work)
            if why:
                self.skipped_cpus["kvm"] = why
                self.log(f"KVM cells not runnable: {why}")
        here_restores = {c.src for c in self.cells if c.dst == HOST}
        here_dumps = {HOST} if any(c.src == HOST for c in self.cells) else set()
        self.host_windows = host_pid_windows(sorted(here_restores | here_dumps))
        # phase 1: sources and profiles (this machine once, whatever the guests' kernel)
        configs: dict[tuple[str, str], list[str]] = {}
        for c in self.cells:
            if "kvm" in self.skipped_cpus and "kvm" in (c.src, c.dst):
                continue
            src = (c.src, kernel_of(c.src, c.kernel))
            configs.setdefault(src, [])
            if c.variant not in configs[src]:
                configs[src].append(c.variant)
            configs.setdefault((c.dst, kernel_of(c.dst, c.kernel)), [])
        for (cpu, kernel), variants in sorted(configs.items()):
            key = f"{cpu}@{kernel}"
            where = self.work / "src" / key
            self.log(f"source {key}: dump {variants or 'nothing (profile only)'}")
            pids = {v: pid_base(cpu, kernel, v, self.host_windows) for v in variants}
            g = boot(
                CPUS[cpu],
                kernel,
                source_scenario(variants, pids),
                files,
                where,
                120 + 60 * len(variants),
            )
            self.boots.append({"guest": key, "role": "source", "seconds": round(g.seconds, 1)})
            profile, profile_error = profile_of(g.out / "probe.txt", key, where / "profile.yaml")
            if profile_error:
                self.log(f"no profile for {key}: {profile_error}")
            self.guests[key] = {
                "cpu": cpu,
                "qemu_cpu": CPUS[cpu].qemu,
                "accel": CPUS[cpu].accel,
                "kernel": kernel,
                "dmesg_xstate": g.xstate_line.strip(),
                "profile": profile,
                "profile_error": profile_error,
                "probe": (g.out / "probe.txt").read_text() if (g.out / "probe.txt").exists() else "",
                "profile_path": str(where / "profile.yaml"),
                "out": str(g.out),
                "log": g.log[-4000:],
            }
        # phase 2: plan and apply here
        by_dest: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for c in self.cells:
            cell: dict[str, Any] = {"id": c.id, **asdict(c)}
            self.results.append(cell)
            if c.src in self.skipped_cpus or c.dst in self.skipped_cpus:
                cell["skipped"] = self.skipped_cpus.get(c.src) or self.skipped_cpus[c.dst]
                continue
            sg, dg = self.guests[guest_key(c.src, c.kernel)], self.guests[guest_key(c.dst, c.kernel)]
            srcdir = Path(sg["out"]) / "src" / c.variant
            oracle_start = _start_event(srcdir)
            cell["source_oracle"] = oracle_start
            if not (srcdir / "images").is_dir():
                cell["skipped"] = (
                    f"the oracle did not run in {c.variant} mode on {c.src} ({sg['log'][-200:]})"
                )
                continue
            cell["truth"] = [json.loads(p.read_text()) for p in sorted(srcdir.glob("truth-*.json"))]
            cell["true_causes"] = sorted(true_causes(oracle_start, sg["profile"], dg["profile"], c.variant))
            images = srcdir / "images"
            pid = int((srcdir / "pid").read_text().split()[0])
            if dg["profile_error"]:  # nothing to plan against: the control alone shows what happens
                cell.update(
                    verdict="error", plan_error=f"destination profile: {dg['profile_error']}", codes={}
                )
                by_dest.setdefault((c.dst, c.kernel), []).append(
                    {"cell": cell, "kind": "control", "images": images, "pid": pid, "variant": c.variant}
                )
                continue
            before = tree_digest(images)
            rc, out, err = cli("plan", str(images), "--dest", dg["profile_path"], "--json")
            cell["plan_exit"] = rc
            try:
                plan = json.loads(out)
                cell["verdict"] = plan["verdict"]
                cell["codes"] = codes_of(plan)
                cell["frames"] = [
                    {
                        k: f.get(k)
                        for k in ("stack", "live", "depth", "xfeatures", "xstate_size", "action", "target")
                    }
                    for t in plan.get("threads", [])
                    for f in t.get("frames", [])
                ]
            except (json.JSONDecodeError, KeyError):
                cell["verdict"] = "error"
                cell["plan_error"] = (err or out).strip()[-300:]
                cell["codes"] = {}
            celldir = self.work / "cells" / c.id
            shutil.rmtree(celldir, ignore_errors=True)
            celldir.mkdir(parents=True)
            applied = celldir / "applied"
            rc, out, err = cli(
                "apply",
                str(images),
                "--dest",
                dg["profile_path"],
                "--out",
                str(applied),
                "--self-contained",
                "--json",
            )
            cell["apply_exit"] = rc
            cell["apply_error"] = err.strip()[-300:]
            cell["apply_wrote_nothing"] = not applied.exists() and tree_digest(images) == before
            cell["applied_identical"] = applied.is_dir() and tree_digest(applied) == before
            cell["source_unchanged"] = tree_digest(images) == before
            runs = [("control", images)]
            if rc == 0 and applied.is_dir():
                runs.append(("applied", applied))
            for kind, d in runs:
                by_dest.setdefault((c.dst, c.kernel), []).append(
                    {"cell": cell, "kind": kind, "images": d, "pid": pid, "variant": c.variant}
                )
        # phase 3: destinations
        for (cpu, kernel), runs_ in sorted(by_dest.items()):
            key = f"{cpu}@{kernel}"
            where = self.work / "dst" / key
            dfiles = dict(files)
            guest_runs = []
            for i, r in enumerate(runs_):
                name = f"{i:03d}-{r['cell']['id']}-{r['kind']}"
                dfiles[f"in/{name}"] = r["images"]
                guest_runs.append((name, f"/in/{name}", r["pid"], r["variant"]))
            self.log(f"destination {key}: {len(runs_)} restores")
            try:
                g = boot(CPUS[cpu], kernel, dest_scenario(guest_runs), dfiles, where, 180 + 25 * len(runs_))
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                for r in runs_:
                    r["cell"][r["kind"]] = {"status": "guest-failed", "error": str(e)[:300]}
                continue
            self.boots.append({"guest": key, "role": "destination", "seconds": round(g.seconds, 1)})
            dmesg = (
                (g.out / "dmesg-all.txt").read_text(errors="replace")
                if (g.out / "dmesg-all.txt").exists()
                else ""
            )
            for (name, _, pid, _), r in zip(guest_runs, runs_, strict=True):
                res = read_result(g.out / "dst" / name)
                kern = [x.strip() for x in dmesg.splitlines() if f"[{pid}]" in x or f" {pid} " in x]
                if kern:
                    res["dmesg"] = kern[:3]
                r["cell"][r["kind"]] = res
        for cell in self.results:
            cell["outcome"], cell["why"] = judge(cell)
            cell["pass"] = cell["outcome"] == "pass"
        self.seconds = time.monotonic() - start
        self.log(
            f"done: {sum(c['pass'] for c in self.results)}/{len(self.results)} pass in {self.seconds:.0f} s"
        )

    def report(self) -> dict[str, Any]:
        crit = subprocess.run(
            [str(CACHE / "criu-4.1.1" / "criu"), "--version"], capture_output=True, text=True
        )
        qv = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
        cpu = next(
            (
                x.split(":", 1)[1].strip()
                for x in Path("/proc/cpuinfo").read_text().splitlines()
                if x.startswith("model name")
            ),
            "?",
        )
        rc, js, _ = cli("probe", "--json", "--name", "runner")
        here = json.loads(js) if rc == 0 else {}
        return {
            "schema": "criu-xstate/matrix/v1",
            "subset": self.subset,
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round(getattr(self, "seconds", 0.0)),
            "machine": {
                "cpu": cpu,
                "xcr0": here.get("xsave", {}).get("xcr0"),
                "user_size": here.get("xsave", {}).get("user_size"),
                "kernel": platform.release(),
                "cores": os.cpu_count(),
            },
            "qemu": qv.stdout.splitlines()[0] if qv.stdout else "?",
            "criu": " ".join(crit.stdout.split()) or "?",
            "skipped_cpus": self.skipped_cpus,
            "guests": {
                k: {kk: v[kk] for kk in ("cpu", "qemu_cpu", "accel", "kernel", "dmesg_xstate")}
                | {"profile": _profile_brief(v["profile"]), "profile_error": v["profile_error"]}
                for k, v in sorted(self.guests.items())
            },
            "boots": self.boots,
            "cells": self.results,
            "passed": sum(c["outcome"] == "pass" for c in self.results),
            "failed": sum(c["outcome"] == "fail" for c in self.results),
            "not_run": sum(c["outcome"] == "not-run" for c in self.results),
            "known_gap": sum(c["outcome"] == "fail" and known_gap(c) for c in self.results),
        }


def _start_event(srcdir: Path) -> dict[str, Any]:
    p = srcdir / "result"
    for line in p.read_text().splitlines() if p.exists() else []:
        try:
            x = json.loads(line)
        except json.JSONDecodeError:
            continue
        if x.get("event") == "start":
            return dict(x)
    return {}


def host_profile_brief() -> dict[str, Any]:
    """This machine's profile, in brief (``probe``)."""
    rc, js, _ = cli("probe", "--json", "--name", HOST)
    return _profile_brief(json.loads(js)) if rc == 0 else {}


def _profile_brief(p: dict[str, Any]) -> dict[str, Any]:
    xs = p.get("xsave", {})
    k = p.get("kernel", {})
    return {
        "xcr0": xs.get("xcr0"),
        "user_size": xs.get("user_size"),
        "mxcsr_mask": xs.get("mxcsr_mask"),
        "pkru_offset": (xs.get("components", {}) or {})
        .get("9", (xs.get("components", {}) or {}).get(9, {}))
        .get("offset")
        if xs.get("components")
        else None,
        "release": k.get("release"),
        "sigreturn": k.get("sigreturn"),
        "sigreturn_source": k.get("sigreturn_source"),
        "vendor": p.get("cpu", {}).get("vendor"),
    }


# ---------------------------------------------------------------- docs/matrix.md


WHY = """\
## Why these cells

Every QEMU CPU model is a destination once per kernel, with a source chosen to differ from it in XSAVE
state, so that the pairs together take the distinct paths of the product and of the kernel:

- `avx -> max`: 832 B (0x7) into 2696 B with PKRU. A pkeys destination and a frame without PKRU
  (PKRU_MISSING_OPENS_KEYS: the default is carried); on 6.16 magic2 at the user size, image relocated.
- `max -> max-nopku`: 2696 B with PKRU into 1088 B with MPX: shrink, PKRU dropped at its default;
  `pkeys` in use: refusal.
- `max-nopku -> max-nompx`: MPX (0x1f, 1088 B) into PKRU without MPX (0x207, 2696 B): MPX bits
  outside the destination's XCR0 (control: SIGSEGV, bad frame), PKRU carried, relocation.
- `max -> avx`: 2696 B into 832 B: shrink, MPX and PKRU dropped; `pkeys`: refusal.
- `avx -> sse`: YMM in use into XSAVE without AVX (0x3, 576 B): refusal for frames and threads
  (control: SIGILL, or CRIU fails when a thread dies at once).
- `sse -> fx`: XSAVE frames (576 B) into a CPU without XSAVE: criu-xstate cannot describe it and CRIU
  refuses the restore itself.
- `fx -> max`: FXSAVE-only frames (no XSAVE header) into a pkeys CPU: what sigreturn does with PKRU.
- `max -> kvm`, `kvm -> avx`: Intel layout into the host vendor's layout, AVX-512: only where a KVM
  guest boots.
- `max -> host`, `host -> max-nompx`: this machine itself, no QEMU (its own kernel for the restore or
  the dump, whatever the cell's guest kernel): Intel's layout (MPX hole, PKRU at 2688) into this CPU's
  vendor layout and back. What these cells show depends on the CPU the matrix runs on (AMD with pkeys:
  PKRU moves to 2432, COMPONENT_OFFSET_MOVED; AVX-512 in use on the source: refusal); the judge takes
  its expectation from the profiles probed, never from a fixed CPU.

The `pkeys` variant needs a source with protection keys: `max` (for `max` as destination, `max-nompx`,
so the source still differs). Variants: `single` (one SA_SIGINFO handler), `threads` (three threads,
each in its handler), `nested` (a second signal inside the handler), `altstack` (handler on a
sigaltstack), `stale` (the handler returned: its frame lies below SP), `pkeys` (non-default PKRU via
pkey_alloc + write-disable), `nohandler` (no frame at all). Every variant also has an `idle` thread in
no handler whose registers and current PKRU CRIU restores from core-*.img.

A cell passes when the copy written by `apply` restores with every register the oracle holds intact,
or when the plan refused with a code naming the true cause (vector state in use that the destination
lacks, a non-default PKRU on a destination without pkeys) and `apply` wrote nothing. The control (the
unmodified dump) shows what the destination kernel does without criu-xstate.
"""


def _pair_rows(cells: list[dict[str, Any]]) -> list[str]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for c in cells:
        groups.setdefault((c["src"], c["dst"], c["kernel"]), []).append(c)
    rows = []
    for (src, dst, kernel), cs in groups.items():

        def uniq(values: list[str]) -> str:
            return ", ".join(sorted(set(values))) or "-"

        controls = uniq([summary(c["control"]).split(" (")[0] for c in cs if "control" in c])
        verdicts = uniq([c.get("verdict", "-") for c in cs if not c.get("skipped")])
        after = uniq(
            [summary(c["applied"]).split(" (")[0] for c in cs if "applied" in c]
            + ["refused" for c in cs if c.get("verdict") == "refuse"]
        )
        n = {o: sum(c["outcome"] == o for c in cs) for o in ("pass", "fail", "not-run")}
        rows.append(
            f"| {src} -> {dst} | {kernel} | {len(cs)} | {controls} | {verdicts} | {after} |"
            f" {n['pass']} | {n['fail']} | {n['not-run']} |"
        )
    return rows


def render_md(rep: dict[str, Any], notes: str = "") -> str:
    cells = rep["cells"]
    m = rep["machine"]
    dur = f"{rep['seconds'] // 60} min {rep['seconds'] % 60} s"
    out = [
        "# The cross-CPU proof matrix",
        "",
        "Generated by `python -m tests.matrix` (tests/matrix.py; how to run it: docs/qemu-guests.md).",
        "Each cell: a checkpoint of the oracle workload (tests/workloads/oracle.c) taken by CRIU in a QEMU",
        "guest (source CPU model, kernel) or on this machine (`host`), planned and applied here for the",
        "destination's profile (probe-dump there, `probe --from-dump`), and restored at the destination",
        "twice: the unmodified dump (control) and the `apply --out` copy. After every rt_sigreturn and in",
        "every thread, the oracle checks each register the CPU has: XMM, YMM both halves, ZMM and opmask",
        "(AVX-512), MXCSR, x87 control word and st(0), PKRU (RDPKRU).",
        "",
        f"- {rep['date']}, subset `{rep['subset']}`, {dur} (one guest at a time)",
        f"- ran on {m['cpu']} (XCR0 {m['xcr0']}, {m['user_size']} B), Linux {m['kernel']},"
        f" {m['cores']} cores",
        f"- {rep['qemu']}; CRIU {rep['criu'].replace('Version: ', '')}",
        f"- **{len(cells)} cells: {rep['passed']} pass, {rep['failed']} fail"
        f" ({rep['known_gap']} of them the thread-level PKRU gap), {rep['not_run']} not run**",
        "",
    ]
    for cpu, why in rep["skipped_cpus"].items():
        out += [f"- `{cpu}` cells not run: {why}", ""]
    out += [
        "## Summary per pair",
        "",
        "| source -> dest | kernel | cells | control (no apply) | plan | after apply | pass | fail | not run"
        " |",
        "|---|---|---|---|---|---|---|---|---|",
        *_pair_rows(cells),
        "",
        "## Guests, as measured inside each guest",
        "",
        "| guest | -cpu | kernel | XCR0 | size | PKRU at | MXCSR mask | sigreturn | kernel's line |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, g in rep["guests"].items():
        p = g["profile"]
        if g["profile_error"]:
            out.append(
                f"| {k} | `{g['qemu_cpu']}` ({g['accel']}) | {k.split('@')[1]} | none | 512 (FXSAVE) |"
                " - | - | - |"
                f" {g['dmesg_xstate'] or 'no xstate line'}; {g['profile_error']} |"
            )
            continue
        out.append(
            f"| {k} | `{g['qemu_cpu']}` ({g['accel']}) | {p['release']} | {p['xcr0']} | {p['user_size']} |"
            f" {p['pkru_offset'] or '-'} | {p['mxcsr_mask']} | {p['sigreturn']} ({p['sigreturn_source']}) |"
            f" {g['dmesg_xstate'].replace('x86/fpu: ', '')} |"
        )
    out += ["", WHY, "## Cells", ""]
    out += [
        "| cell | frames | control (no apply) | plan | codes | after apply | outcome |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in cells:
        frames = ", ".join(f"{f['xstate_size']}" for f in c.get("frames", []) if f.get("live")) or "-"
        codes = " ".join(f"`{k}`" for k in sorted(c.get("codes", {}))) or "-"
        refused = c.get("verdict") == "refuse"
        applied = summary(c["applied"]) if "applied" in c else ("not written" if refused else "-")
        control = summary(c["control"]) if "control" in c else "-"
        outcome = {"pass": "PASS", "fail": "**FAIL**", "not-run": "not run"}[c["outcome"]]
        if c["outcome"] != "pass":
            outcome += ": " + c["why"]
        out.append(
            f"| {c['id']} | {frames} | {control} | {c.get('verdict', '-')} | {codes} | {applied} |"
            f" {outcome} |"
        )
    fails = [c for c in cells if c["outcome"] == "fail"]
    out += ["", "## Failures in detail", ""]
    if not fails:
        out.append("None.")
    for c in fails:
        ap = c.get("applied", {})
        out.append(
            f"- `{c['id']}`: {c['why']}. Codes: {', '.join(sorted(c.get('codes', {}))) or 'none'}."
            f" Oracle after apply: lost {', '.join(ap.get('lost', [])) or '-'};"
            f" PKRU {', '.join(ap.get('pkru', []))}."
        )
    if notes:
        out += ["", notes.rstrip()]
    return "\n".join(out) + "\n"


def notes_for(out: Path) -> str:
    """Hand-written findings kept beside the generated table (OUT.notes.md), appended to OUT.md."""
    p = out.with_suffix(".notes.md")
    return p.read_text() if p.exists() else ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.matrix", description=__doc__.split("\n\n")[0])
    ap.add_argument("--subset", choices=("full", "ci"), default="full")
    ap.add_argument("--out", default=str(REPO / "docs" / "matrix"), help="writes OUT.json and OUT.md")
    ap.add_argument("--work", default="/tmp/criu-xstate-matrix", help="guests, dumps, applied copies")
    ap.add_argument("--cells", default="", help="only cells whose id matches this regular expression")
    ap.add_argument("--no-kvm", action="store_true", help="leave out the KVM -cpu host cells")
    ap.add_argument("--render", metavar="JSON", help="only write OUT.md again from a matrix JSON")
    args = ap.parse_args(argv)
    if args.render:
        rep = json.loads(Path(args.render).read_text())
        Path(args.out).with_suffix(".md").write_text(render_md(rep, notes_for(Path(args.out))))
        return 0
    reason = qemu_guest.skip_reason()
    if reason:
        print(reason, file=sys.stderr)
        return 2
    cells = ci_cells() if args.subset == "ci" else full_cells(not args.no_kvm)
    if args.cells:
        cells = [c for c in cells if re.search(args.cells, c.id)]
    run = Run(cells, Path(args.work), args.subset)
    run.execute()
    rep = run.report()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(rep, indent=1, sort_keys=False) + "\n")
    out.with_suffix(".md").write_text(render_md(rep, notes_for(out)))
    return 0 if rep["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
