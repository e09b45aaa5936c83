"""A mutation fuzzer over the real committed CRIU dumps, host profiles and checkpoint archives.

Each input goes through the real entry points in-process (``show`` and ``plan`` of a checkpoint,
``load_profile`` of a profile); the only accepted outcomes are success, a refusal, or one of our
one-line errors (exit 2). An exit 3 (an uncaught exception), a multi-line error, or an input that runs
longer than ``TIMEOUT`` seconds is a finding: it is saved under tests/fuzz/corpus/ (replayed by every
test run from then on) and reported. Used by tests/test_fuzz.py (fixed time budget) and scripts/fuzz.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import shutil
import signal
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from criu_xstate.cli import main
from criu_xstate.errors import ProfileError

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CORPUS = REPO / "tests" / "fuzz" / "corpus"
PROFILES = REPO / "criu_xstate" / "data" / "hosts"
DEST = str(PROFILES / "amd-zen4.yaml")
TIMEOUT = 10
MAX_SAVED = 20  # findings saved per campaign: a broken tree must not flood the corpus


class Hang(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    def fire(signo: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(argv: list[str]) -> tuple[int, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return int(rc), err.getvalue()


def verdict_of(rc: int, err: str) -> str | None:
    """None when the outcome is acceptable, else what is wrong."""
    if rc in (0, 1):
        return None
    if rc != 2:
        return f"exit {rc}: {err.strip()[:300]}"
    if err.count("\n") != 1 or not err.startswith("criu-xstate"):
        return f"error not one line: {err[:300]!r}"
    return None


# -- mutations ----------------------------------------------------------------------------------------


def _varint_bomb(rng: random.Random) -> bytes:
    return b"\xff" * rng.randint(5, 20) + b"\x01"


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(8)
        pos = rng.randrange(len(buf) + 1) if buf else 0
        if kind == 0 and buf:  # bit flips
            i = rng.randrange(len(buf))
            buf[i] ^= 1 << rng.randrange(8)
        elif kind == 1:  # truncation
            del buf[pos:]
        elif kind == 2 and len(buf) >= 4:  # a size field (u32) made huge or off by a little
            i = rng.randrange(0, len(buf) - 3)
            value = rng.choice([0, 1, 0x7FFFFFFF, 0xFFFFFFFF, int.from_bytes(buf[i : i + 4], "little") + 1])
            buf[i : i + 4] = (value & 0xFFFFFFFF).to_bytes(4, "little")
        elif kind == 3:  # a varint bomb
            buf[pos:pos] = _varint_bomb(rng)
        elif kind == 4 and len(buf) >= 8:  # wrong magic
            buf[0:4] = rng.randbytes(4)
        elif kind == 5 and buf:  # random bytes overwritten
            n = rng.randint(1, 16)
            buf[pos : pos + n] = rng.randbytes(n)
        elif kind == 6 and buf:  # a chunk duplicated
            n = rng.randint(1, min(64, len(buf)))
            buf[pos:pos] = buf[max(0, pos - n) : pos]
        elif kind == 7:  # extreme values in a u64
            buf[pos : pos + 8] = rng.choice([b"\xff" * 8, b"\x00" * 8, (1 << 63).to_bytes(8, "little")])
    return bytes(buf)


# -- targets ------------------------------------------------------------------------------------------


@dataclass
class Stats:
    inputs: int = 0
    findings: list[str] = field(default_factory=list)
    by_target: dict[str, int] = field(default_factory=dict)


def _save(target: str, name: str, data: bytes) -> Path:
    CORPUS.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = CORPUS / f"{target}--{name.replace('/', '_')}--{digest}.bin"
    path.write_bytes(data)
    return path


def check_image(work: Path, name: str, data: bytes) -> str | None:
    """Replace image ``name`` of the checkpoint copy ``work`` by ``data``; show and plan it."""
    target = work / name
    original = target.read_bytes()
    target.write_bytes(data)
    try:
        with _deadline(TIMEOUT):
            for argv in (["show", str(work), "--json"], ["plan", str(work), "--dest", DEST, "--json"]):
                problem = verdict_of(*run_cli(argv))
                if problem:
                    return f"{' '.join(argv[:1])} {name}: {problem}"
    except Hang as exc:
        return f"{name}: {exc}"
    finally:
        target.write_bytes(original)
    return None


def check_profile(work: Path, data: bytes) -> str | None:
    from criu_xstate import hosts

    path = work / "profile.yaml"
    path.write_bytes(data)
    try:
        with _deadline(TIMEOUT):
            hosts.load_profile(path)
    except ProfileError as exc:
        if "\n" in str(exc):
            return f"profile: error not one line: {str(exc)[:200]!r}"
    except Hang as exc:
        return f"profile: {exc}"
    except Exception as exc:
        return f"profile: {type(exc).__name__}: {exc}"
    return None


def check_archive(work: Path, data: bytes) -> str | None:
    path = work / "checkpoint.tar.gz"
    path.write_bytes(data)
    try:
        with _deadline(TIMEOUT):
            problem = verdict_of(*run_cli(["show", str(path)]))
    except Hang as exc:
        return f"archive: {exc}"
    return None if problem is None else f"archive: {problem}"


def fixture_archive(fixture: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for p in sorted(fixture.iterdir()):
            if p.is_file():
                tar.add(p, arcname=f"checkpoint/{p.name}")
        info = tarfile.TarInfo("config.dump")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
    return buf.getvalue()


def campaign(work: Path, seconds: float, seed: int) -> Stats:
    """Fuzz every target for about ``seconds`` in all (image kinds get most of the time)."""
    rng = random.Random(seed)
    stats = Stats()
    fixtures = sorted(p for p in FIXTURES.iterdir() if p.is_dir())
    copies: dict[Path, Path] = {}
    for f in fixtures:
        copies[f] = work / f.name
        shutil.copytree(f, copies[f])
    images = [(f, p.name) for f in fixtures for p in sorted(f.iterdir()) if p.suffix == ".img"]
    profiles = [p.read_bytes() for p in sorted(PROFILES.glob("*.yaml"))]
    archives = [fixture_archive(f) for f in fixtures[:2]]
    targets: list[tuple[str, Callable[[], tuple[str, bytes, str | None]]]] = []

    def image_input() -> tuple[str, bytes, str | None]:
        fixture, name = rng.choice(images)
        data = mutate((fixture / name).read_bytes(), rng)
        return f"{fixture.name}/{name}", data, check_image(copies[fixture], name, data)

    def profile_input() -> tuple[str, bytes, str | None]:
        data = mutate(rng.choice(profiles), rng)
        return "profile", data, check_profile(work, data)

    def archive_input() -> tuple[str, bytes, str | None]:
        data = mutate(rng.choice(archives), rng)
        return "archive", data, check_archive(work, data)

    targets = [("image", image_input)] * 6 + [("profile", profile_input), ("archive", archive_input)]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kind, make = rng.choice(targets)
        name, data, problem = make()
        stats.inputs += 1
        stats.by_target[kind] = stats.by_target.get(kind, 0) + 1
        if problem:
            if len(stats.findings) < MAX_SAVED:
                problem += f" (saved as {_save(kind, name, data).name})"
            stats.findings.append(problem)
    return stats


def replay_corpus(work: Path) -> list[str]:
    """Every saved finding, run again: each must now be handled."""
    problems: list[str] = []
    for path in sorted(CORPUS.glob("*.bin")):
        kind, name, _ = path.name.split("--")
        data = path.read_bytes()
        if kind == "image":
            fixture, image = name.split("_", 1)
            copy = work / f"replay-{fixture}"
            if not copy.exists():
                shutil.copytree(FIXTURES / fixture, copy)
            problem = check_image(copy, image, data)
        elif kind == "profile":
            problem = check_profile(work, data)
        else:
            problem = check_archive(work, data)
        if problem:
            problems.append(f"{path.name}: {problem}")
    return problems


def report(stats: Stats, seconds: float) -> str:
    return json.dumps(
        {
            "inputs": stats.inputs,
            "per_second": round(stats.inputs / seconds, 1) if seconds else None,
            "by_target": stats.by_target,
            "findings": stats.findings,
        }
    )
