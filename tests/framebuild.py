"""Test helpers: a flat fake address space and kernel-style signal frames placed in it.

Placement follows get_sigframe() (research/kernel.md §1.3): XSAVE image at
round_down(sp - 128 - (user_size + 4), 64), frame at image - 456.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from criu_xstate.errors import MemoryUnreadable
from criu_xstate.x86.sigframe import (
    RED_ZONE,
    RT_KERNEL_FPSTATE_OFFSET,
    RT_SIGFRAME_64,
    UC_KNOWN_FLAGS,
    USER_CS_64,
)
from criu_xstate.x86.xsave import (
    FP_XSTATE_MAGIC1,
    LEGACY_AREA_SIZE,
    MIN_XSTATE_SIZE,
    SW_BYTES,
    SW_BYTES_OFFSET,
    align_down,
    build_image,
    image_bytes,
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
    """A kernel-written image; ``fill`` where XSAVE leaves the stack's bytes. ``xstate_size`` 512: an
    FXSAVE image as a kernel on a CPU without XSAVE writes it (sw bytes 512/516, no header, no magic2)."""
    if xstate_size == LEGACY_AREA_SIZE:
        image = bytearray(build_image(MIN_XSTATE_SIZE, 0, 0, mxcsr=mxcsr, fill=fill)[:LEGACY_AREA_SIZE])
        sw = {"magic1": FP_XSTATE_MAGIC1, "extended_size": 516, "xfeatures": 0, "xstate_size": 512}
        image[SW_BYTES_OFFSET : SW_BYTES_OFFSET + SW_BYTES.size] = SW_BYTES.build(sw)
        return bytes(image)
    return build_image(xstate_size, xfeatures, xstate_bv, mxcsr=mxcsr, fill=fill)


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
    fpstate = align_down(top - (xstate_size if xstate_size == LEGACY_AREA_SIZE else image_bytes(xstate_size)))
    frame = fpstate - RT_KERNEL_FPSTATE_OFFSET
    assert frame % 16 == 8
    raw = RT_SIGFRAME_64.build(
        {
            "pretcode": restorer,
            "uc_flags": UC_KNOWN_FLAGS,
            "sp": interrupted_sp,
            "ip": 0x401234,
            "cs": USER_CS_64,
            "oldmask": sigmask,
            "fpstate": fpstate,
            "sigmask": sigmask,
            "si_signo": signo,
        }
    ) + bytes(RT_KERNEL_FPSTATE_OFFSET - RT_SIGFRAME_64.size)
    return frame, fpstate, bytes(raw) + xsave_image(xstate_size, xfeatures, xstate_bv)


def place_frame(mem: FakeMemory, interrupted_sp: int, **kwargs: Any) -> tuple[int, int]:
    """Write a kernel-style 64-bit frame (see :func:`frame_bytes`) into ``mem``: (frame, fpstate)."""
    frame, fpstate, data = frame_bytes(interrupted_sp, **kwargs)
    mem.write(frame, data)
    return frame, fpstate
