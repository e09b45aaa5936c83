"""The XSAVE component table (research/kernel.md §5.1, §6): numbers, names, standard offsets of the
two vendor layouts, the bytes that hold architectural state, and the CPU flags behind each."""

from __future__ import annotations

X87, SSE, AVX, BNDREGS, BNDCSR, OPMASK, ZMM_HI256, HI16_ZMM, PKRU = 0, 1, 2, 3, 4, 5, 6, 7, 9
XTILECFG, XTILEDATA, APX = 17, 18, 19
LEGACY = (1 << X87) | (1 << SSE)  # live in the 512-byte legacy area, always restored
SUPERVISOR = sum(1 << n for n in (8, 10, 11, 12, 13, 14, 15, 16))  # never in a signal frame
DYNAMIC = 1 << XTILEDATA  # needs ARCH_REQ_XCOMP_PERM; excluded from a new task's default size
INIT_PKRU = 0x55555554  # Linux init_pkru_value: access disabled for keys 1..15

COMPONENT_NAMES = {
    X87: "x87",
    SSE: "SSE",
    AVX: "AVX (YMM_Hi128)",
    BNDREGS: "MPX BNDREGS",
    BNDCSR: "MPX BNDCSR",
    OPMASK: "AVX-512 opmask",
    ZMM_HI256: "AVX-512 ZMM_Hi256",
    HI16_ZMM: "AVX-512 Hi16_ZMM",
    PKRU: "PKRU",
    XTILECFG: "AMX XTILECFG",
    XTILEDATA: "AMX XTILEDATA",
    APX: "APX EGPRs",
}

# Standard-format (offset, size) as CPUID 0xD enumerates them. Intel keeps the MPX hole at 960 (which
# APX reuses); AMD packs AVX-512 and PKRU right after AVX. Offsets are not monotonic in the number.
INTEL_OFFSETS: dict[int, tuple[int, int]] = {
    AVX: (576, 256),
    BNDREGS: (960, 64),
    BNDCSR: (1024, 64),
    OPMASK: (1088, 64),
    ZMM_HI256: (1152, 512),
    HI16_ZMM: (1664, 1024),
    PKRU: (2688, 8),
    XTILECFG: (2752, 64),
    XTILEDATA: (2816, 8192),
    APX: (960, 128),
}
AMD_OFFSETS: dict[int, tuple[int, int]] = {
    AVX: (576, 256),
    OPMASK: (832, 64),
    ZMM_HI256: (896, 512),
    HI16_ZMM: (1408, 1024),
    PKRU: (2432, 8),
}

# Bytes of a component that hold architectural state; the rest of its XSAVE slot is padding that XSAVE
# does not write (stack garbage in a signal frame). BNDCSR: BNDCFGU + BNDSTATUS = 16 of 64 bytes
# (SDM vol. 1 §13.5.4); PKRU: 4 of 8 bytes. Seen in a QEMU TCG guest's nested frames.
STATE_BYTES = {BNDCSR: 16, PKRU: 4}

# /proc/cpuinfo flags a CPU must have to enable a component.
COMPONENT_FLAGS = {
    AVX: "avx",
    OPMASK: "avx512f",
    ZMM_HI256: "avx512f",
    HI16_ZMM: "avx512f",
    PKRU: "pku",
    XTILECFG: "amx_tile",
    XTILEDATA: "amx_tile",
}


def component_name(n: int) -> str:
    return COMPONENT_NAMES.get(n, f"component {n}")


def bits(mask: int) -> list[int]:
    """The set bit numbers of ``mask``, lowest first (walks the set bits only: called per thread)."""
    out = []
    mask &= (1 << 64) - 1  # as the old range(64) did: a negative mask is its low 64 bits
    while mask:
        low = mask & -mask
        out.append(low.bit_length() - 1)
        mask ^= low
    return out


def state_bytes(n: int, size: int) -> int:
    return min(size, STATE_BYTES.get(n, size))


def implied_flags(xfeatures: int) -> frozenset[str]:
    return frozenset(COMPONENT_FLAGS[n] for n in bits(xfeatures) if n in COMPONENT_FLAGS)
