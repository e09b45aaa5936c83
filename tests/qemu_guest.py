"""Run real CRIU inside a QEMU guest whose CPU has other XSAVE features than this machine.

The guest is Debian bookworm's 6.1 cloud kernel booted straight into an initramfs built here (newc
cpio written in Python): busybox, trixie's CRIU 4.1.1 prefix (the same one the host uses), the static
workloads and probe-dump, the netfilter/diag modules CRIU's feature checks need, and an ``/init`` that
runs a scenario script and sends ``/out`` back as a base64 tar on the serial console between marker
lines, then powers off. Traps (research/qemu-criu-notes.md): loopback must be up, nf_tables loaded,
the workload a session leader, guest pids kept clear of the host's, and guest workloads run as an
unprivileged uid (a guest root task holds CAP_SYS_RESOURCE, which this host cannot grant on restore).
"""

from __future__ import annotations

import base64
import io
import lzma
import os
import re
import shutil
import stat
import subprocess
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.realcriu import CACHE, REPO, build_workload

GUEST = CACHE / "guest"
KERNEL_META = "linux-image-cloud-amd64"  # bookworm's current 6.1 cloud kernel (frame-size sigreturn rule)
BUSYBOX_PKG = "busybox-static"
BEGIN, END = "===CRIU-XSTATE-OUT-BEGIN===", "===CRIU-XSTATE-OUT-END==="
# Paths shared by guest and host: a restored process reopens its files by path.
SHARED = "/tmp/criu-xstate-qemu"
MODULES = [
    "lib/libcrc32c.ko",
    "net/netfilter/nfnetlink.ko",
    "net/netfilter/nf_tables.ko",
    "net/ipv4/inet_diag.ko",
    "net/ipv4/tcp_diag.ko",
    "net/ipv4/udp_diag.ko",
    "net/ipv4/raw_diag.ko",
    "net/unix/unix_diag.ko",
    "net/netlink/netlink_diag.ko",
    "net/packet/af_packet_diag.ko",
    "drivers/net/tun.ko",
    "drivers/net/veth.ko",
]

INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
/bin/busybox chmod 755 /  # the host restoring guest dumps has a 0755 root
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
mkdir -p /dev/pts /tmp /out
mount -t devpts devpts /dev/pts
ifconfig lo 127.0.0.1 up
for m in $(cat /modules.list); do insmod /mods/$(basename $m) 2>/dev/null; done
echo 4194304 > /proc/sys/kernel/pid_max  # restored host tasks keep their (possibly large) pids
echo "minsigstksz $(grep -c . /proc/self/auxv)" > /dev/null
sh /scenario.sh > /out/scenario.log 2>&1
echo "scenario exit $?" >> /out/scenario.log
dmesg > /out/dmesg.txt
echo
echo ===CRIU-XSTATE-OUT-BEGIN===
tar -C /out -cf - . | base64
echo ===CRIU-XSTATE-OUT-END===
poweroff -f
"""


def skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "QEMU guest tests need root (CRIU dumps)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 not installed (scripts/setup-dev installs it)"
    if not (CACHE / "criu-4.1.1" / "usr" / "sbin" / "criu").exists():
        return "no CRIU prefix: run scripts/get-criu"
    return None


KERNELS = {
    # bookworm's cloud kernel: sigreturn finds magic2 at fpstate + xstate_size ("frame-size")
    "6.1": ("bookworm", r"Depends: (linux-image-\S+)", KERNEL_META),
    # trixie-backports 6.16: inside the dc8aa31a7ac2 window, no revert in its changelog ("user-size")
    "6.16": ("trixie-backports", r"^(linux-image-6\.16\.[0-9]+\+deb13-cloud-amd64) ", "linux-image-6.16"),
}


def _apt_trixie_backports() -> list[str]:
    root = CACHE / "apt-trixie"
    (root / "etc").mkdir(parents=True, exist_ok=True)
    (root / "lists-bp" / "partial").mkdir(parents=True, exist_ok=True)
    (root / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    mirror = subprocess.run(
        [str(REPO / "scripts" / "debian-mirror")], capture_output=True, text=True, check=True
    ).stdout.strip()  # the machine's own Debian archive: no mirror is named in the project
    (root / "etc" / "bp.list").write_text(f"deb {mirror} trixie-backports main\n")
    (root / "status").touch()
    return [
        "-o",
        f"Dir::Etc::sourcelist={root}/etc/bp.list",
        "-o",
        "Dir::Etc::sourceparts=-",
        "-o",
        f"Dir::State::Lists={root}/lists-bp",
        "-o",
        f"Dir::Cache={root}/cache",
        "-o",
        f"Dir::State::status={root}/status",
        "-o",
        "APT::Architecture=amd64",
        "-o",
        "Debug::NoLocking=1",
        "-o",
        "APT::Sandbox::User=root",
    ]


def fetch_guest(kernel: str = "6.1") -> tuple[Path, Path]:
    """A Debian kernel and bookworm's busybox, unpacked under .cache (no change to the system's apt)."""
    suite, pattern, query = KERNELS[kernel]
    guest = GUEST if kernel == "6.1" else CACHE / f"guest-{kernel}"
    root = guest / "root"
    kernels = sorted((root / "boot").glob("vmlinuz-*")) if root.exists() else []
    if not kernels:
        guest.mkdir(parents=True, exist_ok=True)
        if suite == "bookworm":
            opts: list[str] = []
            found = subprocess.run(["apt-cache", "depends", query], capture_output=True, text=True).stdout
        else:
            opts = _apt_trixie_backports()
            subprocess.run(["apt-get", *opts, "-qq", "update"], check=True, capture_output=True)
            found = subprocess.run(
                ["apt-cache", *opts, "search", query], capture_output=True, text=True
            ).stdout
        names = sorted(set(re.findall(pattern, found, re.M)))
        if not names:
            raise RuntimeError(f"no {kernel} kernel package found in {suite} (apt-get update?)")
        subprocess.run(
            ["apt-get", *opts, "download", "-qq", names[-1]], cwd=guest, check=True, capture_output=True
        )
        for deb in guest.glob("linux-image-*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(root)], check=True)
        kernels = sorted((root / "boot").glob("vmlinuz-*"))
    if not (GUEST / "root" / "bin" / "busybox").exists():
        GUEST.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["apt-get", "download", "-qq", BUSYBOX_PKG], cwd=GUEST, check=True, capture_output=True
        )
        for deb in GUEST.glob("busybox*.deb"):
            subprocess.run(["dpkg", "-x", str(deb), str(GUEST / "root")], check=True)
    return kernels[-1], root


def _module_bytes(path: Path) -> bytes:
    data = path.read_bytes()
    return lzma.decompress(data) if path.suffix == ".xz" else data


class _Newc:
    """A cpio "newc" archive, the initramfs format."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.ino = 1
        self.seen: set[str] = set()

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        self.ino += 1
        namez = name.encode() + b"\0"
        hdr = "070701" + "".join(
            f"{v:08x}" for v in (self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(namez), 0)
        )
        self.buf.write(hdr.encode() + namez)
        self.buf.write(b"\0" * (-(110 + len(namez)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        parts = name.strip("/").split("/")
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self.seen:
                self.seen.add(d)
                self._entry(d, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o755) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        name = name.strip("/")
        self.dir(os.path.dirname(name))
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def tree(self, src: Path, dest: str) -> None:
        for path in sorted(src.rglob("*")):
            rel = f"{dest.strip('/')}/{path.relative_to(src)}"
            if path.is_symlink():
                self.symlink(rel, os.readlink(path))
            elif path.is_dir():
                self.dir(rel)
            else:
                self.file(rel, path.read_bytes(), path.stat().st_mode & 0o777)

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initramfs(scenario: str, files: dict[str, Path], out: Path, kernel: str = "6.1") -> Path:
    _, root = fetch_guest(kernel)
    moddir = next(p for p in (root / "lib" / "modules", root / "usr" / "lib" / "modules") if p.is_dir())
    kver = next(moddir.iterdir()).name
    cpio = _Newc()
    for d in ("proc", "sys", "dev", "tmp", "out", "mods", "root", "in", SHARED):
        cpio.dir(d)
    cpio.file("bin/busybox", (GUEST / "root" / "bin" / "busybox").read_bytes())
    cpio.file("init", INIT.encode())
    cpio.file("scenario.sh", scenario.encode())
    prefix = CACHE / "criu-4.1.1"
    cpio.tree(prefix / "usr" / "lib" / "x86_64-linux-gnu", "criu/usr/lib/x86_64-linux-gnu")
    cpio.file("criu/usr/sbin/criu", (prefix / "usr" / "sbin" / "criu").read_bytes())
    cpio.file("criu/criu", (prefix / "criu").read_bytes())
    cpio.file("etc/passwd", b"root:x:0:0::/root:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n", 0o644)
    cpio.file("etc/group", b"root:x:0:\nuser:x:1000:\n", 0o644)
    mods = []
    for m in MODULES:
        for src in (moddir / kver / "kernel" / m, moddir / kver / "kernel" / f"{m}.xz"):
            if src.exists():
                cpio.file(f"mods/{Path(m).name}", _module_bytes(src), 0o644)
                mods.append(Path(m).name)
    cpio.file("modules.list", "\n".join(mods).encode() + b"\n", 0o644)
    for dest, src in files.items():
        if src.is_dir():
            cpio.tree(src, dest)
        else:
            cpio.file(dest, src.read_bytes(), 0o755)
    out.write_bytes(cpio.finish())
    return out


@dataclass
class GuestResult:
    out: Path
    console: str
    seconds: float

    @property
    def xstate_line(self) -> str:
        m = re.search(r"x86/fpu: Enabled xstate features .*", self.console + self.dmesg)
        return m.group(0) if m else ""

    @property
    def dmesg(self) -> str:
        p = self.out / "dmesg.txt"
        return p.read_text(errors="replace") if p.exists() else ""

    @property
    def log(self) -> str:
        p = self.out / "scenario.log"
        return p.read_text(errors="replace") if p.exists() else ""


def run_guest(
    scenario: str,
    files: dict[str, Path],
    workdir: Path,
    *,
    cpu: str = "max",
    accel: str = "tcg",
    timeout: float = 300.0,
    memory: str = "1G",
    kernel_version: str = "6.1",
) -> GuestResult:
    kernel, _ = fetch_guest(kernel_version)
    workdir.mkdir(parents=True, exist_ok=True)
    initrd = build_initramfs(scenario, files, workdir / "initrd.cpio", kernel_version)
    cmd = [
        "qemu-system-x86_64",
        "-accel",
        accel,
        "-cpu",
        cpu,
        "-m",
        memory,
        "-smp",
        "1",
        "-nographic",
        "-no-reboot",
        "-kernel",
        str(kernel),
        "-initrd",
        str(initrd),
        "-append",
        "console=ttyS0 panic=-1 quiet loglevel=4",
    ]
    start = time.monotonic()
    r = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    console = r.stdout.decode(errors="replace").replace("\r", "")
    seconds = time.monotonic() - start
    (workdir / "console.log").write_text(console)
    m = re.search(re.escape(BEGIN) + r"\n(.*?)\n" + re.escape(END), console, re.S)
    out = workdir / "out"
    if m is None:
        raise RuntimeError(
            f"guest produced no output tar (exit {r.returncode}); console tail:\n{console[-3000:]}"
        )
    data = base64.b64decode("".join(m.group(1).split()))
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        tar.extractall(out, filter="data")
    return GuestResult(out, console, seconds)


PID_WINDOW = 400


def free_pid_window(avoid: Sequence[int] = ()) -> int:
    """A pid from which PID_WINDOW pids are free here and will stay free, so that a guest task created
    there can be restored on this host: just below the host's last pid (the host allocates upwards
    and comes back only after wrapping at its pid_max, often 32768), else just below pid_max. Windows
    starting at ``avoid`` (handed out already) are skipped."""
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    below = range(last - PID_WINDOW - 100, 300, -PID_WINDOW)
    ahead = range(pid_max - PID_WINDOW - 1, last + 5000, -PID_WINDOW)
    for base in (*below, *ahead):
        if any(abs(base - a) < PID_WINDOW for a in avoid):
            continue
        if not any(Path(f"/proc/{p}").exists() for p in range(base, base + PID_WINDOW)):
            return int(base)
    raise RuntimeError("no free window of pids on this host for guest workloads")


def dump_scenario(mode: str = "siginfo", seed: int = 11) -> str:
    """Start the workload as uid 1000 inside its handler, dump it with CRIU, keep its ground truth."""
    return f"""
W={SHARED}/wl
mkdir -p $W && chown 1000:1000 $W
/bin/probe-dump > /out/probe.txt
echo {free_pid_window()} > /proc/sys/kernel/ns_last_pid
su -s /bin/sh user -c "setsid {SHARED}/bin/ymm_handler $W {seed} {mode} </dev/null >/dev/null 2>&1 &"
for i in $(seq 1 300); do [ -e $W/ready ] && break; sleep 0.1; done
sleep 0.2
PID=$(pidof ymm_handler)
echo "workload pid $PID"
mkdir -p /out/images
/criu/criu dump -t $PID -D /out/images -o dump.log -v4
echo "dump exit $?"
cp $W/truth-*.json /out/ 2>/dev/null
"""


def guest_files() -> dict[str, Path]:
    probe = CACHE / "workloads" / "probe-dump"
    src = REPO / "contrib" / "probe-dump" / "probe-dump.c"
    if not probe.exists() or probe.stat().st_mtime < src.stat().st_mtime:
        probe.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["gcc", "-static", "-O2", "-o", str(probe), str(src)], check=True, capture_output=True)
    return {f"{SHARED}/bin/ymm_handler": build_workload(), "bin/probe-dump": probe}


def restore_scenario(pid: int) -> str:
    """Restore /in/images as root, release the workload, bring its OK/CORRUPT lines out."""
    return f"""
W={SHARED}/wl
mkdir -p $W && chown 1000:1000 $W  # a workload dumped as uid 1000 writes its result there
/bin/probe-dump > /out/probe.txt
/criu/criu restore -D /in/images -d -o /out/restore.log -v4
echo "restore exit $?"
kill -USR2 {pid}
for i in $(seq 1 200); do [ -e $W/done ] && break; [ -d /proc/{pid} ] || break; sleep 0.1; done
cp $W/result /out/result 2>/dev/null
[ -e $W/done ] && echo "workload done"
"""
