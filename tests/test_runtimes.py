"""runc end to end: the hook installed by `criu-xstate hook-install` (private paths, `CRIU_CONFIG_FILE`,
never /etc) guards `runc restore` of a container checkpointed inside its signal handler.

- compatible: restored as is, the workload reports every YMM register intact, nothing written;
- translated: the checkpoint's frames put in another CPU's layout (Ice Lake); the control restore
  (hook mode off) loses the YMM upper halves, the guarded restore translates them back and the workload
  reports OK; `undo` then returns the original checkpoint byte for byte;
- refused: a destination without AVX; runc restore fails, the reason is in CRIU's restore.log, the
  images are unchanged and no file is left beside them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from criu_xstate.cli import main
from tests.runtimes import RuncContainer, skip_reason

pytestmark = [pytest.mark.slow, pytest.mark.criu, pytest.mark.runtime]

JOURNAL = ".criu-xstate-journal.json"


def images_of(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


@pytest.fixture
def container(tmp_path: Path) -> Iterator[RuncContainer]:
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    c = RuncContainer(tmp_path, f"criu-xstate-test-{tmp_path.name[-12:]}")
    c.create_bundle()
    try:
        yield c
    finally:
        c.delete()


def install_hook(tmp_path: Path, c: RuncContainer, dest: str, mode: str = "enforce") -> Path:
    lib = tmp_path / "hook"
    criu_conf = lib / "criu.conf"
    argv = ["hook-install", "--script", str(lib / "criu-xstate-hook"), "--config", str(lib / "config.yaml")]
    assert main([*argv, "--criu-config", str(criu_conf), "--dest", dest, "--mode", mode]) == 0
    c.criu_config = criu_conf
    return criu_conf


def foreign_profile() -> str:
    """A shipped profile whose frames this host's kernel cannot take as they are (a larger user size:
    the restore without criu-xstate is FX-only), chosen by probing, never assumed."""
    from criu_xstate import hosts, profiles

    here = hosts.probe_local("here").xsave.user_size
    bigger = [(hosts.load_profile(p).xsave.user_size, p.stem) for p in profiles.shipped()]
    candidates = sorted((size, name) for size, name in bigger if size > here)
    if not candidates:
        pytest.fail(f"no shipped profile has a larger frame than this host ({here} B): add one")
    return "intel-icelake-sp" if any(n == "intel-icelake-sp" for _, n in candidates) else candidates[-1][1]


def no_avx_profile(tmp_path: Path) -> Path:
    """This host's probed profile without AVX: refuses the workload's YMM frame on any CPU."""
    here = tmp_path / "here.yaml"
    assert main(["probe", "-o", str(here), "--name", "this-host"]) == 0
    doc = yaml.safe_load(here.read_text())
    doc["name"] = "this-host-without-avx"
    doc["xsave"].update(xcr0="0x3", user_size=576, max_user_size=576, components={})
    doc["flags"] = [f for f in doc.get("flags", []) if "avx" not in f and "fma" not in f]
    path = tmp_path / "no-avx.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_runc_restore_of_a_compatible_checkpoint(tmp_path: Path, container: RuncContainer) -> None:
    install_hook(tmp_path, container, "probe")
    images, work = tmp_path / "images", tmp_path / "work"
    container.run()
    container.checkpoint(images, work)
    before = images_of(images)
    r = container.restore(images, work)
    assert r.returncode == 0, container.log
    lines = container.result()
    assert lines and all(line.endswith(" OK") for line in lines), lines
    assert images_of(images) == before  # compatible: nothing written
    assert "Running pre-restore scripts" in (work / "restore.log").read_text()


def test_runc_restore_translated_by_the_hook(tmp_path: Path, container: RuncContainer) -> None:
    images, work = tmp_path / "images", tmp_path / "work"
    container.run()
    container.checkpoint(images, work)
    original = images_of(images)
    # The frames as another CPU would have written them (Ice Lake: Intel layout, 2696 bytes).
    assert main(["apply", str(images), "--dest", foreign_profile(), "--in-place"]) == 0
    foreign = images_of(images)

    install_hook(tmp_path, container, "probe", mode="off")  # control: what the kernel does unguarded
    assert container.restore(images, work).returncode == 0, container.log
    lost = container.result()
    assert lost and all("CORRUPT" in line for line in lost), lost
    assert images_of(images) == foreign

    install_hook(tmp_path, container, "probe", mode="enforce")
    assert container.restore(images, work).returncode == 0, container.log
    lines = container.result()
    assert lines and all(line.endswith(" OK") for line in lines), lines
    assert "rewrote 1 signal frame(s)" in (work / "restore.log").read_text()

    container.delete()
    assert main(["undo", str(images)]) == 0
    assert images_of(images) == {k: v for k, v in original.items()}  # the original runc checkpoint


def test_runc_restore_refused_by_the_hook(tmp_path: Path, container: RuncContainer) -> None:
    install_hook(tmp_path, container, str(no_avx_profile(tmp_path)))
    images, work = tmp_path / "images", tmp_path / "work"
    container.run()
    container.checkpoint(images, work)
    before = images_of(images)
    r = container.restore(images, work)
    assert r.returncode != 0, container.log
    log = (work / "restore.log").read_text()
    assert "COMPONENT_IN_USE_MISSING_ON_DEST" in log and "refusing the restore" in log
    assert images_of(images) == before and not (images / JOURNAL).exists()
    shutil.rmtree(work)
