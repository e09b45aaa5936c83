"""YAML for small hostile files (host profiles, the hook policy): bounded size and depth, no anchors,
aliases or tags (the "billion laughs" and object-construction attacks), safe_load only.
Limits and why: docs/hostile-input.md."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import TYPE_CHECKING

from criu_xstate.errors import ProfileError

if TYPE_CHECKING:
    import yaml

MAX_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_SCALAR_CHARS = 4096
FORCE_PURE = False  # tests run the hostile-input cases with both loaders


def read_text(path: Path, max_bytes: int = MAX_BYTES) -> str:
    """A small regular file's text: never a FIFO or device (it would block), bounded."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ProfileError(path, "no such file") from None
    except OSError as exc:
        raise ProfileError(path, f"unreadable: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ProfileError(path, "not a regular file")
        if st.st_size > max_bytes:
            raise ProfileError(path, f"{st.st_size} bytes: larger than the {max_bytes}-byte limit")
        data = os.read(fd, max_bytes + 1)
    except OSError as exc:
        raise ProfileError(path, f"unreadable: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise ProfileError(path, "not UTF-8 text") from None


class _MappingKeys:
    """Refuses a key given twice in one mapping (``safe_load`` silently keeps the last one, so a second
    ``name:`` or ``xcr0:`` further down would quietly win) and keys that are lists or mappings."""

    def __init__(self, where: str | Path) -> None:
        self.where = where
        self.stack: list[tuple[set[str], list[bool]] | None] = []  # per open mapping: keys, expecting a key

    def see(self, event: object) -> None:
        import yaml

        if isinstance(event, yaml.CollectionEndEvent):
            self.stack.pop()
            return
        if not isinstance(event, yaml.ScalarEvent | yaml.CollectionStartEvent):
            return
        parent = self.stack[-1] if self.stack else None
        if parent is not None:
            seen, expecting_key = parent
            if expecting_key[0]:
                self._key(event, seen)
            expecting_key[0] = not expecting_key[0]
        if isinstance(event, yaml.MappingStartEvent):
            self.stack.append((set(), [True]))
        elif isinstance(event, yaml.SequenceStartEvent):
            self.stack.append(None)

    def _key(self, event: object, seen: set[str]) -> None:
        import yaml

        if not isinstance(event, yaml.ScalarEvent):
            raise ProfileError(self.where, "a list or mapping as a YAML key is not accepted")
        if event.value in seen:
            raise ProfileError(self.where, f"key {event.value[:40]!r} appears twice in one mapping")
        seen.add(event.value)


def _loader() -> type[yaml.SafeLoader] | type[yaml.CSafeLoader]:
    """libyaml's CSafeLoader when PyYAML was built with it (12x faster: 0.36 ms a profile instead of
    4.5), else the pure SafeLoader. Both give the same events, checked below before anything is
    constructed, so every limit holds with either (tests/test_hosts.py runs with both)."""
    import yaml

    if FORCE_PURE or not getattr(yaml, "__with_libyaml__", False):
        return yaml.SafeLoader
    return yaml.CSafeLoader


def load(text: str, where: str | Path) -> object:
    """Parse ``text``; anything beyond plain nested mappings, lists and scalars is one ProfileError."""
    import yaml

    if len(text) > MAX_BYTES:
        raise ProfileError(where, f"larger than the {MAX_BYTES}-byte limit")
    depth = 0
    keys = _MappingKeys(where)
    loader = _loader()
    try:
        for event in yaml.parse(text, Loader=loader):
            keys.see(event)
            if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None):
                raise ProfileError(where, "YAML anchors and aliases are not accepted")
            tag = getattr(event, "tag", None)
            if tag:
                raise ProfileError(where, f"YAML tag {str(tag)[:40]!r} is not accepted")
            if isinstance(event, yaml.CollectionStartEvent):
                depth += 1
                if depth > MAX_DEPTH:
                    raise ProfileError(where, f"nested deeper than {MAX_DEPTH} levels")
            elif isinstance(event, yaml.CollectionEndEvent):
                depth -= 1
            elif isinstance(event, yaml.ScalarEvent) and len(event.value) > MAX_SCALAR_CHARS:
                raise ProfileError(where, f"a value longer than {MAX_SCALAR_CHARS} characters")
        return yaml.load(text, Loader=loader)
    except yaml.YAMLError as exc:
        raise ProfileError(where, f"not valid YAML: {' '.join(str(exc).split())[:200]}") from None
    except RecursionError:
        raise ProfileError(where, "nested too deeply") from None
