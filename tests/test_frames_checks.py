"""Each frame-discovery check, proven by mutation: a valid kernel-style frame passes every check, and
changing exactly the one field a check guards makes exactly that check fail. Plus bounded work on a
stack full of restorer addresses (issue 9)."""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest

from criu_xstate.frames import (
    CHECKS_64,
    CHECKS_IA32,
    MAX_RECORDED,
    SCAN_CHUNK,
    Liveness,
    Sigaction,
    StackKind,
    ThreadStacks,
    examine_frame_64,
    examine_frame_ia32,
    find_frames,
)
from criu_xstate.x86.sigframe import (
    IA32_FSAVE_HEADER,
    IA32_RT_KERNEL_FPSTATE_OFFSET,
    RT_SIGFRAME_64,
    RT_SIGFRAME_IA32,
    SA_RESTORER,
    SA_SIGINFO,
    USER_CS_32,
)
from criu_xstate.x86.xsave import SW_BYTES, SW_BYTES_OFFSET, align_down, image_bytes
from tests.framebuild import RESTORER, FakeMemory, place_frame, xsave_image

LO = 0x7FFF_0000_0000
SIZE = 0x10000
SIGACTIONS = [Sigaction(10, 0x401100, SA_SIGINFO | SA_RESTORER, RESTORER)]
XSTATE_SIZE = 832


class Frame64:
    """A kernel-style 64-bit frame in its own stack, and the means to change one field of it."""

    def __init__(self) -> None:
        self.mem = FakeMemory()
        self.mem.add(LO, SIZE)
        self.isp = LO + SIZE - 0x1000
        self.address, self.fpstate = place_frame(self.mem, self.isp, xstate_size=XSTATE_SIZE)

    def set(self, name: str, value: int) -> None:
        f = RT_SIGFRAME_64.field(name)
        self.mem.write(self.address + f.offset, struct.pack("<" + f.fmt, value))

    def set_sw(self, name: str, value: int) -> None:
        f = SW_BYTES.field(name)
        self.mem.write(self.fpstate + SW_BYTES_OFFSET + f.offset, struct.pack("<" + f.fmt, value))

    def failed(self, at: int | None = None) -> list[str]:
        address = self.address if at is None else at
        frame = examine_frame_64(self.mem, address, StackKind.STACK, SIGACTIONS, 7)
        return [c.name for c in frame.failed]


def _move_off_alignment(f: Frame64) -> int:
    data = f.mem.read(f.address, RT_SIGFRAME_64.size)
    f.mem.write(f.address + 8, data)  # fpstate is absolute: the image is still found
    return f.address + 8


MUTATIONS_64: dict[str, list[Callable[[Frame64], int | None]]] = {
    "alignment": [_move_off_alignment],
    "pretcode": [lambda f: f.set("pretcode", RESTORER + 0x10)],
    "uc_flags": [lambda f: f.set("uc_flags", 0x8), lambda f: f.set("uc_link", 0x1000)],
    "cs": [lambda f: f.set("cs", 0x2B)],
    "sigmask": [lambda f: f.set("oldmask", 0x200)],
    "fpstate": [
        lambda f: f.set("fpstate", f.fpstate + 8),
        lambda f: f.set("fpstate", 0x1000),  # unmapped
        lambda f: f.set_sw("magic1", 0),
        lambda f: f.set_sw("xstate_size", 512),
        lambda f: f.set_sw("extended_size", XSTATE_SIZE - 4),
        lambda f: f.mem.write(f.fpstate + XSTATE_SIZE, b"\0\0\0\0"),  # magic2
    ],
    "interrupted_sp": [
        lambda f: f.set("sp", f.address + RT_SIGFRAME_64.size - 8),  # inside the frame
        lambda f: f.set("sp", f.fpstate + XSTATE_SIZE),  # inside the image
    ],
}


def test_every_64bit_check_has_a_mutation() -> None:
    assert [row.name for row in CHECKS_64] == list(MUTATIONS_64)


def test_unmutated_kernel_frame_passes_every_check() -> None:
    f = Frame64()
    assert f.failed() == []
    found = find_frames(ThreadStacks(tid=7, sp=f.address - 0x40), f.mem, SIGACTIONS)
    assert [(x.address, x.liveness) for x in found.frames] == [(f.address, Liveness.LIVE)]


@pytest.mark.parametrize(
    ("check", "which"), [(c, i) for c, ms in MUTATIONS_64.items() for i in range(len(ms))]
)
def test_one_mutated_field_fails_exactly_its_check(check: str, which: int) -> None:
    f = Frame64()
    at = MUTATIONS_64[check][which](f)
    assert f.failed(at) == [check]


@pytest.mark.parametrize("check", ["uc_flags", "cs", "sigmask", "fpstate", "interrupted_sp"])
def test_mutated_frame_on_a_stack_is_reported_invalid_not_live(check: str) -> None:
    """Through discovery: the anchored frame is listed INVALID with that one failed check."""
    f = Frame64()
    MUTATIONS_64[check][0](f)
    found = find_frames(ThreadStacks(tid=7, sp=f.address - 0x40), f.mem, SIGACTIONS)
    assert found.live == []
    assert [(x.address, x.liveness, [c.name for c in x.failed]) for x in found.frames] == [
        (f.address, Liveness.INVALID, [check])
    ]


IA32_RESTORER = 0x8049000
IA32_SIGACTIONS = [Sigaction(10, 0x8049100, SA_SIGINFO | SA_RESTORER, IA32_RESTORER)]


def _ia32_frame(mem: FakeMemory, isp: int, **override: int) -> int:
    """A kernel-style rt_sigframe_ia32 (kernel.md §1.5): its XSAVE image after the 112-byte FSAVE header."""
    xsave = align_down(isp - image_bytes(XSTATE_SIZE))
    fpstate = xsave - IA32_FSAVE_HEADER
    frame = fpstate - IA32_RT_KERNEL_FPSTATE_OFFSET
    values = {"pretcode": IA32_RESTORER, "sig": 10, "sp": isp, "cs": USER_CS_32, "fpstate": fpstate}
    mem.write(frame, RT_SIGFRAME_IA32.build({**values, **override}))
    mem.write(xsave, xsave_image(XSTATE_SIZE, 0x7, 0x7))
    return frame


MUTATIONS_IA32: dict[str, dict[str, int]] = {
    "pretcode": {"pretcode": IA32_RESTORER + 4},
    "cs": {"cs": 0x33},
    "fpstate": {"fpstate": 0x1000},
}


def test_ia32_checks_by_mutation() -> None:
    def failed(**override: int) -> list[str]:
        mem = FakeMemory()
        mem.add(0xFFF00000, SIZE)
        frame = _ia32_frame(mem, 0xFFF00000 + SIZE - 0x1000, **override)
        got = examine_frame_ia32(mem, frame, StackKind.STACK, IA32_SIGACTIONS, 3, rt=True)
        return [c.name for c in got.failed]

    assert failed() == []
    assert {row.name for row in CHECKS_IA32} == {"alignment", *MUTATIONS_IA32}
    for check, override in MUTATIONS_IA32.items():
        assert failed(**override) == [check]
    mem = FakeMemory()
    mem.add(0xFFF00000, SIZE)
    frame = _ia32_frame(mem, 0xFFF00000 + SIZE - 0x1000)
    mem.write(frame + 16, mem.read(frame, RT_SIGFRAME_IA32.size))  # moved: fpstate still absolute
    moved = examine_frame_ia32(mem, frame + 16 - 4, StackKind.STACK, IA32_SIGACTIONS, 3, rt=True)
    assert "alignment" in [c.name for c in moved.failed]


# --- bounded work on a hostile stack -------------------------------------------------------------------


class CountingMemory(FakeMemory):
    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.bytes_read = 0

    def read(self, vaddr: int, size: int) -> bytes:
        self.reads += 1
        self.bytes_read += size
        return super().read(vaddr, size)


def _restorer_bomb(stack_bytes: int) -> tuple[CountingMemory, int]:
    """A stack full of the restorer address: an anchor every 16 bytes, each pointing its fpstate at
    the restorer's mapped (text) page."""
    mem = CountingMemory()
    mem.add(LO, stack_bytes, RESTORER.to_bytes(8, "little"))
    mem.add(RESTORER & ~0xFFF, 0x2000)
    return mem, stack_bytes // 16


def test_stack_full_of_restorers_costs_linear_work_and_bounded_evidence() -> None:
    extra = []
    for stack_bytes in (0x4000, 0x10000):  # 1024 and 4096 anchors: at most MAX_CANDIDATES_PER_STACK
        mem, anchors = _restorer_bomb(stack_bytes)
        found = find_frames(ThreadStacks(tid=1, sp=LO), mem, SIGACTIONS)
        assert found.live == []
        assert found.examined == anchors  # each anchor once
        assert len(found.frames) == MAX_RECORDED and found.omitted == anchors - MAX_RECORDED
        assert all(f.liveness is Liveness.INVALID for f in found.frames)
        assert mem.reads <= stack_bytes // SCAN_CHUNK + 1 + 2 * MAX_RECORDED
        extra.append(mem.bytes_read - stack_bytes)
    # The stack is read once; beyond it only a constant: one probe of the restorer page (remembered) and
    # the headers of frames near the stack's top that run past it. Nothing per candidate.
    assert extra[0] == extra[1] < 16 * 1024
