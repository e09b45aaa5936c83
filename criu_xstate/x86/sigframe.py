"""Signal-frame layouts as the kernel declares them (arch/x86/include/asm/sigframe.h, uapi
sigcontext.h; offsets verified on 6.18 by research/kernel-probes/layout.c), declared once and used
both to parse frames found in checkpoints and to build frames in tests.

Only the fields criu-xstate reads or writes are named; the rest of each structure is opaque bytes.
"""

from __future__ import annotations

from criu_xstate.x86.layout import Field, Struct

# Re-exported for plan.py until it imports criu_xstate.x86.xsave itself.

_MCONTEXT = 48  # uc.uc_mcontext (struct sigcontext_64) inside struct rt_sigframe

RT_SIGFRAME_64 = Struct(
    "rt_sigframe",
    440,
    (
        Field("pretcode", 0, "Q"),
        Field("uc_flags", 8, "Q"),
        Field("uc_link", 16, "Q"),
        Field("ss_sp", 24, "Q"),
        Field("ss_flags", 32, "i"),
        Field("ss_size", 40, "Q"),
        Field("sp", _MCONTEXT + 120, "Q"),
        Field("ip", _MCONTEXT + 128, "Q"),
        Field("cs", _MCONTEXT + 144, "H"),
        Field("oldmask", _MCONTEXT + 168, "Q"),
        Field("fpstate", _MCONTEXT + 184, "Q"),  # frame + 232
        Field("sigmask", 304, "Q"),
        Field("si_signo", 312, "i"),  # written only with SA_SIGINFO
    ),
)
RT_KERNEL_FPSTATE_OFFSET = 456  # kernel-built 64-bit frames: fpstate == frame + 456
RED_ZONE = 128  # 64-bit frames are placed below the interrupted SP's red zone


def _ia32(name: str, size: int, sigcontext: int) -> Struct:
    """ia32 frames: u32 pretcode and sig, then a struct sigcontext_32 at ``sigcontext``."""
    return Struct(
        name,
        size,
        (
            Field("pretcode", 0, "I"),
            Field("sig", 4, "I"),
            Field("sp", sigcontext + 28, "I"),
            Field("ip", sigcontext + 56, "I"),
            Field("cs", sigcontext + 60, "I"),
            Field("fpstate", sigcontext + 76, "I"),
        ),
    )


RT_SIGFRAME_IA32 = _ia32("rt_sigframe_ia32", 268, 164)  # uc.uc_mcontext at +164
SIGFRAME_IA32 = _ia32("sigframe_ia32", 736, 8)  # sc at +8
IA32_RT_KERNEL_FPSTATE_OFFSET = 276
IA32_KERNEL_FPSTATE_OFFSET = 740
IA32_FSAVE_HEADER = 112  # FSAVE-format header before the FXSAVE/XSAVE image on ia32 frames

UC_FP_XSTATE = 0x1
UC_SIGCONTEXT_SS = 0x2
UC_STRICT_RESTORE_SS = 0x4
UC_KNOWN_FLAGS = UC_FP_XSTATE | UC_SIGCONTEXT_SS | UC_STRICT_RESTORE_SS
USER_CS_64 = 0x33
USER_CS_32 = 0x23
SA_SIGINFO = 0x4
SA_ONSTACK = 0x08000000
SA_RESTORER = 0x04000000
