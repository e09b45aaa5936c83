"""Test helpers: a flat fake address space and kernel-style signal frames placed in it.

Placement follows get_sigframe() (research/kernel.md §1.3): XSAVE image at
round_down(sp - 128 - (user_size + 4), 64), frame at image - 456.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

from criu_xstate.errors import MemoryUnreadable
from criu_xstate.frames import (
    FP_XSTATE_MAGIC1,
    FP_XSTATE_MAGIC2,
    RED_ZONE,
    RT_KERNEL_FPSTATE_OFFSET,
    SW_BYTES_OFFSET,
    XSAVE_HEADER_OFFSET,
)

RESTORER = 0x401000


@dataclass
class FakeMemory:
    """Regions of bytes at fixed addresses; ``lazy`` ranges raise like lazy pages do."""

    regions: dict[int, bytearray] = field(default_factory=dict)
    lazy: list[tuple[int, int]] = field(default_factory=list)

    def add(self, start: int, size: int, fill: bytes = b"\0") -> None:
        self.regions[start] = bytearray((fill * (size // len(fill) + 1))[:size])

    def region_of(self, vaddr: int) -> tuple[int, int] | None:
        for start, buf in self.regions.items():
            if start <= vaddr < start + len(buf):
                return start, start + len(buf)
        return None

    def read(self, vaddr: int, size: int) -> bytes:
        for lo, hi in self.lazy:
            if vaddr < hi and vaddr + size > lo:
                raise MemoryUnreadable("pages-1.img", vaddr, size, "lazy page not in the image")
        region = self.region_of(vaddr)
        if region is None or vaddr + size > region[1]:
            raise MemoryUnreadable("pages-1.img", vaddr, size, "not mapped")
        buf = self.regions[region[0]]
        return bytes(buf[vaddr - region[0] : vaddr - region[0] + size])

    def write(self, vaddr: int, data: bytes) -> None:
        region = self.region_of(vaddr)
        assert region is not None
        off = vaddr - region[0]
        self.regions[region[0]][off : off + len(data)] = data


def xsave_image(
    xstate_size: int, xfeatures: int, xstate_bv: int, mxcsr: int = 0x1F80, fill: int = 0
) -> bytes:
    img = bytearray(bytes([fill]) * xstate_size + b"\0\0\0\0")
    struct.pack_into("<I", img, 24, mxcsr)
    struct.pack_into("<IIQI", img, SW_BYTES_OFFSET, FP_XSTATE_MAGIC1, xstate_size + 4, xfeatures, xstate_size)
    img[SW_BYTES_OFFSET + 20 : SW_BYTES_OFFSET + 48] = bytes(28)
    img[XSAVE_HEADER_OFFSET : XSAVE_HEADER_OFFSET + 64] = bytes(64)
    struct.pack_into("<Q", img, XSAVE_HEADER_OFFSET, xstate_bv)
    struct.pack_into("<I", img, xstate_size, FP_XSTATE_MAGIC2)
    return bytes(img)


def frame_bytes(
    interrupted_sp: int,
    *,
    xstate_size: int = 832,
    xfeatures: int = 0x7,
    xstate_bv: int = 0x7,
    restorer: int = RESTORER,
    signo: int = 10,
    on_altstack_top: int | None = None,
    sigmask: int = 0,
) -> tuple[int, int, bytes]:
    """A kernel-style 64-bit frame for a signal interrupting ``interrupted_sp``: (frame, fpstate, bytes
    from the frame to the end of its XSAVE image)."""
    top = on_altstack_top if on_altstack_top is not None else interrupted_sp - RED_ZONE
    fpstate = (top - (xstate_size + 4)) & ~63
    frame = fpstate - RT_KERNEL_FPSTATE_OFFSET
    assert frame % 16 == 8
    raw = bytearray(RT_KERNEL_FPSTATE_OFFSET)
    struct.pack_into("<Q", raw, 0, restorer)
    struct.pack_into("<Q", raw, 8, 0x7)
    struct.pack_into("<Q", raw, 48 + 120, interrupted_sp)
    struct.pack_into("<Q", raw, 48 + 128, 0x401234)
    struct.pack_into("<H", raw, 48 + 144, 0x33)
    struct.pack_into("<Q", raw, 48 + 168, sigmask)
    struct.pack_into("<Q", raw, 48 + 184, fpstate)
    struct.pack_into("<Q", raw, 304, sigmask)
    struct.pack_into("<i", raw, 312, signo)
    return frame, fpstate, bytes(raw) + xsave_image(xstate_size, xfeatures, xstate_bv)


def place_frame(mem: FakeMemory, interrupted_sp: int, **kwargs: Any) -> tuple[int, int]:
    """Write a kernel-style 64-bit frame (see :func:`frame_bytes`) into ``mem``: (frame, fpstate)."""
    frame, fpstate, data = frame_bytes(interrupted_sp, **kwargs)
    mem.write(frame, data)
    return frame, fpstate
