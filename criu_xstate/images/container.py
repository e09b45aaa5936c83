"""Container metadata beside the CRIU images: Podman's and CRI-O's ``config.dump`` and ``spec.dump``.

``show`` prints what checkpointctl prints first (name, ID, image, runtime, engine, creation time), so
that a checkpoint is recognisable before anything is planned. Both files are hostile input: read only
if they are small regular files, and anything that is not the expected JSON is simply not shown.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from criu_xstate.records import record

MAX_META_BYTES = 4 << 20
META_FILES = ("config.dump", "spec.dump")
ARCHIVE_META_DIR = ".criu-xstate-meta"  # where archive extraction puts them, beside the images


@record
class ContainerMeta:
    """What the runtime recorded about a container checkpoint."""

    name: str | None
    id: str | None
    image: str | None
    runtime: str | None
    engine: str
    created: str | None


def _read_json(path: Path) -> dict[str, object] | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_META_BYTES:
            return None
        doc = json.loads(os.read(fd, MAX_META_BYTES + 1))
    except (OSError, ValueError, RecursionError):
        return None
    finally:
        os.close(fd)
    return doc if isinstance(doc, dict) else None


def _text(doc: dict[str, object] | None, *keys: str) -> str | None:
    for key in keys:
        value = (doc or {}).get(key)
        if isinstance(value, str) and value and value.isprintable():
            return value[:256]
    return None


def _engine(annotations: object) -> str:
    if not isinstance(annotations, dict):
        return "unknown"
    if annotations.get("io.container.manager") == "libpod":
        return "Podman"
    if any(isinstance(k, str) and k.startswith("io.kubernetes.cri-o.") for k in annotations):
        return "CRI-O"
    return "unknown"


def read_container_meta(images: Path) -> ContainerMeta | None:
    """The metadata of the container whose images are in ``images`` (an extracted archive, or a
    Podman ``userdata/checkpoint`` directory with the files one level up), or None."""
    for where in (images / ARCHIVE_META_DIR, images, images.parent):
        config = _read_json(where / "config.dump")
        spec = _read_json(where / "spec.dump")
        if config is None and spec is None:
            continue
        annotations = (spec or {}).get("annotations")
        return ContainerMeta(
            name=_text(config, "name"),
            id=_text(config, "id"),
            image=_text(config, "rootfsImageName", "RawImageName"),
            runtime=_text(config, "runtime", "OCIRuntime"),
            engine=_engine(annotations),
            created=_text(config, "createdTime"),
        )
    return None
