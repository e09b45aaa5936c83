"""Error types, one per layer. The CLI turns each into one line on stderr and an exit code."""

from __future__ import annotations

from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """The exit-code contract of every command and of the CRIU hook (README "Exit codes")."""

    OK = 0  # safe: as is, or after apply
    REFUSED = 1  # state would be lost or the task killed; compare: B lacks something
    BAD_INPUT = 2  # bad usage, unreadable or invalid input, a write that was refused or rolled back
    INTERNAL = 3  # a bug, or a translation that did not verify


class CriuXstateError(Exception):
    """Base class: bad or unreadable input (exit code 2) unless a subclass says otherwise."""

    exit_code: int = ExitCode.BAD_INPUT


class ImageError(CriuXstateError):
    """A CRIU image or checkpoint source is missing, truncated, corrupted or hostile."""

    def __init__(self, path: str | Path | None, message: str) -> None:
        self.path = str(path) if path is not None else None
        self.message = message
        super().__init__(f"{self.path}: {message}" if self.path else message)


class MemoryUnreadable(ImageError):
    """Guest memory that the checkpoint does not hold (lazy pages, unmapped, missing parent)."""

    def __init__(self, path: str | Path | None, vaddr: int, size: int, reason: str) -> None:
        self.vaddr = vaddr
        self.size = size
        self.reason = reason
        super().__init__(path, f"memory 0x{vaddr:x}..0x{vaddr + size:x} unreadable: {reason}")


class ProfileError(CriuXstateError):
    """A host profile is invalid or cannot be built from its sources."""

    def __init__(self, source: str | Path | None, message: str) -> None:
        self.source = str(source) if source is not None else None
        self.message = message
        super().__init__(f"{self.source}: {message}" if self.source else message)


class ProbeError(CriuXstateError):
    """The local machine could not be probed."""


class FrameError(CriuXstateError):
    """A signal frame could not be parsed or built."""


class ApplyError(CriuXstateError):
    """Writing a translation failed; the checkpoint is left as it was (or the journal says how to undo)."""


class VerifyError(CriuXstateError):
    """After writing, the images do not plan as compatible: the write is rolled back."""

    exit_code = ExitCode.INTERNAL
