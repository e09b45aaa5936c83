"""The hook policy's fast reader: on every file it accepts it reads what PyYAML reads, and it accepts
the files hook-install writes; everything else goes through safeyaml's checks."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from criu_xstate import hookconfig, safeyaml
from criu_xstate.commands.hookcmds import config_text
from criu_xstate.errors import ProfileError

KEYS = st.sampled_from([*hookconfig.SETTINGS, "Mode", "on", "yes", "x", "dest2", "<<"])
SEPARATORS = st.sampled_from([": ", ":  ", ":", ": \t", " : ", ":\t"])
SPECIAL = [
    "yes",
    "No",
    "off",
    "OFF",
    "oN",
    "y",
    "n",
    "Y",
    "N",
    "true",
    "tRue",
    "~",
    "null",
    "NULL",
    "Null",
    "nulL",
    "0x10",
    "1:20",
    "2001-12-14",
    ".inf",
    "<<",
    "=",
    "/var/x.jsonl",
    "a#b",
    "-x",
    "_x",
    "o",
    "",
    "'q'",
    "1_000",
    "0o7",
    "+1",
    "1e3",
    "amd-zen4",
    "./p.yaml",
    "a:b",
    "a: b",
    "!!str x",
    "&a x",
    "*a",
    "[x]",
    "{a: 1}",
]
VALUES = st.one_of(
    st.sampled_from(SPECIAL), st.text(st.sampled_from("aZ09_./-:#'\" \t~<=!&*|>%@`,[]{}é"), max_size=8)
)
TRAILERS = st.sampled_from(["", "  ", " # c", "#c", " #", "\t# x", " # é", " # \x07"])
OTHER_LINES = st.sampled_from(
    ["", "# a comment", "  # x", "   ", "---", "...", "%YAML 1.1", "\t", "  dest: x", "- a"]
)


WORDS = st.sampled_from([v for v in SPECIAL if (v and v[0].isalpha()) or v.startswith(("/", "_"))])
NEAR_WORDS = st.one_of(WORDS, VALUES)


@st.composite
def policy(draw: st.DrawFn) -> str:
    """Mostly files of setting lines (each setting once), with near misses of every kind mixed in."""
    keys = draw(st.permutations(hookconfig.SETTINGS))[: draw(st.integers(0, 5))]
    lines = []
    for key in keys:
        if draw(st.integers(0, 4)) == 0:  # a near miss
            line = draw(st.tuples(KEYS, SEPARATORS, NEAR_WORDS, TRAILERS).map("".join))
        else:
            line = key + ": " + draw(WORDS) + draw(st.sampled_from(["", "", "  # c", " #", "#c", " "]))
        lines.append(line)
        if draw(st.integers(0, 3)) == 0:
            lines.append(draw(OTHER_LINES))
    text = draw(st.sampled_from(["\n", "\n", "\r\n"])).join(lines) + draw(st.sampled_from(["", "\n"]))
    return draw(st.sampled_from(["", "", "\ufeff"])) + text


@settings(max_examples=1500, deadline=None)
@given(policy())
def test_what_the_fast_reader_accepts_it_reads_as_yaml_does(text: str) -> None:
    flat = hookconfig._flat(text)
    if flat is None:
        return
    assert yaml.safe_load(text) == (flat or None), repr(text)
    assert safeyaml.load(text, "c.yaml") == (flat or None), repr(text)


@pytest.mark.parametrize("mode", hookconfig.MODES)
@pytest.mark.parametrize("dest", ["probe", "amd-zen4", "/etc/criu-xstate/hosts/this.yaml"])
def test_the_files_hook_install_writes_are_read_without_yaml(dest: str, mode: str) -> None:
    text = config_text(dest, mode)
    assert hookconfig._flat(text) == yaml.safe_load(text)


def test_the_fast_reader_leaves_repeated_and_unknown_settings_to_safeyaml() -> None:
    for text in ["mode: warn\nmode: off\n", "colour: red\n", "mode: 'warn'\n"]:
        assert hookconfig._flat(text) is None
    with pytest.raises(ProfileError, match="appears twice"):
        hookconfig.parse("mode: warn\nmode: off\n", "c.yaml")
    assert hookconfig.parse("mode: 'warn'\n", "c.yaml").mode == "warn"


def test_a_fifo_as_the_policy_is_refused_not_waited_on(tmp_path: Path) -> None:
    fifo = tmp_path / "config.yaml"
    os.mkfifo(fifo)
    result: list[BaseException | None] = []

    def load() -> None:
        try:
            hookconfig.load({"CRIU_XSTATE_CONFIG": str(fifo)})
            result.append(None)
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive():  # unblock the reader before failing
        with open(fifo, "w"):
            pass
        pytest.fail("the hook waited on a FIFO")
    assert isinstance(result[0], ProfileError) and "not a regular file" in str(result[0])
