"""Plan -> file changes: where the patched bytes go in the images, and what a relocation adds.

Pure with respect to the checkpoint: it reads the images (through the model) but writes nothing; the
result is a list of :mod:`criu_xstate.transaction` changes.

Relocation (research/kernel.md §0.1, §7.8): an XSAVE image that must grow cannot stay on the stack, so
it moves to a new anonymous private mapping that the restored process will have: a VMA appended to
``mm-<pid>.img``, a ``PE_PRESENT`` run appended to ``pagemap-<pid>.img`` and its pages appended to
``pages-<id>.img``, placed above every existing mapping so that both lists stay in address order and
the pages file only grows at its end. The frame's ``fpstate`` pointer is rewritten to the new image.

A page this checkpoint takes from its parent (``PE_PARENT``: an incremental dump after ``criu pre-dump``,
where a handler's untouched stack usually is) has no bytes in this directory to edit. Its new content
is a :class:`ParentPage`, which only an incremental copy can hold (``apply --out``: the page becomes
``PE_PRESENT`` in the overlay, overlay.py); rewriting the images in place refuses it, since the parent
may be the base of other checkpoints.
"""

from __future__ import annotations

import struct
from collections import defaultdict

from criu_xstate.errors import ApplyError, MemoryUnreadable
from criu_xstate.images.addrspace import PAGE, VMA_ANON_PRIVATE, VMA_AREA_REGULAR
from criu_xstate.images.framing import CORE, MM, encode_image, read_file
from criu_xstate.images.pagemap import PE_PARENT, append_run
from criu_xstate.images.pb import core_pb2, mm_pb2
from criu_xstate.images.rewrite import single_pb
from criu_xstate.model import XSAVE_FIELDS, CheckpointModel, Process
from criu_xstate.plan import FrameAction, HostFacts, Plan
from criu_xstate.records import record
from criu_xstate.transaction import Append, ByteEdit, Change, FileWrite
from criu_xstate.translate import MemoryPatch, Relocation, frame_patches, pointer_patch
from criu_xstate.x86.xfeatures import PKRU
from criu_xstate.x86.xsave import align_up

TASK_SIZE = 0x7FFFFFFFF000
PROT_READ_WRITE = 0x3
MAP_PRIVATE_ANONYMOUS = 0x22
GUARD = PAGE


@record
class ParentPage:
    """The whole new content of the page at ``vaddr``, which ``pagemap`` takes from the parent images."""

    pagemap: str
    vaddr: int
    new: bytes


@record
class ChangeSet:
    """Every byte change a plan needs, by image file, with counts of what the changes do."""

    changes: list[Change]
    frames_rewritten: int
    frames_relocated: int
    relocation_vmas: list[tuple[int, int, int]]  # (pid, start, end)
    cores_rewritten: int = 0
    glibc_sizes_rewritten: int = 0
    parent_pages: tuple[ParentPage, ...] = ()


def _core_change(proc: Process, tid: int, drop: int, pkru: int | None) -> FileWrite | None:
    """core-<tid>.img as the plan decided (thread_rules): the components in ``drop`` left out (in
    their init state and absent on the destination: CRIU would skip them anyway, the image now says
    so), and ``pkru`` carried in when the image had none and the destination has protection keys
    (CRIU copies a component only when the image's xstate_bv names it: research/criu.md §3.2)."""
    if not drop and pkru is None:
        return None
    path = proc.checkpoint.path_of(f"core-{tid}.img")
    old = read_file(path)
    core = single_pb(old, CORE, core_pb2.core_entry, path)  # protobuf: it writes the entry back
    xs = core.thread_info.fpregs.xsave
    xs.xstate_bv = int(xs.xstate_bv) & ~drop
    for n, name in XSAVE_FIELDS.items():
        if drop >> n & 1:
            xs.ClearField(name)
    if pkru is not None:
        xs.xstate_bv = int(xs.xstate_bv) | 1 << PKRU
        del xs.pkru[:]
        xs.pkru.extend([pkru, 0])  # the 8-byte component as CRIU stores it: PKRU, then 4 padding bytes
    return FileWrite(path.name, old, encode_image(CORE.head, CORE.magic, [core.SerializeToString()]))


def _byte_edits(
    proc: Process, patch: MemoryPatch, parents: dict[tuple[int, int], bytearray]
) -> list[ByteEdit]:
    """Edits of this directory's pages file; the parts of ``patch`` on pages the parent holds go into
    ``parents`` ((pid, page) -> the page's new bytes, read through the chain first)."""
    space = proc.address_space
    edits: list[ByteEdit] = []
    pos, end = patch.vaddr, patch.vaddr + len(patch.new)
    try:
        while pos < end:
            page = pos // PAGE * PAGE
            n = min(end, page + PAGE) - pos
            data = patch.new[pos - patch.vaddr : pos - patch.vaddr + n]
            run = space.run_at(pos)
            if run is not None and run.file_offset is None and run.flags & PE_PARENT:
                buf = parents.get((proc.pid, page))
                if buf is None:
                    buf = parents[(proc.pid, page)] = bytearray(space.read(page, PAGE))
                buf[pos - page : pos - page + n] = data
            else:
                old = space.read(pos, n)
                at = 0
                for path, offset, length in space.locate(pos, n):
                    edits.append(ByteEdit(path.name, offset, old[at : at + length], data[at : at + length]))
                    at += length
            pos += n
    except MemoryUnreadable as exc:
        raise ApplyError(f"pid {proc.pid}: cannot rewrite 0x{patch.vaddr:x}: {exc.reason}") from None
    return edits


def _pack(relocs: list[Relocation]) -> tuple[list[tuple[Relocation, int]], bytearray]:
    """The relocated images laid out 64-byte aligned in whole pages: (image, offset) and the bytes."""
    layout: list[tuple[Relocation, int]] = []
    offset = 0
    for r in relocs:
        offset = align_up(offset)  # an XSAVE image starts 64-byte aligned
        layout.append((r, offset))
        offset += len(r.image)
    data = bytearray((offset + PAGE - 1) // PAGE * PAGE)
    for r, off in layout:
        data[off : off + len(r.image)] = r.image
    return layout, data


def _place(proc: Process, size: int) -> int:
    """Where the new mapping goes: above every mapping and every pagemap run, one guard page apart
    (both lists stay in address order, the pages file only grows at its end)."""
    mm = proc.checkpoint.mm(proc.pid)
    top = max((int(v.end) for v in mm.vmas if int(v.end) <= TASK_SIZE), default=0)
    last_run = max((r.end for r in proc.address_space.runs), default=0)
    start = (max(top, last_run) + GUARD + PAGE - 1) // PAGE * PAGE
    if start + size > TASK_SIZE:
        raise ApplyError(f"pid {proc.pid}: no room above the highest mapping for a relocated XSAVE image")
    return start


def _mm_with(proc: Process, start: int, size: int) -> FileWrite:
    """mm-<pid>.img with an anonymous private read-write VMA [start, start + size) added in order."""
    path = proc.checkpoint.path_of(f"mm-{proc.pid}.img")
    old = read_file(path)
    mm = single_pb(old, MM, mm_pb2.mm_entry, path)  # protobuf: it writes the entry back
    template = next((v for v in mm.vmas if int(v.status) & VMA_ANON_PRIVATE), None)
    vma = mm_pb2.vma_entry()
    if template is not None:
        vma.CopyFrom(template)
    vma.start, vma.end, vma.pgoff, vma.shmid = start, start + size, 0, 0
    vma.prot, vma.flags = PROT_READ_WRITE, MAP_PRIVATE_ANONYMOUS
    vma.status, vma.fd, vma.madv = VMA_AREA_REGULAR | VMA_ANON_PRIVATE, -1, 0
    new_mm = mm_pb2.mm_entry()
    new_mm.CopyFrom(mm)
    del new_mm.vmas[:]
    new_mm.vmas.extend(sorted([*mm.vmas, vma], key=lambda v: int(v.start)))  # CRIU requires address order
    return FileWrite(path.name, old, encode_image(MM.head, MM.magic, [new_mm.SerializeToString()]))


def _pagemap_with(proc: Process, start: int, size: int) -> FileWrite:
    """pagemap-<pid>.img with one PE_PRESENT run for the new mapping appended (its pages go last)."""
    path = proc.checkpoint.path_of(f"pagemap-{proc.pid}.img")
    old = path.read_bytes()
    return FileWrite(path.name, old, append_run(old, proc.checkpoint.runs(proc.pid), start, size // PAGE))


def _relocate(
    proc: Process, relocs: list[Relocation], parents: dict[tuple[int, int], bytearray]
) -> tuple[list[Change], tuple[int, int]]:
    """New mapping for the relocated images of one process, and the pointer patches into it."""
    space = proc.address_space
    layout, data = _pack(relocs)
    start = _place(proc, len(data))
    pages_size = space.pages_path.stat().st_size if space.pages_path.exists() else 0
    if pages_size != space.present_bytes:
        raise ApplyError(
            f"{space.pages_path}: {pages_size} bytes but the pagemap accounts for {space.present_bytes}: "
            "refusing to append a relocated image"
        )
    changes: list[Change] = [
        Append(space.pages_path.name, pages_size, bytes(data)),
        _pagemap_with(proc, start, len(data)),
        _mm_with(proc, start, len(data)),
    ]
    for r, off in layout:
        changes += _byte_edits(proc, pointer_patch(r, start + off), parents)
    return changes, (start, start + len(data))


def build_changeset(model: CheckpointModel, plan: Plan, dest: HostFacts) -> ChangeSet:
    procs = {p.pid: p for p in model.processes}
    changes: list[Change] = []
    relocs: dict[int, list[Relocation]] = defaultdict(list)
    rewritten = sizes = 0
    parents: dict[tuple[int, int], bytearray] = {}
    for t in plan.threads:
        proc = procs[t.state.pid]
        for d in t.frames:
            if d.action not in (FrameAction.TRANSLATE, FrameAction.RELOCATE):
                continue
            patches, reloc = frame_patches(proc.pid, d, dest)
            for p in patches:
                changes += _byte_edits(proc, p, parents)
            if reloc is not None:
                relocs[proc.pid].append(reloc)
            rewritten += 1
    for pp in plan.processes:  # glibc's cached save-area sizes (plan/glibc_rules.py)
        for vaddr, size in pp.size_patches:
            changes += _byte_edits(
                procs[pp.pid], MemoryPatch(pp.pid, vaddr, struct.pack("<Q", size)), parents
            )
            sizes += 1
    vmas: list[tuple[int, int, int]] = []
    for pid, rs in relocs.items():
        more, (start, end) = _relocate(procs[pid], rs, parents)
        changes += more
        vmas.append((pid, start, end))
    # A drop alone changes nothing CRIU would do; it goes in only alongside a real translation.
    real = bool(changes) or bool(parents) or any(t.core_pkru is not None for t in plan.threads)
    cores = [
        c
        for t in plan.threads
        if (c := _core_change(procs[t.state.pid], t.state.tid, t.core_drop if real else 0, t.core_pkru))
    ]
    changes += cores
    relocated = sum(len(r) for r in relocs.values())
    pages = tuple(
        ParentPage(f"pagemap-{pid}.img", page, bytes(b)) for (pid, page), b in sorted(parents.items())
    )
    return ChangeSet(changes, rewritten, relocated, vmas, len(cores), sizes, pages)
