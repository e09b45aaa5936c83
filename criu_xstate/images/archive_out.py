"""Write a translated checkpoint archive: the source archive, member for member, with only the changed
CRIU images under ``checkpoint/`` replaced, in the source's own compression (zstd, gzip or plain tar).

Podman and CRI-O archives carry much besides the images (``config.dump``, ``spec.dump``,
``descriptors.json``, ``rootfs-diff.tar``, ``network.status``...): every one of them is copied byte for
byte, with its header, so that ``podman container restore --import`` and checkpointctl read the result
as they read the original (research/runtimes.md). The output is written to a temporary file beside
``out`` and renamed into place.
"""

from __future__ import annotations

import contextlib
import copy
import gzip
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from criu_xstate.errors import ApplyError
from criu_xstate.images.checkpoint import ARCHIVE_IMAGES, _open_archive, archive_format


@contextlib.contextmanager
def _compressed_writer(raw: IO[bytes], fmt: str) -> Iterator[IO[bytes]]:
    if fmt == "zstd":
        import zstandard

        with zstandard.ZstdCompressor().stream_writer(raw, closefd=False) as w:
            yield w
    elif fmt == "gzip":
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as g:
            yield g  # type: ignore[misc]
    else:
        yield raw


def _image_name(member: tarfile.TarInfo) -> str | None:
    parts = [p for p in member.name.split("/") if p not in ("", ".")]
    if len(parts) == 2 and parts[0] == ARCHIVE_IMAGES and member.isreg():
        return parts[1]
    return None


def write_archive(src: Path, images: Path, changed: set[str], out: Path) -> int:
    """Copy ``src`` to ``out``, taking the images named in ``changed`` from the directory ``images``.

    Returns the number of members written. Every changed image must replace a member of ``src``.
    """
    fmt = archive_format(src)
    tmp = out.with_name(f".{out.name}.criu-xstate-tmp")
    replaced: set[str] = set()
    count = 0
    tar_in, raw_in = _open_archive(src)
    try:
        with tar_in, tmp.open("wb") as raw_out, _compressed_writer(raw_out, fmt) as stream:
            fmt_out = tar_in.format or tarfile.PAX_FORMAT
            with tarfile.open(fileobj=stream, mode="w|", format=fmt_out) as tar_out:
                for m in tar_in:
                    tar_in.members = []  # type: ignore[attr-defined]  # streaming: forget what was read
                    name = _image_name(m)
                    if name is not None and name in changed:
                        new = copy.copy(m)
                        new.size = (images / name).stat().st_size
                        with (images / name).open("rb") as f:
                            tar_out.addfile(new, f)
                        replaced.add(name)
                    elif m.isreg():
                        tar_out.addfile(m, tar_in.extractfile(m))
                    else:
                        tar_out.addfile(m)
                    count += 1
        if replaced != changed:
            raise ApplyError(
                f"{src}: translated image(s) {sorted(changed - replaced)} are not in the archive"
            )
        with tmp.open("rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        raw_in.close()
    return count
