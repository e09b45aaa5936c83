"""The XSAVE image of a signal frame (research/kernel.md §2), declared once.

A frame's image is the 512-byte legacy FXSAVE area (MXCSR at +24, ``struct _fpx_sw_bytes`` in its
software-reserved tail at +464), the 64-byte XSAVE header at +512 (``xstate_bv``, ``xcomp_bv``, reserved
bytes), the components at their standard offsets, and ``FP_XSTATE_MAGIC2`` right after ``xstate_size``
bytes. A kernel on a CPU without XSAVE writes an FXSAVE image instead: the legacy area alone, its sw
bytes saying ``xstate_size`` 512 and no features, and no magic2 (:attr:`SwBytes.fxsave_only`). This
module names each of those numbers, reads an image (:class:`XsaveImage`), builds one
(:func:`build_image`: ``extended_size``, ``xcomp_bv`` and magic2 derived) and says where a layout ends
for a feature mask (:func:`layout_end`). Frames, plan, translate and the tests' frame builder use it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping

from criu_xstate.records import record
from criu_xstate.x86.layout import Field, Struct
from criu_xstate.x86.xfeatures import LEGACY

LEGACY_AREA_SIZE = 512  # FXSAVE: x87, MXCSR, XMM registers, reserved and software-available bytes
MXCSR_OFFSET = 24
SW_BYTES_OFFSET = 464  # struct _fpx_sw_bytes in the FXSAVE software-available bytes
XSAVE_HEADER_OFFSET = LEGACY_AREA_SIZE
XSAVE_HEADER_SIZE = 64
HEADER_RESERVED_OFFSET = 16  # header bytes 16..63 are reserved; XRSTOR faults on non-zero 16..23
HEADER_RESERVED_CHECKED = 8  # the reserved bytes XRSTOR itself checks (16..23)
MIN_XSTATE_SIZE = LEGACY_AREA_SIZE + XSAVE_HEADER_SIZE  # 576: the smallest xstate_size
MAX_XSTATE_SIZE = 1 << 20  # hostile-input bound: no CPU has an XSAVE area near this
FP_XSTATE_MAGIC1 = 0x46505853
FP_XSTATE_MAGIC2 = 0x46505845
MAGIC2_SIZE = 4
XSAVE_ALIGN = 64  # an XSAVE image starts on a 64-byte boundary
XCOMP_BV_COMPACTED = 1 << 63

SW_BYTES = Struct(
    "_fpx_sw_bytes",
    48,
    (
        Field("magic1", 0, "I"),
        Field("extended_size", 4, "I"),
        Field("xfeatures", 8, "Q"),
        Field("xstate_size", 16, "I"),
    ),
)
XSAVE_HEADER = Struct(
    "xstate_header", XSAVE_HEADER_SIZE, (Field("xstate_bv", 0, "Q"), Field("xcomp_bv", 8, "Q"))
)


def image_bytes(xstate_size: int) -> int:
    """Bytes an image of ``xstate_size`` occupies in a frame: the image and magic2 after it."""
    return xstate_size + MAGIC2_SIZE


def align_down(addr: int) -> int:
    return addr & ~(XSAVE_ALIGN - 1)


def align_up(addr: int) -> int:
    return (addr + XSAVE_ALIGN - 1) & ~(XSAVE_ALIGN - 1)


def layout_end(
    offsets: Mapping[int, tuple[int, int]], mask: int, *, skip_missing: bool = False
) -> int | None:
    """End of the highest-placed component of ``mask`` in the standard layout ``offsets`` (component ->
    (offset, size)), at least :data:`MIN_XSTATE_SIZE`. x87 and SSE (bits 0, 1) live in the legacy
    area. A component without an offset makes the end unknown (None), or is skipped with
    ``skip_missing``."""
    end = MIN_XSTATE_SIZE
    for n in range(2, mask.bit_length()):
        if not mask >> n & 1:
            continue
        if n not in offsets:
            if skip_missing:
                continue
            return None
        off, size = offsets[n]
        end = max(end, off + size)
    return end


@record
class SwBytes:
    """``struct _fpx_sw_bytes`` at image + 464."""

    magic1: int
    extended_size: int
    xfeatures: int
    xstate_size: int

    @classmethod
    def parse(cls, image: bytes) -> SwBytes:
        return cls(**SW_BYTES.parse(image, SW_BYTES_OFFSET))

    @property
    def fxsave_only(self) -> bool:
        """An FXSAVE image, as a kernel on a CPU without XSAVE writes it (save_sw_bytes() with the
        task's user size 512 and user features 0; save_xstate_epilog() puts no magic2 after it)."""
        return self.xstate_size == LEGACY_AREA_SIZE and not self.xfeatures & ~LEGACY

    @property
    def frame_bytes(self) -> int:
        """Bytes the image occupies in its frame: the image, and magic2 after an XSAVE image."""
        return self.xstate_size if self.fxsave_only else image_bytes(self.xstate_size)

    def problem(self) -> str | None:
        """Why these sw bytes cannot describe a kernel-written image, or None."""
        if self.magic1 != FP_XSTATE_MAGIC1:
            return f"magic1 is 0x{self.magic1:08x}, not 0x{FP_XSTATE_MAGIC1:08x}"
        if self.fxsave_only:
            return None if self.extended_size >= self.xstate_size else "FXSAVE image with extended_size < 512"
        if not MIN_XSTATE_SIZE <= self.xstate_size <= MAX_XSTATE_SIZE:
            return f"xstate_size {self.xstate_size} outside {MIN_XSTATE_SIZE}..{MAX_XSTATE_SIZE}"
        if self.xstate_size > self.extended_size:
            return f"xstate_size {self.xstate_size} > extended_size {self.extended_size}"
        return None


def magic2_at(image: bytes, xstate_size: int) -> int:
    """The 32-bit word where magic2 belongs for ``xstate_size`` (``image`` holds at least that far)."""
    return int(struct.unpack_from("<I", image, xstate_size)[0])


@record
class XsaveImage:
    """A read view of an image's bytes (as much of it as ``raw`` holds); fields it lacks are None."""

    raw: bytes

    def _u(self, fmt: str, off: int) -> int | None:
        if len(self.raw) < off + struct.calcsize(fmt):
            return None
        return int(struct.unpack_from(fmt, self.raw, off)[0])

    @property
    def mxcsr(self) -> int | None:
        return self._u("<I", MXCSR_OFFSET)

    @property
    def xstate_bv(self) -> int | None:
        return self._u("<Q", XSAVE_HEADER_OFFSET + XSAVE_HEADER.offset("xstate_bv"))

    @property
    def xcomp_bv(self) -> int | None:
        return self._u("<Q", XSAVE_HEADER_OFFSET + XSAVE_HEADER.offset("xcomp_bv"))

    @property
    def header_reserved(self) -> bytes:
        """Reserved header bytes 16..63 (all must be zero in a frame the compat path accepts)."""
        return self.raw[
            XSAVE_HEADER_OFFSET + HEADER_RESERVED_OFFSET : XSAVE_HEADER_OFFSET + XSAVE_HEADER_SIZE
        ]

    @property
    def header_reserved_checked(self) -> bytes:
        """Reserved header bytes 16..23, which XRSTOR checks."""
        return self.header_reserved[:HEADER_RESERVED_CHECKED]

    def component(self, offset: int, size: int) -> bytes:
        return self.raw[offset : offset + size]

    def u32(self, offset: int) -> int:
        """A 32-bit component value (PKRU) at ``offset``."""
        return int(struct.unpack_from("<I", self.raw, offset)[0])


def build_image(
    xstate_size: int,
    xfeatures: int,
    xstate_bv: int,
    *,
    legacy: bytes = b"",
    mxcsr: int | None = None,
    components: Iterable[tuple[int, bytes]] = (),
    fill: int = 0,
) -> bytes:
    """A signal-frame image of ``xstate_size`` bytes plus magic2, as the kernel writes one: ``legacy``
    (at most the 464 bytes before the sw bytes) first, then MXCSR if given, each (offset, bytes) of
    ``components``, the sw bytes (``extended_size`` = ``xstate_size`` + 4), a standard-format header
    (``xcomp_bv`` and reserved bytes zero) and magic2. Bytes nothing writes are ``fill``."""
    if xstate_size < MIN_XSTATE_SIZE:
        raise ValueError(f"xstate_size {xstate_size} below {MIN_XSTATE_SIZE}")
    if len(legacy) > SW_BYTES_OFFSET:
        raise ValueError(f"legacy bytes {len(legacy)} overlap the sw bytes at {SW_BYTES_OFFSET}")
    out = bytearray(bytes([fill]) * xstate_size + bytes(MAGIC2_SIZE))
    out[: len(legacy)] = legacy
    if mxcsr is not None:
        struct.pack_into("<I", out, MXCSR_OFFSET, mxcsr)
    for off, data in components:
        if off < MIN_XSTATE_SIZE or off + len(data) > xstate_size:
            raise ValueError(f"component at {off}+{len(data)} outside {MIN_XSTATE_SIZE}..{xstate_size}")
        out[off : off + len(data)] = data
    sw = {
        "magic1": FP_XSTATE_MAGIC1,
        "extended_size": image_bytes(xstate_size),
        "xfeatures": xfeatures,
        "xstate_size": xstate_size,
    }
    out[SW_BYTES_OFFSET : SW_BYTES_OFFSET + SW_BYTES.size] = SW_BYTES.build(sw)
    header = XSAVE_HEADER.build({"xstate_bv": xstate_bv, "xcomp_bv": 0})
    out[XSAVE_HEADER_OFFSET : XSAVE_HEADER_OFFSET + XSAVE_HEADER_SIZE] = header
    struct.pack_into("<I", out, xstate_size, FP_XSTATE_MAGIC2)
    return bytes(out)
