"""fiesnap.kernel.dm, .libdm and .dmnodes against a real kernel device-mapper (run in the lab guest as root).

Run by the lab: ``python -m tests.lab kernel-tests tests/kernel/test_dm.py``.
Uses the lab's `scratch_disk` and `dm_prefix` fixtures when tests/kernel/conftest.py
provides them, else /dev/vda and a random fiesnap-kt-XXXXXXXX- prefix. Every
device made here is removed at teardown (newest first).
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import subprocess
import threading
import time
import uuid as uuidlib

import pytest

from fiesnap.kernel import libdm
from fiesnap.kernel.dm import DeviceMapper, DmInfo
from fiesnap.kernel.dmnodes import udev_running
from fiesnap.kernel.libdm import DM_DEVICE_INFO, UDEV_FLAGS_PRIVATE_LAYER
from fiesnap.model.dmtable import DmTarget
from fiesnap.errors import DeviceMapperError

from .helpers import dev_size, kernel_series

pytestmark = [
    pytest.mark.every_kernel,
    pytest.mark.skipif(not os.path.exists("/dev/mapper/control"), reason="no device-mapper (/dev/mapper/control)"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

SECTOR = 512
MiB = 1 << 20


def _optional_fixture(request, name: str, default):
    try:
        return request.getfixturevalue(name)
    except pytest.FixtureLookupError:
        return default


@pytest.fixture
def disk(request) -> str:
    value = _optional_fixture(request, "scratch_disk", "/dev/vda")
    path = str(getattr(value, "path", value))
    if not os.path.exists(path) or not stat.S_ISBLK(os.stat(path).st_mode):
        pytest.skip(f"no scratch block device ({path})")
    if dev_size(path) < 128 * MiB:
        pytest.skip(f"{path} is smaller than 128 MiB")
    return path


@pytest.fixture
def disk_dev(disk) -> str:
    rdev = os.stat(disk).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


@pytest.fixture(scope="module")
def dm() -> DeviceMapper:
    for mod in ("dm-mod", "dm-snapshot"):
        subprocess.run(["modprobe", mod], check=False, capture_output=True)
    return DeviceMapper()


class Names:
    """Hands out unique device names and removes them (newest first) at the end."""

    def __init__(self, dm: DeviceMapper, prefix: str) -> None:
        self.dm = dm
        self.prefix = prefix
        self.tag = uuidlib.uuid4().hex[:8]
        self.made: list[str] = []

    def __call__(self, what: str) -> str:
        name = f"{self.prefix}{what}"
        self.made.append(name)
        return name

    def cleanup(self) -> None:
        for name in reversed(self.made):
            try:
                if self.dm.info(name) is not None:
                    self.dm.remove(name, retries=5)
            except DeviceMapperError as e:  # pragma: no cover - reported, not hidden
                print(f"cleanup: {e}")


@pytest.fixture
def names(request, dm):
    # the lab's dm_prefix ("lt007-") lets its guard find leftovers too
    prefix = _optional_fixture(request, "dm_prefix", None) or f"fiesnap-kt-{uuidlib.uuid4().hex[:8]}-"
    n = Names(dm, prefix)
    yield n
    n.cleanup()


def linear(disk_dev: str, offset_sectors: int, length_sectors: int) -> list[DmTarget]:
    return [DmTarget(0, length_sectors, "linear", f"{disk_dev} {offset_sectors}")]


def assert_block_node(dm: DeviceMapper, name: str, info: DmInfo) -> None:
    path = dm.node_path(name)
    st = os.stat(path)
    assert stat.S_ISBLK(st.st_mode), f"{path} is not a block node"
    assert st.st_rdev == os.makedev(info.major, info.minor)


# --- tests ----------------------------------------------------------------------


def test_versions(dm):
    assert dm.library_version().startswith("1.02.")
    assert dm.driver_version().startswith("4.")


def test_dm_info_abi_is_48_bytes(dm, names, disk_dev):
    """dm_task_get_info (default symbol version) fills exactly struct dm_info."""
    name = names("abi")
    dm.create(name, targets=linear(disk_dev, 0, 2048))
    lib = libdm.load()
    buf = libdm.DmInfoBuffer()
    ctypes.memset(ctypes.byref(buf), 0xAA, ctypes.sizeof(buf))
    with libdm.task(lib, DM_DEVICE_INFO) as dmt:
        assert dmt
        assert lib.dm_task_set_name(dmt, name.encode())
        assert lib.dm_task_run(dmt)
        assert lib.dm_task_get_info(dmt, ctypes.byref(buf.info))
    raw = bytes(buf)
    assert len(raw) == 256
    assert raw[48:] == b"\xaa" * (256 - 48), "libdm wrote past 48 bytes"
    assert raw[40:48] == b"\0" * 8, "deferred_remove/internal_suspend not written"
    di = DmInfo.from_buffer(raw)
    assert di.exists and di.live_table and di.target_count == 1


def test_create_remove_linear_node(dm, names, disk_dev):
    name = names("lin")
    di = dm.create(name, uuid=f"FIESNAP-kt-{names.tag}-lin", targets=linear(disk_dev, 0, 8192))
    assert di.exists and di.live_table and not di.suspended and not di.inactive_table
    assert di.target_count == 1 and not di.read_only
    assert_block_node(dm, name, di)
    assert dev_size(dm.node_path(name)) == 8192 * SECTOR
    assert dm.info(name).devstr == di.devstr
    dm.remove(name)
    assert dm.info(name) is None
    assert not os.path.lexists(dm.node_path(name))


def test_read_only_create(dm, names, disk_dev):
    name = names("ro")
    di = dm.create(name, targets=linear(disk_dev, 0, 2048), read_only=True)
    assert di.read_only and dm.info(name).read_only
    fd = os.open(dm.node_path(name), os.O_WRONLY)  # 6.1 refuses the write, not the open
    try:
        with pytest.raises(OSError) as ei:
            os.write(fd, b"\0" * 4096)
        assert ei.value.errno == errno.EPERM
    finally:
        os.close(fd)


def test_empty_create_then_load_resume(dm, names, disk_dev):
    name = names("empty")
    di = dm.create(name)
    assert di.exists and not di.live_table and not di.inactive_table and di.target_count == 0
    assert dm.table(name) == []
    loaded = dm.load(name, linear(disk_dev, 0, 4096))
    assert loaded.inactive_table and not loaded.live_table
    info = dm.info(name)
    assert info.inactive_table and not info.live_table
    live = dm.resume(name)
    assert live.live_table and not live.inactive_table and not live.suspended
    assert_block_node(dm, name, live)
    assert dm.table(name) == linear(disk_dev, 0, 4096)


def test_suspend_resume_state(dm, names, disk_dev):
    name = names("susp")
    dm.create(name, targets=linear(disk_dev, 0, 4096))
    assert dm.suspend(name).suspended
    assert dm.info(name).suspended
    assert not dm.resume(name).suspended
    assert not dm.info(name).suspended
    dm.suspend(name, lockfs=False)
    assert dm.info(name).suspended
    dm.resume(name)
    assert not dm.info(name).suspended


def test_table_round_trip(dm, names, disk_dev):
    name = names("tbl")
    table = [
        DmTarget(0, 2048, "linear", f"{disk_dev} 4096"),
        DmTarget(2048, 1024, "zero", ""),
        DmTarget(3072, 1024, "error", ""),
    ]
    dm.create(name, targets=table)
    assert dm.table(name) == table
    st = dm.status(name)
    assert [(s.start, s.length, s.target_type) for s in st] == [(t.start, t.length, t.target_type) for t in table]


def test_reload_swaps_table(dm, names, disk_dev):
    name = names("swap")
    dm.create(name, targets=linear(disk_dev, 0, 2048))
    ev = dm.info(name).event_nr
    dm.load(name, linear(disk_dev, 2048, 4096))
    assert dm.table(name) == linear(disk_dev, 0, 2048)  # live table unchanged until resume
    dm.resume(name)
    assert dm.table(name) == linear(disk_dev, 2048, 4096)
    assert dev_size(dm.node_path(name)) == 4096 * SECTOR
    assert dm.info(name).event_nr >= ev


def _bad_name_errno() -> int:
    """A table naming a device that is no path: 6.1 looks the bare name up as a device name
    (name_to_dev_t) and says ENODEV; from 6.5 on dm_devt_from_path takes `major:minor` or a
    path (lookup_bdev), and a bare name is a missing file, ENOENT. fiesnap's tables always
    say `major:minor`."""
    return errno.ENODEV if kernel_series() < (6, 5) else errno.ENOENT


@pytest.mark.parametrize(
    ("params", "err"),
    [("not-a-device 0", None), ("{dev}", errno.EINVAL)],  # lookup fails / missing offset
)
def test_bad_table_reports_errno_and_reverts(dm, names, disk_dev, params, err):
    name = names("bad")
    with pytest.raises(DeviceMapperError) as ei:
        dm.create(name, targets=[DmTarget(0, 2048, "linear", params.format(dev=disk_dev))])
    assert "reload" in str(ei.value) and name in str(ei.value)
    assert ei.value.errno == (err or _bad_name_errno()), str(ei.value)
    assert dm.info(name) is None  # the half-made device was removed
    assert not os.path.lexists(dm.node_path(name))


def test_existing_name_is_eexist(dm, names, disk_dev):
    name = names("dup")
    dm.create(name, targets=linear(disk_dev, 0, 2048))
    with pytest.raises(DeviceMapperError) as ei:
        dm.create(name, targets=linear(disk_dev, 0, 2048))
    text = str(ei.value)
    assert "File exists" in text and "EEXIST" in text and name in text
    assert "\n" not in text
    assert ei.value.errno == errno.EEXIST
    assert dm.info(name).live_table  # the existing device was not touched


def test_info_missing_is_none(dm, names):
    assert dm.info(names("missing")) is None


def test_ops_on_missing_device_raise_enxio(dm, names):
    name = names("gone")
    for call in (lambda: dm.status(name), lambda: dm.table(name), lambda: dm.suspend(name), lambda: dm.remove(name)):
        with pytest.raises(DeviceMapperError) as ei:
            call()
        assert ei.value.errno == errno.ENXIO, str(ei.value)
        assert name in str(ei.value)


def _hold_open(path: str, seconds: float, opened: threading.Event) -> threading.Thread:
    def run() -> None:
        fd = os.open(path, os.O_RDONLY)
        opened.set()
        time.sleep(seconds)
        os.close(fd)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert opened.wait(5)
    return t


def test_remove_retries_while_open(dm, names, disk_dev):
    name = names("busy")
    dm.create(name, targets=linear(disk_dev, 0, 2048))
    opened = threading.Event()
    t = _hold_open(dm.node_path(name), 0.8, opened)
    assert dm.info(name).open_count == 1
    t0 = time.monotonic()
    dm.remove(name, retries=20)
    assert time.monotonic() - t0 >= 0.5  # it had to wait for the close
    t.join(5)
    assert dm.info(name) is None
    assert not os.path.lexists(dm.node_path(name))


def test_remove_gives_up_naming_open_count(dm, names, disk_dev):
    name = names("stuck")
    dm.create(name, targets=linear(disk_dev, 0, 2048))
    opened = threading.Event()
    t = _hold_open(dm.node_path(name), 3.0, opened)
    with pytest.raises(DeviceMapperError) as ei:
        dm.remove(name, retries=2)
    text = str(ei.value)
    assert "EBUSY" in text and "open count 1" in text and name in text
    assert dm.info(name) is not None
    assert_block_node(dm, name, dm.info(name))  # node left in place
    t.join(10)


def test_target_versions(dm):
    v = dm.target_versions()
    assert v["linear"] >= (1, 0, 0)
    assert "snapshot" in v and "snapshot-origin" in v, sorted(v)
    assert v["snapshot"] >= (1, 15, 0)


def test_message_dm_stats(dm, names, disk_dev):
    """TARGET_MSG round trip through dm core's @stats messages."""
    name = names("msg")
    dm.create(name, targets=linear(disk_dev, 0, 2048))
    region = dm.message(name, 0, "@stats_create - /1")
    assert region.strip() == "0"
    listing = dm.message(name, 0, "@stats_list")
    assert listing.startswith("0: 0+2048")
    assert dm.message(name, 0, "@stats_delete 0") == ""
    with pytest.raises(DeviceMapperError) as ei:
        dm.message(name, 0, "no-such-message")
    assert ei.value.errno == errno.EINVAL


def test_node_is_recreated_and_foreign_file_refused(names, disk_dev):
    dm = DeviceMapper(udev_timeout=1.0)  # udev will not bring back a node we deleted
    name = names("node")
    di = dm.create(name, targets=linear(disk_dev, 0, 2048))
    path = dm.node_path(name)
    os.unlink(path)
    assert dm.ensure_node(name, di.major, di.minor) == path
    assert_block_node(dm, name, di)
    os.unlink(path)
    with open(path, "w") as f:  # what a write to a missing node leaves behind
        f.write("oops")
    try:
        with pytest.raises(DeviceMapperError, match="not a block device node"):
            dm.ensure_node(name, di.major, di.minor)
        with pytest.raises(DeviceMapperError, match="not a block device node"):
            dm.resume(name)
    finally:
        os.unlink(path)
    dm.resume(name)
    assert_block_node(dm, name, di)
    # remove leaves a foreign file alone
    dm.remove(name)
    assert not os.path.lexists(path)


def _snapshot_stack(dm, names, disk_dev, *, store: str, cow_sectors: int, flags: int = 0):
    real = names("real")
    cow = names("cow")
    snap = names("snap")
    origin = names("origin")
    real_di = dm.create(real, targets=linear(disk_dev, 0, 128 * 1024), udev_flags=UDEV_FLAGS_PRIVATE_LAYER)
    cow_di = dm.create(cow, targets=linear(disk_dev, 128 * 1024, cow_sectors), udev_flags=UDEV_FLAGS_PRIVATE_LAYER)
    cow_path = dm.ensure_node(cow, cow_di.major, cow_di.minor)
    fd = os.open(cow_path, os.O_WRONLY)
    try:
        os.write(fd, b"\0" * 4096)  # new persistent store: magic 0
        os.fsync(fd)
    finally:
        os.close(fd)
    snap_di = dm.create(
        snap,
        uuid=f"FIESNAP-kt-{names.tag}-snap",
        targets=[DmTarget(0, 128 * 1024, "snapshot", f"{real_di.devstr} {cow_di.devstr} {store} 8")],
        udev_flags=flags,
    )
    origin_di = dm.create(origin, targets=[DmTarget(0, 128 * 1024, "snapshot-origin", real_di.devstr)])
    return real_di, cow_di, snap, snap_di, origin, origin_di


def _used(status_params: str) -> tuple[int, int, int]:
    used, rest = status_params.split("/", 1)
    total, meta = rest.split()
    return int(used), int(total), int(meta)


@pytest.mark.parametrize("store", ["P", "PO"])
def test_snapshot_status(dm, names, disk_dev, store):
    real_di, cow_di, snap, snap_di, origin, origin_di = _snapshot_stack(
        dm, names, disk_dev, store=store, cow_sectors=32 * 1024
    )
    assert dm.table(snap) == [
        DmTarget(0, 128 * 1024, "snapshot", f"{real_di.devstr} {cow_di.devstr} {store} 8")
    ]
    [line] = dm.status(snap)
    assert line.target_type == "snapshot"
    used0, total, meta0 = _used(line.params)
    assert total == 32 * 1024
    fd = os.open(dm.node_path(origin), os.O_RDWR)
    try:
        before = os.pread(fd, 256 * 1024, 1 * MiB)
        new = os.urandom(256 * 1024)
        os.pwrite(fd, new, 1 * MiB)  # 64 chunks of 4 KiB
        os.fsync(fd)
    finally:
        os.close(fd)
    used1, total1, meta1 = _used(dm.status(snap)[0].params)
    assert used1 > used0
    assert used1 - used0 >= 64 * 8
    assert total1 == total and meta1 >= meta0
    # the snapshot still shows the old data, the origin the new
    fd = os.open(dm.node_path(snap), os.O_RDONLY)
    try:
        assert os.pread(fd, 256 * 1024, 1 * MiB) == before
    finally:
        os.close(fd)
    fd = os.open(dm.node_path(origin), os.O_RDONLY)
    try:
        assert os.pread(fd, 256 * 1024, 1 * MiB) == new
    finally:
        os.close(fd)


def test_libdm_makes_nodes_itself_without_udev(dm, names, disk_dev, caplog):
    """Without udevd, libdm's own node code (run by dm_udev_wait) makes and
    removes /dev/mapper/NAME: fiesnap's fallback is not needed."""
    if udev_running():
        pytest.skip("udev is running")
    caplog.set_level("DEBUG", logger="fiesnap.kernel.dmnodes")
    name = names("libdmnode")
    di = dm.create(name, targets=linear(disk_dev, 0, 2048))
    assert_block_node(dm, name, di)
    dm.remove(name)
    assert not os.path.lexists(dm.node_path(name))
    assert not [r for r in caplog.records if "after libdm's node handling" in r.getMessage()]
