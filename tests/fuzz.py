"""A fuzzer over the real committed CRIU dumps, the shipped host profiles and checkpoint archives.

Targets: every image kind of every fixture (inventory, pstree, core, mm, pagemap, pages through the
address space, and a cpuinfo.img added to a fixture copy), profiles (byte mutations and structured ones:
wrong types, huge numbers, impossible hosts, YAML aliases, tags, duplicate keys, deep nesting) and
archives (byte mutations and structured ones: `..`, absolute paths, links, devices, duplicates, sparse
members, header and size bombs; tar, gzip or zstd). Each input goes through the real entry points
in-process (``show`` and ``plan`` of a checkpoint, ``plan --dest`` of a profile, ``show`` of an archive),
text or JSON, under a per-input guard: a 10 s alarm, an address-space limit of 1 GiB above the current
size, a 1 GiB file-size limit, and a private temporary directory that must be empty afterwards.

Accepted outcomes: exit 0 or 1, or exit 2 with one line on stderr, and no terminal control character in
either stream. Anything else (exit 3, a traceback, two lines, a timeout, MemoryError, a leaked temporary
file, an escape sequence reaching the terminal) is a finding, saved under the corpus directory given
(tests/fuzz/corpus/ for scripts/fuzz, a temporary one in the suite) and replayed by every test run once
committed. Used by tests/test_fuzz.py (fixed time budget) and scripts/fuzz (long campaigns).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import re
import resource
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from criu_xstate.cli import main
from tests.fuzz_inputs import (
    cpuinfo_image,
    fixture_archive,
    hostile_archive,
    hostile_profile,
    mutate,
)

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CORPUS = REPO / "tests" / "fuzz" / "corpus"
PROFILES = REPO / "criu_xstate" / "data" / "hosts"
DEST = str(PROFILES / "amd-zen4.yaml")
TIMEOUT = 10
MAX_SAVED = 20  # findings saved per campaign: a broken tree must not flood the corpus
MEMORY_HEADROOM = 1 << 30
FILE_SIZE_LIMIT = 1 << 30
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

__all__ = ["campaign", "mutate", "replay_corpus", "report"]


class Hang(Exception):
    pass


def _vm_size() -> int:
    text = Path("/proc/self/status").read_text()
    match = re.search(r"VmSize:\s+(\d+) kB", text)
    return int(match.group(1)) * 1024 if match else 0


@contextlib.contextmanager
def _limit(which: int, soft: int) -> Iterator[None]:
    old_soft, hard = resource.getrlimit(which)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(which, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(which, (old_soft, hard))


@contextlib.contextmanager
def guard(seconds: int, tmp: Path) -> Iterator[None]:
    """One input's budget: time, memory, file size, and its temporary files."""

    def fire(signo: int, frame: object) -> None:
        raise Hang(f"no answer within {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        with (
            _limit(resource.RLIMIT_AS, _vm_size() + MEMORY_HEADROOM),
            _limit(resource.RLIMIT_FSIZE, FILE_SIZE_LIMIT),
        ):
            yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    left = sorted(p.name for p in tmp.iterdir())
    if left:
        for p in tmp.iterdir():
            shutil.rmtree(p, ignore_errors=True)
        raise Hang(f"left temporary files behind: {left[:3]}")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return int(rc), out.getvalue(), err.getvalue()


def verdict_of(rc: int, out: str, err: str) -> str | None:
    """None when the outcome is acceptable, else what is wrong."""
    if CONTROL.search(out) or CONTROL.search(err):
        return f"a control character reaches the terminal: {(out + err)[:200]!r}"
    if rc in (0, 1):
        return None
    if rc != 2:
        return f"exit {rc}: {err.strip()[:300]}"
    if err.count("\n") != 1 or not err.startswith("criu-xstate"):
        return f"error not one line: {err[:300]!r}"
    return None


def _run_guarded(work: Path, commands: list[list[str]]) -> str | None:
    tmp = work / "tmp"
    tmp.mkdir(exist_ok=True)
    saved = tempfile.tempdir
    tempfile.tempdir = str(tmp)
    try:
        with guard(TIMEOUT, tmp):
            for argv in commands:
                problem = verdict_of(*run_cli(argv))
                if problem:
                    return f"{argv[0]}: {problem}"
    except (Hang, MemoryError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        tempfile.tempdir = saved
    return None


# -- targets ------------------------------------------------------------------------------------------


@dataclass
class Stats:
    inputs: int = 0
    findings: list[str] = field(default_factory=list)
    by_target: dict[str, int] = field(default_factory=dict)
    seconds_by_target: dict[str, float] = field(default_factory=dict)


def _save(corpus: Path, target: str, name: str, data: bytes) -> Path:
    corpus.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(data).hexdigest()[:16]
    path = corpus / f"{target}--{name.replace('/', '_')}--{digest}.bin"
    path.write_bytes(data)
    return path


def _fmt(as_json: bool) -> list[str]:
    return ["--json"] if as_json else []


def check_image(work: Path, ck: Path, name: str, data: bytes, as_json: bool) -> str | None:
    """Replace image ``name`` of the checkpoint copy ``ck`` by ``data``; show and plan it."""
    target = ck / name
    original = target.read_bytes() if target.exists() else None
    target.write_bytes(data)
    try:
        problem = _run_guarded(
            work, [["show", str(ck), *_fmt(as_json)], ["plan", str(ck), "--dest", DEST, *_fmt(as_json)]]
        )
    finally:
        if original is None:
            target.unlink()
        else:
            target.write_bytes(original)
    return None if problem is None else f"{name}: {problem}"


def check_profile(work: Path, ck: Path, data: bytes, as_json: bool) -> str | None:
    path = work / "profile.yaml"
    path.write_bytes(data)
    problem = _run_guarded(work, [["plan", str(ck), "--dest", str(path), *_fmt(as_json)]])
    return None if problem is None else f"profile: {problem}"


def check_archive(work: Path, data: bytes, as_json: bool) -> str | None:
    path = work / "checkpoint.tar.gz"  # the name is a lie as often as not: the content decides
    path.write_bytes(data)
    problem = _run_guarded(work, [["show", str(path), *_fmt(as_json)]])
    return None if problem is None else f"archive: {problem}"


Input = tuple[str, bytes, Callable[[], str | None]]


class _Targets:
    """The fixtures copied once into ``work``; each method makes one input and its check."""

    def __init__(self, work: Path, rng: random.Random) -> None:
        self.work = work
        self.rng = rng
        self.fixtures = sorted(p for p in FIXTURES.iterdir() if p.is_dir())
        self.copies = {f: work / f.name for f in self.fixtures}
        for f, copy in self.copies.items():
            shutil.copytree(f, copy)
        self.images = [(f, p.name) for f in self.fixtures for p in sorted(f.iterdir()) if p.suffix == ".img"]
        self.images += [(f, "cpuinfo.img") for f in self.fixtures[:2]]
        self.profiles = [p.read_text() for p in sorted(PROFILES.glob("*.yaml"))]
        self.archives = [fixture_archive(f) for f in self.fixtures[:2]]

    def _json(self) -> bool:
        return self.rng.random() < 0.5

    def image(self) -> Input:
        fixture, name = self.rng.choice(self.images)
        seed = cpuinfo_image() if name == "cpuinfo.img" else (fixture / name).read_bytes()
        data, ck, as_json = mutate(seed, self.rng), self.copies[fixture], self._json()
        return f"{fixture.name}/{name}", data, lambda: check_image(self.work, ck, name, data, as_json)

    def profile(self) -> Input:
        seed = self.rng.choice(self.profiles)
        structured = self.rng.random() < 0.5
        data = hostile_profile(seed, self.rng) if structured else mutate(seed.encode(), self.rng)
        ck, as_json = self.copies[self.fixtures[0]], self._json()
        return "profile", data, lambda: check_profile(self.work, ck, data, as_json)

    def archive(self) -> Input:
        if self.rng.random() < 0.5:
            data = mutate(self.rng.choice(self.archives), self.rng)
        else:
            data = hostile_archive(self.rng.choice(self.fixtures), self.rng)
        as_json = self._json()
        return "archive", data, lambda: check_archive(self.work, data, as_json)


def campaign(work: Path, seconds: float, seed: int, corpus: Path = CORPUS) -> Stats:
    """Fuzz every target for about ``seconds`` in all; findings are saved under ``corpus``."""
    rng = random.Random(seed)
    stats = Stats()
    targets = _Targets(work, rng)
    makers: list[tuple[str, Callable[[], Input]]] = [("image", targets.image)] * 5 + [
        ("profile", targets.profile),
        ("profile", targets.profile),
        ("archive", targets.archive),
        ("archive", targets.archive),
    ]
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        kind, make = rng.choice(makers)
        t0 = time.monotonic()
        name, data, check = make()
        problem = check()
        stats.inputs += 1
        stats.by_target[kind] = stats.by_target.get(kind, 0) + 1
        stats.seconds_by_target[kind] = stats.seconds_by_target.get(kind, 0.0) + time.monotonic() - t0
        if problem:
            if len(stats.findings) < MAX_SAVED:
                problem += f" (saved as {_save(corpus, kind, name, data)})"
            stats.findings.append(problem)
    return stats


def replay_corpus(work: Path, corpus: Path = CORPUS) -> list[str]:
    """Every saved finding, run again in both output formats: each must now be handled."""
    problems: list[str] = []
    targets = _Targets(work, random.Random(0))
    by_name = {f.name: f for f in targets.fixtures}
    for path in sorted(corpus.glob("*.bin")):
        kind, name, _ = path.name.split("--")
        data = path.read_bytes()
        for as_json in (False, True):
            if kind == "image":
                fixture, image = name.split("_", 1)
                problem = check_image(work, targets.copies[by_name[fixture]], image, data, as_json)
            elif kind == "profile":
                problem = check_profile(work, targets.copies[targets.fixtures[0]], data, as_json)
            else:
                problem = check_archive(work, data, as_json)
            if problem:
                problems.append(f"{path.name}: {problem}")
    return problems


def report(stats: Stats, seconds: float) -> str:
    return json.dumps(
        {
            "inputs": stats.inputs,
            "per_second": round(stats.inputs / seconds, 1) if seconds else None,
            "by_target": stats.by_target,
            "per_second_by_target": {
                k: round(n / stats.seconds_by_target[k], 1)
                for k, n in stats.by_target.items()
                if stats.seconds_by_target.get(k)
            },
            "findings": stats.findings,
        }
    )
