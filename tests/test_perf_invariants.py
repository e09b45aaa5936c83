"""Issue 13: what plan, apply and the hook cost, as counts rather than timings (bench/ has the times).

- the compact pagemap decoder (criu_xstate/images/pagemap.py) agrees with protobuf, entry by entry
  and image by image, on arbitrary and on CRIU-shaped input, and refuses what the old decoder refused;
- each pagemap is decoded once per command;
- bytes read and bytes written do not grow with the checkpoint's memory; lookups per thread are
  bounded.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.synth import build
from criu_xstate.cli import main
from criu_xstate.errors import ImageError
from criu_xstate.images import framing
from criu_xstate.images import pagemap as pm
from criu_xstate.images.addrspace import AddressSpace
from criu_xstate.images.framing import IMG_COMMON_MAGIC, PAGEMAP, encode_image
from criu_xstate.images.pb import pagemap_pb2

DEST = str(Path(__file__).parents[1] / "criu_xstate" / "data" / "hosts" / "intel-icelake-sp.yaml")
FIELDS = ("vaddr", "compat_nr_pages", "in_parent", "flags", "nr_pages")


def _pb_fields(payload: bytes) -> tuple[int | None, ...] | None:
    e = pagemap_pb2.pagemap_entry()
    try:
        e.ParseFromString(payload)
    except Exception:
        return None
    return tuple(int(getattr(e, f)) if e.HasField(f) else None for f in FIELDS)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


field_bytes = st.tuples(st.sampled_from([0x08, 0x10, 0x18, 0x20, 0x28]), st.integers(0, (1 << 64) - 1)).map(
    lambda t: bytes([t[0]]) + _varint(t[1])
)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.binary(max_size=40), st.lists(field_bytes, max_size=8).map(b"".join)))
def test_fast_entry_decoder_agrees_with_protobuf(payload: bytes) -> None:
    fast = pm.decode_entry_fast(payload)
    if fast is not None:  # when it decodes, it decodes as protobuf does; else protobuf decides
        assert fast == _pb_fields(payload)


def _image(entries: list[bytes]) -> bytes:
    head = pagemap_pb2.pagemap_head(pages_id=3).SerializeToString()
    return encode_image(IMG_COMMON_MAGIC, PAGEMAP.magic, [head, *entries])


def _reference(data: bytes) -> list[tuple[int, int, int, int]] | str:
    """The old decoder: protobuf per entry, the old validation, then contiguous runs merged."""
    try:
        raw = framing.split_image(data, PAGEMAP, "pm")
        entries = [framing.decode(p, framing.PAGEMAP_ENTRY, "pm", i) for i, p in enumerate(raw.payloads)]
    except ImageError:
        return "error"
    if not entries:
        return "error"
    runs: list[list[int]] = []
    offset = prev_end = 0
    for e in entries[1:]:
        vaddr = int(e.vaddr)
        pages = int(e.nr_pages) if e.HasField("nr_pages") else int(e.compat_nr_pages)
        flags = int(e.flags) if e.HasField("flags") else (pm.PE_PARENT if e.in_parent else pm.PE_PRESENT)
        if e.in_parent:
            flags |= pm.PE_PARENT
        if vaddr % pm.PAGE or pages <= 0 or vaddr + pages * pm.PAGE > pm.USER_SPACE_END or vaddr < prev_end:
            return "error"
        present = offset if flags & pm.PE_PRESENT else pm.NO_OFFSET
        if runs and vaddr == prev_end and runs[-1][2] == flags:
            runs[-1][1] += pages
        else:
            runs.append([vaddr, pages, flags, present])
        if flags & pm.PE_PRESENT:
            offset += pages * pm.PAGE
        prev_end = vaddr + pages * pm.PAGE
    return [(a, b, c, d) for a, b, c, d in runs]


def _ours(data: bytes) -> list[tuple[int, int, int, int]] | str:
    try:
        r = pm.decode_pagemap(data, "pm")
    except ImageError:
        return "error"
    return list(zip(r.starts, r.pages, r.flags, r.offsets, strict=True))


def _entry(vaddr: int, pages: int, flags: int | None = 4, modern: bool = False) -> bytes:
    e = pagemap_pb2.pagemap_entry(vaddr=vaddr)
    if flags is not None:
        e.flags = flags
    if modern:
        e.nr_pages = pages
    else:
        e.compat_nr_pages = pages
    return e.SerializeToString()


@st.composite
def criu_shaped(draw: st.DrawFn) -> list[bytes]:
    """Stretches of MiB-sized entries (what CRIU writes), odd entries between them, and a few defects:
    a gap, an overlap, a changed flag or size inside a stretch, a stray byte."""
    out: list[bytes] = []
    vaddr = draw(st.integers(0, 1 << 20)) * pm.PAGE
    for _ in range(draw(st.integers(1, 4))):
        n = draw(st.integers(0, 40))
        pages = draw(st.sampled_from([256, 512, 1, 16]))
        flags = draw(st.sampled_from([4, 1, 2, 6, None]))
        modern = draw(st.booleans())
        for _ in range(n):
            out.append(_entry(vaddr, pages, flags, modern))
            vaddr += pages * pm.PAGE
        vaddr += draw(st.integers(0, 3)) * pm.PAGE
        out.append(_entry(vaddr, draw(st.integers(1, 300)), 4))
        vaddr += out and pm.PAGE * 400
    if out and draw(st.booleans()):
        i = draw(st.integers(0, len(out) - 1))
        kind = draw(st.sampled_from(["gap", "overlap", "flags", "size", "byte", "dup"]))
        fields = _pb_fields(out[i])
        assert fields is not None
        v, compat, _, flags, nr = fields
        pages = nr if nr is not None else (compat or 0)
        if kind == "gap":
            out[i] = _entry((v or 0) + pm.PAGE, pages, flags, nr is not None)
        elif kind == "overlap":
            out[i] = _entry(max(0, (v or 0) - pm.PAGE), pages, flags, nr is not None)
        elif kind == "flags":
            out[i] = _entry(v or 0, pages, 1, nr is not None)
        elif kind == "size":
            out[i] = _entry(v or 0, pages + 1, flags, nr is not None)
        elif kind == "byte":
            out[i] = out[i] + b"\x01"
        else:
            out.insert(i, out[i])
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(criu_shaped())
def test_pagemap_decoder_agrees_with_protobuf_on_criu_shaped_images(entries: list[bytes]) -> None:
    data = _image(entries)
    assert _ours(data) == _reference(data)


@settings(max_examples=200, deadline=None)
@given(criu_shaped(), st.integers(0, 10_000), st.binary(min_size=1, max_size=3))
def test_pagemap_decoder_agrees_on_damaged_images(entries: list[bytes], at: int, junk: bytes) -> None:
    data = _image(entries)
    at %= len(data)
    damaged = data[:at] + junk + data[at + len(junk) :]
    assert _ours(damaged) == _reference(damaged)


def test_a_stretch_of_a_million_mib_entries_is_one_run_and_the_limit_holds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    stretch = [_entry(0x10000000 + i * (1 << 20), 256) for i in range(5000)]
    r = pm.decode_pagemap(_image(stretch), "pm")
    assert list(r.starts) == [0x10000000] and list(r.pages) == [5000 * 256] and r.entries == 5000
    monkeypatch.setattr(framing, "MAX_ENTRIES", 4000)
    with pytest.raises(ImageError, match="more than 4000 entries"):
        pm.decode_pagemap(_image(stretch), "pm")


def test_append_run_keeps_every_other_byte() -> None:
    data = _image([_entry(0x1000, 2), _entry(0x5000, 1, modern=True)])
    new = pm.append_run(data, pm.decode_pagemap(data, "pm"), 0x9000, 3)
    assert new.startswith(data)
    tail = pagemap_pb2.pagemap_entry.FromString(new[len(data) + 4 :])
    assert (tail.vaddr, tail.nr_pages, tail.compat_nr_pages, tail.flags) == (0x9000, 3, 0, pm.PE_PRESENT)
    assert struct.unpack_from("<I", new, len(data))[0] == len(new) - len(data) - 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[float, Path]:
    base = tmp_path_factory.mktemp("perf")
    out = {}
    for gib in (0.25, 8.0):
        out[gib] = base / f"ck-{gib}"
        build(out[gib], 12, gib, criu_shaped=True)
    return out


def _counting(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    seen = {"bytes": 0, "runs": 0}
    pread, run_at = AddressSpace._pread, AddressSpace.run_at

    def counted_pread(self: AddressSpace, offset: int, size: int) -> bytes:
        seen["bytes"] += size
        return pread(self, offset, size)

    def counted_run_at(self: AddressSpace, vaddr: int) -> object:
        seen["runs"] += 1
        return run_at(self, vaddr)

    monkeypatch.setattr(AddressSpace, "_pread", counted_pread)
    monkeypatch.setattr(AddressSpace, "run_at", counted_run_at)
    pm._MEMO.clear()
    seen["decodes0"] = framing.PAGEMAP_DECODES
    return seen


@pytest.mark.parametrize("gib", [0.25, 8.0])
def test_plan_decodes_each_pagemap_once_and_reads_only_stacks(
    checkpoints: dict[float, Path],
    gib: float,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen = _counting(monkeypatch)
    assert main(["plan", str(checkpoints[gib]), "--dest", DEST, "--json"]) == 0
    capsys.readouterr()
    assert framing.PAGEMAP_DECODES - seen["decodes0"] == 1
    assert seen["bytes"] <= 12 * (64 << 10)  # at most every stack, whatever the memory size
    assert seen["runs"] <= 12 * 40  # lookups per thread are bounded (a frame chain, not a scan)


@pytest.mark.parametrize("gib", [0.25, 8.0])
def test_apply_out_decodes_each_pagemap_once_and_writes_only_changed_pages(
    checkpoints: dict[float, Path],
    gib: float,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    seen = _counting(monkeypatch)
    out = tmp_path / "out"
    assert main(["apply", str(checkpoints[gib]), "--dest", DEST, "--out", str(out), "--json"]) == 0
    capsys.readouterr()
    # the original once (plan, changeset, overlay, and the verification through `parent`), the
    # overlay's own small pagemap once (the verification)
    assert framing.PAGEMAP_DECODES - seen["decodes0"] == 2
    written = sum(p.stat().st_size for p in out.glob("pages-*.img"))
    assert written <= 12 * 2 * 4096 + 12 * 4096  # the frame's pages and the relocated images
    if gib == 8.0:
        assert written < 8 * (1 << 30) * 0.0001
    overlay = pm.read_pagemap_runs(next(out.glob("pagemap-*.img")))
    assert overlay.entries <= 4 * 12 + 4  # per changed page, not per MiB of memory


def test_apply_in_place_decodes_the_pagemap_once(
    checkpoints: dict[float, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The hook's path: plan, write (a relocation appends a run), re-read and re-plan; the rewritten
    pagemap is known from the one it extends."""
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(checkpoints[0.25], ck)
    seen = _counting(monkeypatch)
    assert main(["apply", str(ck), "--dest", DEST, "--in-place", "--json"]) == 0
    capsys.readouterr()
    assert framing.PAGEMAP_DECODES - seen["decodes0"] == 1


def test_archive_constants_agree() -> None:
    from criu_xstate.images import archive, checkpoint

    assert checkpoint.ARCHIVE_IMAGES == archive.ARCHIVE_IMAGES


def _modules_after(argv: list[str] | None, env: dict[str, str] | None = None) -> set[str]:
    """The modules loaded after ``criu-xstate ARGV`` (None: after cli.hook_main, as the installed
    action script runs it)."""
    import os
    import subprocess
    import sys

    call = "hook_main()" if argv is None else f"main({argv!r})"
    code = (  # nothing imported here that the command itself might not import (json, say)
        "import sys, contextlib, io\n"
        "from criu_xstate.cli import hook_main, main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):\n"
        f"    {call}\n"
        "print(' '.join(sorted(sys.modules)))\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        check=True,
    )
    return set(r.stdout.split())


def test_start_up_imports_only_what_the_command_needs() -> None:
    fixture = Path(__file__).parent / "fixtures" / "siginfo"
    plan = _modules_after(["plan", str(fixture), "--dest", DEST, "--json"])
    assert "criu_xstate.frames" in plan
    assert not {"tarfile", "tempfile", "criu_xstate.images.archive", "criu_xstate.changeset"} & plan
    # the hook decides on its action first: every action but pre-restore returns before protobuf,
    # YAML or the image layer are imported
    hook = _modules_after(["hook"], {"CRTOOLS_SCRIPT_ACTION": "post-dump"})
    heavy = {"google.protobuf", "yaml", "criu_xstate.images", "criu_xstate.plan", "criu_xstate.hookconfig"}
    assert not heavy & hook


def test_a_pre_restore_hook_with_nothing_to_write_imports_neither_protobuf_nor_yaml(tmp_path: Path) -> None:
    """protobuf only writes (docs/wire.md); the policy hook-install writes is read without PyYAML; the
    installed script enters at hook_main, which builds no command line parser."""
    import shutil

    from criu_xstate.commands.hookcmds import config_text

    images = tmp_path / "images"
    shutil.copytree(Path(__file__).parent / "fixtures" / "plain", images)
    config = tmp_path / "config.yaml"
    config.write_text(config_text("probe", "check"))
    env = {"CRTOOLS_SCRIPT_ACTION": "pre-restore", "CRTOOLS_IMAGE_DIR": str(images)}
    hook = _modules_after(None, {**env, "CRIU_XSTATE_CONFIG": str(config)})
    assert "criu_xstate.plan" in hook and "criu_xstate.model" in hook  # it did plan
    assert not {"google.protobuf", "yaml", "criu_xstate.changeset", "argparse", "tempfile"} & hook
    # records, not dataclasses: their per-class compile was ~35 ms of every restore (docs/records.md);
    # shutil (with bz2, lzma) only for copies and archives: ~3 ms
    assert not {"dataclasses", "inspect", "shutil"} & hook
    # json (~1 ms) only for a journal, a decision log or a profile dump; base64 (~0.5 ms) not at all: the
    # sigreturn self-test's child reports through marshal, the journal's base64 is binascii's
    assert "criu_xstate.x86.sigreturn_probe" in hook  # the fixture has a live frame: the self-test ran
    assert not {"json", "base64"} & hook


def _anchors_by_whole_search(
    buf: bytes, low: int, restorers: list[int], width: int, align_mod: int
) -> list[int]:
    """frames._Scanner.anchors as it was: every occurrence, then the alignment filter."""
    found = set()
    for r in restorers:
        needle = r.to_bytes(width, "little")
        i = buf.find(needle)
        while i >= 0:
            if (low + i) % 16 == align_mod:
                found.add(low + i)
            i = buf.find(needle, i + 1)
    return sorted(found)


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=600),
    st.lists(st.integers(0, 599), max_size=6),
    st.lists(
        st.sampled_from([0x401000, 0x40A6F0, 0x7F1234567890, 0x100, 0x7F00000000FF]), min_size=1, max_size=3
    ),
    st.sampled_from([(8, 8), (4, 12)]),
    st.integers(0, 3),
)
def test_anchor_search_finds_what_a_whole_search_finds(
    noise: bytes, plants: list[int], restorers: list[int], abi: tuple[int, int], low16: int
) -> None:
    from criu_xstate.frames import StackKind, _Scanner, _Stack

    width, align_mod = abi
    restorers = [r & ((1 << (8 * width)) - 1) for r in restorers]
    buf = bytearray(noise.ljust(640, b"\0"))
    for i, at in enumerate(plants):
        buf[at : at + width] = restorers[i % len(restorers)].to_bytes(width, "little")
    buf = buf[:640]
    low = 0x7FFF0000 + 16 * low16
    scanner = _Scanner(None, _Stack(StackKind.STACK, low, low + len(buf)), low)  # type: ignore[arg-type]
    scanner.buf = bytes(buf)
    assert scanner.anchors(restorers, width, align_mod) == _anchors_by_whole_search(
        bytes(buf), low, restorers, width, align_mod
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(criu_shaped(), st.integers(1, 1 << 20), st.booleans())
def test_appending_a_run_gives_what_decoding_the_new_image_gives(
    entries: list[bytes], pages: int, into_gap: bool
) -> None:
    """A relocation's pagemap (append_run) is known without decoding it; it must equal the decode."""
    data = _image(entries)
    try:
        runs = pm.decode_pagemap(data, "pm")
    except ImageError:
        return
    vaddr = (runs.end + (pm.PAGE if into_gap else 0)) or pm.PAGE
    if vaddr + pages * pm.PAGE > pm.USER_SPACE_END:
        return
    new = pm.append_run(data, runs, vaddr, pages)
    got, want = pm.runs_of(new, "pm"), pm.decode_pagemap(new, "pm")
    for field in ("starts", "pages", "flags", "offsets", "entries", "modern", "pages_id", "head_payload"):
        assert getattr(got, field) == getattr(want, field), field


def test_show_looks_up_each_stack_mapping_by_bisection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """show asks for every thread's stack mapping: a scan of every VMA made it quadratic in threads
    (4000 threads: 2.2 s, now 0.8)."""
    from criu_xstate.model import Vma

    build(tmp_path / "ck", 300, 0.01, criu_shaped=True)
    calls = {"n": 0}
    contains = Vma.__contains__

    def counted(self: Vma, addr: object) -> bool:
        calls["n"] += 1
        return contains(self, addr)

    monkeypatch.setattr(Vma, "__contains__", counted)
    assert main(["show", str(tmp_path / "ck"), "--json"]) == 0
    capsys.readouterr()
    assert calls["n"] <= 300 * 4  # a few per thread, not one per mapping


def test_plan_parses_each_anchor_once_and_indexes_sigactions_once_per_process(
    checkpoints: dict[float, Path], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Frame discovery per thread: the restorer index is the process's (made once, not per thread),
    each anchor's candidate is parsed once (the survey's quick pass and the report share it), and
    evidence strings are made only for frames that are reported (one live frame per thread here)."""
    from criu_xstate import frames

    seen = {"index": 0, "parsed": 0, "evidence": 0}
    index_init, candidate, run_checks = frames.SigactionIndex.__init__, frames._candidate, frames._run_checks

    def counted_index(self: frames.SigactionIndex, *args: object) -> None:
        seen["index"] += 1
        index_init(self, *args)  # type: ignore[arg-type]

    def counted_candidate(*args: object) -> object:
        seen["parsed"] += 1
        return candidate(*args)  # type: ignore[arg-type]

    def counted_checks(*args: object) -> object:
        seen["evidence"] += 1
        return run_checks(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(frames.SigactionIndex, "__init__", counted_index)
    monkeypatch.setattr(frames, "_candidate", counted_candidate)
    monkeypatch.setattr(frames, "_run_checks", counted_checks)
    assert main(["plan", str(checkpoints[0.25]), "--dest", DEST, "--json"]) == 0
    capsys.readouterr()
    assert seen == {"index": 1, "parsed": 12, "evidence": 12}
