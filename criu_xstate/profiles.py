"""Host profiles shipped with the package (``criu_xstate/data/hosts``), selectable by name.

``--dest amd-zen4`` means the shipped ``amd-zen4.yaml``; anything that looks like a path (holds a ``/``
or ends in ``.yaml``/``.yml``) or exists as a file is a path. ``criu-xstate profiles`` lists them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

SHIPPED = Path(__file__).parent / "data" / "hosts"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]*")


def shipped() -> list[Path]:
    return sorted(SHIPPED.glob("*.yaml"))


def shipped_names() -> list[str]:
    return [p.stem for p in shipped()]


def resolve(ref: str) -> str:
    """A profile path for ``ref``: itself when it is a path, else the shipped profile of that name."""
    if "/" in ref or ref.endswith((".yaml", ".yml")) or Path(ref).exists() or not _NAME.fullmatch(ref):
        return ref
    path = SHIPPED / f"{ref}.yaml"
    if path.is_file():
        return str(path)
    raise argparse.ArgumentTypeError(
        f"{ref!r} is neither a file nor a shipped profile ({', '.join(shipped_names())})"
    )
