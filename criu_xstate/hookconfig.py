"""The CRIU hook's policy: a small YAML file, environment variables only as overrides.

Runtimes do not pass their caller's environment to CRIU's action scripts (Podman before 4.8 passes
PATH, HOME and its own variables only: research/runtimes.md), so the hook reads its policy from a file.
The installed action script (``criu-xstate hook-install``) names that file in ``CRIU_XSTATE_CONFIG``
itself; without it, ``/etc/criu-xstate/config.yaml`` is read if present. docs/hook.md.

    dest: probe            # probe this machine (default), a shipped profile name, or a profile path
    mode: enforce          # enforce: translate or refuse | check: refuse what needs a rewrite
                           # warn: never block, only log | off: do nothing
    relocate: true         # allow moving XSAVE images to a new mapping
    strict_isa: false      # refuse when the destination lacks CPU flags of the source
    log: /var/log/criu-xstate.jsonl   # optional: one JSON line per decision
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from criu_xstate.errors import ProfileError
from criu_xstate.records import record

DEFAULT_CONFIG = Path("/etc/criu-xstate/config.yaml")
MODES = ("enforce", "check", "warn", "off")
_ALIASES = {"apply": "enforce"}  # the hook's mode names before the config file existed
MAX_CONFIG_BYTES = 64 << 10


@record
class HookConfig:
    """The hook's policy: destination, mode, relocation, ISA strictness, log file."""

    dest: str = "probe"
    mode: str = "enforce"
    relocate: bool = True
    strict_isa: bool = False
    log: str | None = None
    source: str = "defaults"  # where the settings came from, for `hook-check` and the log


def _mode(value: object, where: str) -> str:
    if value is False:  # YAML 1.1 reads a bare `off` as false
        return "off"
    mode = _ALIASES.get(str(value), str(value))
    if mode not in MODES:
        raise ProfileError(where, f"mode must be one of {', '.join(MODES)}, got {str(value)[:40]!r}")
    return mode


def _bool(doc: Mapping[str, object], key: str, default: bool, where: str) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise ProfileError(where, f"{key} must be true or false")
    return value


def _text(doc: Mapping[str, object], key: str, where: str) -> str | None:
    value = doc.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or not value.isprintable() or len(value) > 4096:
        raise ProfileError(where, f"{key} must be a printable string")
    return value


SETTINGS = ("dest", "mode", "relocate", "strict_isa", "log")
# The policy as hook-install writes it and people edit it: `setting: word  # comment` lines. Such a
# file is read without PyYAML (~13 ms of every hook); anything else goes to safeyaml. A word here is
# what YAML 1.1 reads as a plain scalar: a bool or null when it is one of these words, else a string
# (YAML's numbers, timestamps and `<<` / `=` all start with a character a word here cannot start with).
_LINE = re.compile(  # a setting, its comment after a space (`a#b` is one word); or a comment; or blank
    r"(?P<key>[a-z_]+): +(?P<value>[A-Za-z_/][A-Za-z0-9_./-]*)(?: +#[ -~]*| *)|(?: *#[ -~]*| *)"
)
_WORDS: dict[str, bool | None] = {
    **{w: True for w in ("yes", "Yes", "YES", "true", "True", "TRUE", "on", "On", "ON")},
    **{w: False for w in ("no", "No", "NO", "false", "False", "FALSE", "off", "Off", "OFF")},
    **{w: None for w in ("null", "Null", "NULL")},
}


def _flat(text: str) -> dict[str, object] | None:
    """``text`` as ``yaml.safe_load`` reads it when it is only setting lines, comments and blank lines
    (tests/test_hookconfig.py compares the two on generated files); else None."""
    doc: dict[str, object] = {}
    for line in text.split("\n"):
        m = _LINE.fullmatch(line)
        if m is None:
            return None
        key, value = m["key"], m["value"]
        if key is None:
            continue
        if key not in SETTINGS or key in doc:
            return None  # safeyaml names the unknown or repeated setting
        doc[key] = _WORDS.get(value, value)
    return doc


def parse(text: str, where: str) -> HookConfig:
    from criu_xstate import safeyaml

    if len(text) > MAX_CONFIG_BYTES:
        raise ProfileError(where, f"larger than {MAX_CONFIG_BYTES} bytes")
    flat = _flat(text)
    # safeyaml: no anchors, aliases, tags or repeated keys; bounded
    doc = flat if flat is not None else safeyaml.load(text, where)
    doc = {} if doc is None else doc
    if not isinstance(doc, dict):
        raise ProfileError(where, "must be a mapping of settings")
    unknown = set(doc) - set(SETTINGS)
    if unknown:
        raise ProfileError(where, f"unknown setting(s): {', '.join(sorted(map(str, unknown)))}")
    return HookConfig(
        dest=_text(doc, "dest", where) or "probe",
        mode=_mode(doc.get("mode", "enforce"), where),
        relocate=_bool(doc, "relocate", True, where),
        strict_isa=_bool(doc, "strict_isa", False, where),
        log=_text(doc, "log", where),
        source=where,
    )


def load(env: Mapping[str, str] | None = None) -> HookConfig:
    """The file named by ``CRIU_XSTATE_CONFIG`` (it must exist), else the default file if present,
    then ``CRIU_XSTATE_DEST`` / ``CRIU_XSTATE_MODE`` from the environment as overrides."""
    env = os.environ if env is None else env
    named = env.get("CRIU_XSTATE_CONFIG")
    path = Path(named) if named else DEFAULT_CONFIG
    config = HookConfig()
    if named or path.is_file():
        from criu_xstate import safeyaml

        try:  # a regular file only (a FIFO would hold the restore forever), bounded, UTF-8
            text = safeyaml.read_text(path, MAX_CONFIG_BYTES)
        except ProfileError as exc:
            raise ProfileError(path, f"cannot read the hook config: {exc.message}") from None
        config = parse(text, str(path))
    overrides: dict[str, str] = {}
    if env.get("CRIU_XSTATE_DEST"):
        overrides["dest"] = env["CRIU_XSTATE_DEST"]
    if env.get("CRIU_XSTATE_MODE"):
        overrides["mode"] = _mode(env["CRIU_XSTATE_MODE"], "CRIU_XSTATE_MODE")
    if overrides:
        from criu_xstate.records import replace

        config = replace(config, source=f"{config.source} + environment", **overrides)
    return config
