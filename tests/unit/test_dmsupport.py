"""A kernel without device-mapper gets one line saying what to load, from every command.

The detection reads /proc/misc and the running kernel's module lists; these tests give it
folders shaped like those. The last tests run the real CLI on this host when its kernel has no
device-mapper (the case the lab exists for): every command that needs dm stops there with
exit 9, and nothing is created.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fiesnap.errors import DeviceMapperError
from fiesnap.kernel import dmsupport

REPO = Path(__file__).resolve().parents[2]

MISC_WITH_DM = " 57 btrfs-control\n236 device-mapper\n183 hw_random\n"
MISC_WITHOUT_DM = " 57 btrfs-control\n183 hw_random\n"


def _proc(tmp_path: Path, misc: str) -> str:
    proc = tmp_path / "proc"
    proc.mkdir(exist_ok=True)
    (proc / "misc").write_text(misc)
    return str(proc)


def test_a_kernel_with_the_driver_passes(tmp_path: Path) -> None:
    assert dmsupport.missing_driver(_proc(tmp_path, MISC_WITH_DM), str(tmp_path / "control")) is None


def test_no_driver_says_what_to_load(tmp_path: Path) -> None:
    reason = dmsupport.missing_driver(_proc(tmp_path, MISC_WITHOUT_DM), str(tmp_path / "control"))
    assert reason is not None and "\n" not in reason
    assert "modprobe dm-snapshot" in reason and "CONFIG_BLK_DEV_DM" in reason
    assert "no 'device-mapper' in" in reason and "no " + str(tmp_path / "control") in reason
    with pytest.raises(DeviceMapperError, match="modprobe dm-snapshot") as e:
        dmsupport.require_driver(_proc(tmp_path, MISC_WITHOUT_DM), str(tmp_path / "control"))
    assert e.value.exit_code == 9


def test_opening_the_control_node_may_load_the_driver(tmp_path: Path, monkeypatch) -> None:
    """As the kernel does for dm-mod as a module: the open of /dev/mapper/control loads it."""
    proc = _proc(tmp_path, MISC_WITHOUT_DM)
    control = tmp_path / "control"
    control.write_text("")

    def open_loads_the_module(path, flags, *a):
        if path == str(control):
            (tmp_path / "proc" / "misc").write_text(MISC_WITH_DM)
        return real_open(path, flags, *a)

    real_open = os.open
    monkeypatch.setattr(dmsupport.os, "open", open_loads_the_module)
    assert dmsupport.missing_driver(proc, str(control)) is None


def test_libdevmapper_has_the_last_word(tmp_path: Path) -> None:
    """libdevmapper makes a missing control node itself: where it reaches the driver, so do we."""
    proc = _proc(tmp_path, MISC_WITHOUT_DM)
    assert dmsupport.missing_driver(proc, str(tmp_path / "control"), ask_library=lambda: "4.47.0") is None

    def no_driver() -> str:
        raise DeviceMapperError("version: Failure to communicate with kernel device-mapper driver")

    assert "modprobe dm-snapshot" in dmsupport.missing_driver(proc, str(tmp_path / "control"), ask_library=no_driver)


def test_an_unreadable_proc_counts_as_no_driver(tmp_path: Path) -> None:
    assert dmsupport.missing_driver(str(tmp_path / "none"), str(tmp_path / "control")) is not None


def _modules(tmp_path: Path, builtin: str = "", dep: str = "") -> str:
    d = tmp_path / "modules"
    d.mkdir()
    (d / "modules.builtin").write_text(builtin)
    (d / "modules.dep").write_text(dep)
    return str(d)


@pytest.mark.parametrize("builtin,dep", [
    ("kernel/drivers/md/dm-snapshot.ko\n", ""),
    ("", "kernel/drivers/md/dm-snapshot.ko.xz: kernel/drivers/md/dm-bufio.ko.xz\n"),
    ("", "kernel/drivers/md/dm_snapshot.ko.zst:\n"),
])
def test_the_snapshot_target_as_a_module_or_built_in(tmp_path: Path, builtin: str, dep: str) -> None:
    assert dmsupport.snapshot_target_missing(set(), _modules(tmp_path, builtin, dep)) is None


def test_a_loaded_snapshot_target_needs_no_module_files(tmp_path: Path) -> None:
    assert dmsupport.snapshot_target_missing({"snapshot", "linear"}, str(tmp_path / "none")) is None


def test_no_snapshot_target_anywhere_is_said(tmp_path: Path) -> None:
    where = _modules(tmp_path, "kernel/drivers/md/dm-mod.ko\n", "kernel/drivers/md/dm-log-writes.ko:\n")
    reason = dmsupport.snapshot_target_missing({"linear", "striped"}, where)
    assert reason is not None and "CONFIG_DM_SNAPSHOT" in reason and where in reason


def test_no_module_tree_to_ask_lets_the_kernel_answer(tmp_path: Path) -> None:
    assert dmsupport.snapshot_target_missing({"linear"}, str(tmp_path / "none")) is None


# -- the real CLI on a host kernel without device-mapper ---------------------------------------

NO_DM_HERE = dmsupport.missing_driver() is not None


@pytest.mark.skipif(not NO_DM_HERE, reason="this kernel has device-mapper")
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (the state folder must be root's)")
@pytest.mark.parametrize("args", [
    ["status"], ["status", "--json"], ["activate", "--all"], ["monitor", "--all", "--once"],
    ["deactivate", "--all"], ["commit", "--boot-complete"], ["merge", "data"], ["extend", "data", "--by", "1G"],
    ["start", "/dev/null", "--size", "1G"], ["setup", "/dev/null", "--name", "data"], ["release", "data"],
])
def test_without_device_mapper_every_command_says_so_and_creates_nothing(tmp_path: Path, args) -> None:
    state = tmp_path / "fresh" / "state"
    p = subprocess.run([sys.executable, "-m", "fiesnap", *args], capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, FIESNAP_STATE_DIR=str(state)), cwd=REPO)
    lines = p.stderr.splitlines()
    assert p.returncode == 9, (p.returncode, p.stdout, p.stderr)
    assert len(lines) == 1 and lines[0].startswith("fiesnap: error: this kernel has no device-mapper driver")
    assert "modprobe dm-snapshot" in lines[0]
    assert p.stdout == "" and list(tmp_path.iterdir()) == []
