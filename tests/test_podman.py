"""Podman 4.3 + runc end to end with private storage and configuration (never /etc):

- the default export (zstd, whatever the file is called) and `--compress gzip` are read by plan;
- apply on an export writes an archive that `podman container restore --import` restores: the
  frames put in another CPU's layout lose the YMM upper halves when restored as they are (control),
  and the archive translated back for this host restores with every register intact;
- a refusal through Podman as the user sees it: the hook named by the container's `org.criu.config`
  annotation refuses, podman exits 125 with "criu failed", the reason is in the container's
  restore.log, the container is left Created;
- checkpointctl 1.3.0 (trixie's) reads the archives apply writes.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from criu_xstate.cli import main
from criu_xstate.images.checkpoint import archive_format
from tests.realcriu import criu_path
from tests.runtimes import Podman, podman_skip_reason
from tests.test_runtimes import foreign_profile, no_avx_profile

pytestmark = [pytest.mark.slow, pytest.mark.criu, pytest.mark.runtime]


@pytest.fixture
def podman(tmp_path: Path) -> Iterator[Podman]:
    reason = podman_skip_reason()
    if reason:
        pytest.skip(reason)
    p = Podman(tmp_path / "podman")
    try:
        p.setup()
        yield p
    finally:
        p.teardown()


def _plan_verdict(path: Path, dest: str, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["plan", str(path), "--dest", dest, "--json"]) in (0, 1)
    return str(json.loads(capsys.readouterr().out)["verdict"])


def test_podman_exports_translated_and_restored(
    tmp_path: Path, podman: Podman, capsys: pytest.CaptureFixture[str]
) -> None:
    here = tmp_path / "here.yaml"
    assert main(["probe", "-o", str(here), "--name", "this-host"]) == 0
    podman.start_workload("xs")
    zst, gz = tmp_path / "export.tar.gz", tmp_path / "export-gzip.tar.gz"
    podman.run("container", "checkpoint", "xs", "--leave-running", f"--export={gz}", "--compress", "gzip")
    podman.run("container", "checkpoint", "xs", f"--export={zst}")
    assert (archive_format(zst), archive_format(gz)) == ("zstd", "gzip")
    for export in (zst, gz):
        assert _plan_verdict(export, str(here), capsys) == "compatible"
    podman.run("rm", "-f", "xs")

    foreign, back = tmp_path / "foreign.tar.gz", tmp_path / "back.tar.gz"
    assert main(["apply", str(zst), "--dest", foreign_profile(), "--out", str(foreign)]) == 0
    assert main(["apply", str(foreign), "--dest", str(here), "--out", str(back)]) == 0
    assert archive_format(foreign) == archive_format(back) == "zstd"

    podman.clean_out()
    podman.run("container", "restore", "--import", str(foreign))
    lost = podman.result("xs")
    assert lost and all("CORRUPT" in line for line in lost), (lost, podman.log)
    podman.run("rm", "-f", "xs")

    podman.clean_out()
    podman.run("container", "restore", "--import", str(back))
    lines = podman.result("xs")
    assert lines and all(line.endswith(" OK") for line in lines), (lines, podman.log)

    # checkpointctl 1.3.0 (trixie's, in the CRIU prefix: scripts/get-criu) reads what apply wrote.
    checkpointctl = criu_path().parent / "checkpointctl"
    r = subprocess.run(
        [str(checkpointctl), "inspect", "--format", "json", str(back)], capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr
    (info,) = json.loads(r.stdout)
    assert (info["container_name"], info["engine"], info["runtime"]) == ("xs", "Podman", "runc")
    capsys.readouterr()
    assert main(["show", str(back), "--json"]) == 0  # show names the container as checkpointctl does
    ours = json.loads(capsys.readouterr().out)["container"]
    assert (ours["name"], ours["id"], ours["image"], ours["runtime"], ours["engine"]) == (
        info["container_name"],
        info["id"],
        info["image"],
        info["runtime"],
        info["engine"],
    )


def test_podman_restore_refused_by_the_hook(tmp_path: Path, podman: Podman) -> None:
    hook = tmp_path / "hook"
    criu_conf = hook / "criu.conf"
    argv = ["hook-install", "--script", str(hook / "criu-xstate-hook"), "--config", str(hook / "config.yaml")]
    assert main([*argv, "--criu-config", str(criu_conf), "--dest", str(no_avx_profile(tmp_path))]) == 0
    podman.start_workload("xs", "--annotation", f"org.criu.config={criu_conf}")
    export = tmp_path / "export.tar.gz"
    podman.run("container", "checkpoint", "xs", f"--export={export}")
    podman.run("rm", "-f", "xs")
    before = export.read_bytes()
    r = podman.run("container", "restore", "--import", str(export), check=False)
    assert r.returncode == 125 and "criu failed" in r.stderr, r.stderr
    log = Path(r.stderr.split("log file: ")[-1].strip())
    text = log.read_text()
    assert "COMPONENT_IN_USE_MISSING_ON_DEST" in text and "refusing the restore" in text
    state = podman.run("ps", "-a", "--format", "{{.Names}} {{.Status}}").stdout
    assert "xs Created" in state
    assert export.read_bytes() == before
