"""``files.img``: which regular file each file id names (CRIU images/fdinfo.proto, regfile.proto).

A file-backed VMA's ``shmid`` is the id of a ``reg_file_entry`` here; :mod:`criu_xstate.glibc` uses
it to find the loader a process mapped, with the size and build-id CRIU saw when it dumped.
"""

from __future__ import annotations

from criu_xstate.images.checkpoint import Checkpoint
from criu_xstate.images.framing import IMG_COMMON_MAGIC, ImageKind, read_messages
from criu_xstate.images.wire import message_type
from criu_xstate.records import record

FILES = ImageKind("files", 0x56303138, IMG_COMMON_MAGIC)
FD_TYPE_REG = 1
MAX_FILES = 1 << 18
FILE_ENTRY = message_type("file_entry")


@record
class RegFile:
    """One regular file of files.img: what glibc.py needs to find a process's loader."""

    id: int
    name: str  # as CRIU recorded it: relative to the process's root (CRIU writes a leading "/")
    size: int | None
    build_id: bytes | None


def read_reg_files(ck: Checkpoint) -> dict[int, RegFile]:
    """Regular files by id; an absent files.img (a checkpoint cut down to what frames need) is empty."""
    path = ck.path_of("files.img")
    if not path.exists():
        return {}
    out: dict[int, RegFile] = {}
    for e in read_messages(path, FILES, FILE_ENTRY, MAX_FILES).entries:
        if int(e.type) != FD_TYPE_REG or not e.HasField("reg"):
            continue
        r = e.reg
        build_id = b"".join(int(w).to_bytes(4, "little") for w in r.build_id) if r.build_id else None
        name = bytes(r.name).decode("utf-8", "surrogateescape")
        out[int(e.id)] = RegFile(int(e.id), name, int(r.size) if r.HasField("size") else None, build_id)
    return out
