"""locate.find_device against real loop devices (root).

The scan reads the real /sys/class/block, so the images get sizes no real
disk has (37 MiB, 41 MiB): only the loop devices made here can match.
Every loop device is detached afterwards.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_host_adapters import MKFS, _losetup, host  # noqa: F401  (host: fixture)

from fiesnap.errors import DeviceError
from fiesnap.kernel.fsprobe import probe_device
from fiesnap.kernel.locate import SYS_CLASS_BLOCK, Wanted, find_device

MiB = 1 << 20
SIZE = 37 * MiB
OTHER_SIZE = 41 * MiB

pytestmark = pytest.mark.root


class Loops:
    """Images and their loop devices, all detached at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.devs: list[str] = []

    def image(self, name: str, size: int) -> Path:
        image = self.tmp / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(size)
        subprocess.run([*MKFS["ext4-4k"][1], str(image)], check=True, capture_output=True)
        return image

    def clone(self, src: Path, name: str) -> Path:
        image = self.tmp / f"{name}.img"
        subprocess.run(["dd", f"if={src}", f"of={image}", "bs=1M", "conv=sparse", "status=none"], check=True)
        return image

    def attach(self, image: Path) -> str:
        dev = _losetup(image)
        self.devs.append(dev)
        return dev

    def detach_all(self) -> None:
        for dev in reversed(self.devs):
            subprocess.run(["losetup", "-d", dev], capture_output=True)


@pytest.fixture
def loops(host: None, tmp_path: Path) -> Iterator[Loops]:
    if shutil.which("dd") is None:
        pytest.skip("dd not installed")
    made = Loops(tmp_path)
    try:
        yield made
    finally:
        made.detach_all()


def _uuid(dev: str) -> str:
    return probe_device(dev).uuid


def _nowhere(tmp: Path) -> str:
    return str(tmp / "loop-that-is-gone")  # a recorded path that no longer exists


def test_recorded_path_right(loops: Loops) -> None:
    a = loops.attach(loops.image("a", SIZE))
    b = loops.attach(loops.image("b", SIZE))
    assert _uuid(a) != _uuid(b)
    found = find_device(Wanted("cp", a, _uuid(a), SIZE))
    st = os.stat(a)
    assert (found.path, found.major, found.minor, found.size_bytes) == (
        a, os.major(st.st_rdev), os.minor(st.st_rdev), SIZE)


def test_recorded_path_gone_is_found_by_scanning(loops: Loops, tmp_path: Path) -> None:
    a = loops.attach(loops.image("a", SIZE))
    loops.attach(loops.image("b", SIZE))
    found = find_device(Wanted("cp", _nowhere(tmp_path), _uuid(a), SIZE), sys_block=SYS_CLASS_BLOCK)
    assert os.path.realpath(found.path) == os.path.realpath(a)
    assert found.size_bytes == SIZE


def test_recorded_path_now_another_device_is_found_by_scanning(loops: Loops) -> None:
    a = loops.attach(loops.image("a", SIZE))
    b = loops.attach(loops.image("b", SIZE))
    found = find_device(Wanted("cp", b, _uuid(a), SIZE))  # /dev/loopB was ours before the reboot
    assert os.path.realpath(found.path) == os.path.realpath(a)


def test_two_copies_are_refused_naming_both(loops: Loops, tmp_path: Path) -> None:
    img = loops.image("a", SIZE)
    a = loops.attach(img)
    c = loops.attach(loops.clone(img, "copy"))
    assert _uuid(a) == _uuid(c)
    with pytest.raises(DeviceError) as e:
        find_device(Wanted("cp", _nowhere(tmp_path), _uuid(a), SIZE))
    msg = str(e.value)
    assert f"2 devices hold filesystem {_uuid(a)} with {SIZE} bytes" in msg
    assert a in msg and c in msg
    assert "refusing to guess which is 'cp'" in msg


def test_same_uuid_other_size_is_not_a_copy(loops: Loops, tmp_path: Path) -> None:
    img = loops.image("a", SIZE)
    a = loops.attach(img)
    bigger = loops.clone(img, "bigger")
    with open(bigger, "r+b") as f:
        f.truncate(OTHER_SIZE)
    loops.attach(bigger)
    found = find_device(Wanted("cp", _nowhere(tmp_path), _uuid(a), SIZE))
    assert os.path.realpath(found.path) == os.path.realpath(a)


def test_recorded_path_with_changed_size_is_refused(loops: Loops) -> None:
    img = loops.image("a", SIZE)
    a = loops.attach(img)
    fs_uuid = _uuid(a)
    with open(img, "r+b") as f:
        f.truncate(OTHER_SIZE)
    subprocess.run(["losetup", "-c", a], check=True, capture_output=True)
    with pytest.raises(DeviceError) as e:
        find_device(Wanted("cp", a, fs_uuid, SIZE))
    assert str(e.value) == (
        f"{a} holds the filesystem of 'cp' but is now {OTHER_SIZE} bytes, not the recorded {SIZE}: "
        "refusing; give the device back its size")


def test_recorded_path_with_changed_size_refused_even_if_a_copy_fits(loops: Loops) -> None:
    # The recorded device is not silently swapped for another one of the right size.
    img = loops.image("a", SIZE)
    same_size_copy = loops.clone(img, "copy")
    bigger = loops.clone(img, "bigger")
    with open(bigger, "r+b") as f:
        f.truncate(OTHER_SIZE)
    loops.attach(same_size_copy)
    at_recorded = loops.attach(bigger)
    with pytest.raises(DeviceError, match="not the recorded"):
        find_device(Wanted("cp", at_recorded, _uuid(at_recorded), SIZE))


def test_no_match(loops: Loops, tmp_path: Path) -> None:
    a = loops.attach(loops.image("a", SIZE))
    with pytest.raises(DeviceError) as e:
        find_device(Wanted("cp", a, "00000000-0000-4000-8000-000000000000", SIZE))
    assert str(e.value) == (
        "cannot find the device of 'cp' (filesystem 00000000-0000-4000-8000-000000000000, "
        f"{SIZE} bytes, last seen as {a}): attach it and retry")
    with pytest.raises(DeviceError, match="cannot find the device of 'cp'"):
        find_device(Wanted("cp", _nowhere(tmp_path), _uuid(a), OTHER_SIZE))  # right fs, wrong size


def test_scan_only_looks_in_sys_block(loops: Loops, tmp_path: Path) -> None:
    a = loops.attach(loops.image("a", SIZE))
    empty = tmp_path / "sys-block"
    empty.mkdir()
    with pytest.raises(DeviceError, match="cannot find"):
        find_device(Wanted("cp", _nowhere(tmp_path), _uuid(a), SIZE), sys_block=str(empty))
    with pytest.raises(DeviceError, match="cannot find"):
        find_device(Wanted("cp", _nowhere(tmp_path), _uuid(a), SIZE), sys_block=str(tmp_path / "missing"))
