"""fiesnap.kernel.dm without a kernel device-mapper: ABI layouts, parsing, checks, errors.

Nothing here runs a libdevmapper task (that would open /dev/mapper/control);
the real-kernel side is tests/kernel/test_dm.py.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
import struct

import pytest

from fiesnap.kernel import dm as dmmod
from fiesnap.kernel.dm import (
    DM_NAMES_NAME_OFFSET,
    DM_VERSIONS_NAME_OFFSET,
    LIBDM_MISSING,
    DeviceMapper,
    DmDevice,
    DmInfo,
    DmInfoStruct,
    DmNamesStruct,
    DmVersionsStruct,
    check_name,
    check_uuid,
    dev_major,
    dev_minor,
    dm_error,
    parse_dm_names,
    parse_dm_versions,
    udev_running,
)
from fiesnap.model.dmtable import DmTarget
from fiesnap.errors import DeviceMapperError


def _have_libdm() -> bool:
    try:
        ctypes.CDLL(dmmod.LIBDM_SONAME)
    except OSError:
        return False
    return True


needs_libdm = pytest.mark.skipif(not _have_libdm(), reason="libdevmapper.so.1.02.1 not installed")


# --- ABI layouts (libdevmapper.h) ---------------------------------------------------


def test_dm_info_layout():
    assert ctypes.sizeof(DmInfoStruct) == 48
    names = [f[0] for f in DmInfoStruct._fields_]
    assert names == [
        "exists", "suspended", "live_table", "inactive_table", "open_count", "event_nr",
        "major", "minor", "read_only", "target_count", "deferred_remove", "internal_suspend",
    ]
    assert [getattr(DmInfoStruct, n).offset for n in names] == list(range(0, 48, 4))


def test_dm_names_and_versions_layout():
    assert DmNamesStruct.dev.offset == 0 and DmNamesStruct.next.offset == 8
    assert DM_NAMES_NAME_OFFSET == 12  # char name[0] right after the u32, not at sizeof (16)
    assert ctypes.sizeof(DmNamesStruct) == 16
    assert DmVersionsStruct.next.offset == 0 and DmVersionsStruct.version.offset == 4
    assert DM_VERSIONS_NAME_OFFSET == 16


def test_task_type_numbers():
    assert (dmmod.DM_DEVICE_CREATE, dmmod.DM_DEVICE_RELOAD, dmmod.DM_DEVICE_REMOVE) == (0, 1, 2)
    assert (dmmod.DM_DEVICE_SUSPEND, dmmod.DM_DEVICE_RESUME, dmmod.DM_DEVICE_INFO) == (4, 5, 6)
    assert (dmmod.DM_DEVICE_STATUS, dmmod.DM_DEVICE_TABLE, dmmod.DM_DEVICE_WAITEVENT) == (10, 11, 12)
    assert (dmmod.DM_DEVICE_LIST, dmmod.DM_DEVICE_CLEAR, dmmod.DM_DEVICE_MKNODES) == (13, 14, 15)
    assert (dmmod.DM_DEVICE_LIST_VERSIONS, dmmod.DM_DEVICE_TARGET_MSG) == (16, 17)


def test_udev_flag_values():
    assert dmmod.UDEV_DISABLE_DM_RULES == 0x1
    assert dmmod.UDEV_DISABLE_LIBRARY_FALLBACK == 0x20
    assert dmmod.UDEV_PRIMARY_SOURCE == 0x40
    assert dmmod.UDEV_FLAGS_PRIVATE_LAYER == 0x2 | 0x4 | 0x8


# --- DmInfo -----------------------------------------------------------------------------


def _info_bytes(*vals: int) -> bytes:
    return struct.pack("=iiiiiIIIiiii", *vals)


def test_dm_info_from_buffer():
    raw = _info_bytes(1, 0, 1, 1, 2, 7, 253, 300, 1, 3, 0, 0) + b"\xaa" * 16
    di = DmInfo.from_buffer(raw)
    assert di == DmInfo(
        exists=True, suspended=False, live_table=True, inactive_table=True, open_count=2,
        event_nr=7, major=253, minor=300, read_only=True, target_count=3,
    )
    assert di.devstr == "253:300"
    assert di.devno == os.makedev(253, 300)
    with pytest.raises(AttributeError):
        di.exists = False  # frozen


def test_dm_info_from_short_buffer():
    with pytest.raises(ValueError, match="48 bytes"):
        DmInfo.from_buffer(b"\0" * 40)


def test_dm_info_deferred_flags():
    di = DmInfo.from_buffer(_info_bytes(1, 1, 1, 0, 1, 0, 253, 0, 0, 1, 1, 1))
    assert di.suspended and di.deferred_remove and di.internal_suspend


# --- dm_names / dm_versions chains -----------------------------------------------------


def _huge_encode_dev(major: int, minor: int) -> int:
    """Linux huge_encode_dev / new_encode_dev."""
    return (minor & 0xFF) | (major << 8) | ((minor & ~0xFF) << 12)


def _names_buf(entries: list[tuple[str, int, int]]) -> bytes:
    out = bytearray()
    for i, (name, major, minor) in enumerate(entries):
        body = struct.pack("=QI", _huge_encode_dev(major, minor), 0) + name.encode() + b"\0"
        body += b"\0" * (-len(body) % 8)
        nxt = 0 if i == len(entries) - 1 else len(body)
        body = body[:8] + struct.pack("=I", nxt) + body[12:]
        out += body
    return bytes(out)


def test_parse_dm_names():
    entries = [("root", 253, 0), ("fiesnap-cow", 253, 1), ("big-minor", 253, 1000)]
    assert parse_dm_names(_names_buf(entries)) == [DmDevice(*e) for e in entries]


def test_parse_dm_names_empty():
    assert parse_dm_names(b"\0" * 32) == []


def test_parse_dm_names_truncated():
    buf = _names_buf([("a", 253, 0), ("b", 253, 1)])
    with pytest.raises(ValueError):
        parse_dm_names(buf[:20])


def test_dev_decoding_matches_libc():
    for major, minor in [(253, 0), (253, 255), (253, 256), (254, 1048575), (4095, 77)]:
        dev = _huge_encode_dev(major, minor)
        assert (dev_major(dev), dev_minor(dev)) == (major, minor)
        assert (os.major(dev), os.minor(dev)) == (major, minor)


def _versions_buf(entries: list[tuple[str, tuple[int, int, int]]]) -> bytes:
    out = bytearray()
    for i, (name, ver) in enumerate(entries):
        body = struct.pack("=I3I", 0, *ver) + name.encode() + b"\0"
        body += b"\0" * (-len(body) % 8)
        nxt = 0 if i == len(entries) - 1 else len(body)
        out += struct.pack("=I", nxt) + body[4:]
    return bytes(out)


def test_parse_dm_versions():
    entries = [("snapshot-merge", (1, 5, 0)), ("snapshot", (1, 16, 0)), ("linear", (1, 4, 0))]
    v = parse_dm_versions(_versions_buf(entries))
    assert v == dict(entries)
    assert v["snapshot"] >= (1, 15, 0)


# --- names, uuids, tables ----------------------------------------------------------------


@pytest.mark.parametrize("name", ["fiesnap-root-cow", "a", "x.y:z=1@2#3+4_5", "n" * 127])
def test_good_names(name):
    assert check_name(name) == name.encode()


@pytest.mark.parametrize("name", ["", ".", "..", "control", "a/b", "../x", "has space", "tab\t", "é", "n" * 128])
def test_bad_names(name):
    with pytest.raises(DeviceMapperError, match="invalid device-mapper name"):
        check_name(name)


def test_uuid_prefix_is_asserted():
    assert check_uuid("FIESNAP-abc-123") == b"FIESNAP-abc-123"
    for bad in ["LVM-abc", "fiesnap-abc", "", "FIESNAP-" + "x" * 130, "FIESNAP-a b"]:
        with pytest.raises(AssertionError):
            check_uuid(bad)


@needs_libdm
def test_create_asserts_uuid_before_touching_the_kernel():
    dm = DeviceMapper()
    with pytest.raises(AssertionError, match="FIESNAP-"):
        dm.create("fiesnap-x", uuid="LVM-not-ours", targets=[DmTarget(0, 8, "zero", "")])


def test_bad_table_lines():
    for t in [
        DmTarget(0, 0, "linear", "253:0 0"),
        DmTarget(-1, 8, "linear", "253:0 0"),
        DmTarget(0, 8, "", ""),
        DmTarget(0, 8, "a-very-long-target-name", ""),
        DmTarget(0, 8, "linear", "253:0 0\nX"),
    ]:
        with pytest.raises(DeviceMapperError, match="invalid table line"):
            dmmod._check_target(t)
    assert dmmod._check_target(DmTarget(0, 8, "snapshot", "253:1 253:2 PO 8")) == (0, 8, b"snapshot", b"253:1 253:2 PO 8")


# --- library loading, errors, log hook ------------------------------------------------------


def test_missing_library_error():
    with pytest.raises(DeviceMapperError) as ei:
        DeviceMapper(soname="libdevmapper-fiesnap-bogus.so.0")
    assert str(ei.value) == LIBDM_MISSING == "libdevmapper not found: install the dmsetup package"
    assert ei.value.exit_code == 9


def test_error_text_is_one_line_with_op_name_and_errno():
    e = dm_error("create", "fiesnap-x", errno.EEXIST, "a device named fiesnap-x\nalready exists")
    assert str(e) == (
        "device-mapper create fiesnap-x failed: File exists (EEXIST): a device named fiesnap-x already exists"
    )
    assert e.errno == errno.EEXIST and e.op == "create" and e.device == "fiesnap-x"
    # libdm's own ioctl line repeats the errno text: dropped
    e = dm_error("reload", "d", errno.EINVAL, "device-mapper: reload ioctl on d  failed: Invalid argument")
    assert str(e) == "device-mapper reload d failed: Invalid argument (EINVAL)"
    # no errno: the library's message is what there is
    assert str(dm_error("create", "d", 0, "Name too long")) == "device-mapper create d failed: Name too long"


@needs_libdm
def test_libdm_log_is_captured_not_printed(capfd):
    """A real libdm log_error (no kernel needed) lands in the per-thread buffer."""
    DeviceMapper()
    lib = ctypes.CDLL(dmmod.LIBDM_SONAME)
    lib.dm_set_uuid_prefix.argtypes = [ctypes.c_char_p]
    lib.dm_set_uuid_prefix.restype = ctypes.c_int
    dmmod._messages().clear()
    assert lib.dm_set_uuid_prefix(b"a-prefix-that-is-far-too-long") == 0
    msgs = dmmod._messages()
    assert any("too long" in text and lvl == 3 for lvl, text in msgs), msgs
    out, err = capfd.readouterr()
    assert "too long" not in out + err


def test_log_hook_never_raises():
    dmmod._messages().clear()
    buf = ctypes.create_string_buffer(b"hello from libdm")
    dmmod._on_libdm_log(3 | 128, b"x.c", 1, b"%s", ctypes.addressof(buf))
    dmmod._on_libdm_log(4, None, 0, b"raw %d format", 12345)
    dmmod._on_libdm_log(7, None, 0, None, None)  # debug: not kept
    assert dmmod._messages() == [(3, "hello from libdm"), (4, "raw %d format")]


def test_udev_running(monkeypatch, tmp_path):
    ctl = tmp_path / "control"
    monkeypatch.setattr(dmmod, "UDEV_CONTROL", str(ctl))
    monkeypatch.delenv("DM_DISABLE_UDEV", raising=False)
    assert not udev_running()
    ctl.touch()
    assert udev_running()
    monkeypatch.setenv("DM_DISABLE_UDEV", "1")
    assert not udev_running()


# --- node handling (a private dev dir, no kernel) -------------------------------------------


@pytest.fixture
def dm_tmp(tmp_path, monkeypatch):
    if not _have_libdm():
        pytest.skip("libdevmapper.so.1.02.1 not installed")
    monkeypatch.setattr(dmmod, "UDEV_CONTROL", str(tmp_path / "no-udev"))
    (tmp_path / "mapper").mkdir()
    dm = DeviceMapper(dev_dir=str(tmp_path), udev_timeout=0.1)
    yield dm
    DeviceMapper()  # put libdm's device directory back to /dev


def test_node_path(dm_tmp, tmp_path):
    assert dm_tmp.node_path("fiesnap-a") == str(tmp_path / "mapper" / "fiesnap-a")
    with pytest.raises(DeviceMapperError):
        dm_tmp.node_path("../etc")


def test_ensure_node_refuses_a_regular_file(dm_tmp):
    path = dm_tmp.node_path("fiesnap-a")
    with open(path, "w") as f:
        f.write("written to a missing node")
    with pytest.raises(DeviceMapperError, match="not a block device node"):
        dm_tmp.ensure_node("fiesnap-a", 253, 7)
    with open(path) as f:
        assert f.read() == "written to a missing node"


def test_ensure_node_accepts_existing_right_node_without_libdm(dm_tmp, tmp_path):
    """A correct node (here: a symlink to a block device, as udev makes) is left as is."""
    blk = next((p for p in ("/dev/loop0", "/dev/sda", "/dev/vda", "/dev/nvme0n1", "/dev/loop-control")
                if os.path.exists(p) and stat.S_ISBLK(os.stat(p).st_mode)), None)
    if blk is None:
        pytest.skip("no block device to point at")
    rdev = os.stat(blk).st_rdev
    path = dm_tmp.node_path("fiesnap-b")
    os.symlink(blk, path)
    assert dm_tmp.ensure_node("fiesnap-b", os.major(rdev), os.minor(rdev)) == path
    assert os.path.islink(path)


@pytest.mark.skipif(os.geteuid() != 0, reason="mknod needs root")
def test_ensure_node_replaces_stale_block_node(dm_tmp):
    path = dm_tmp.node_path("fiesnap-c")
    try:
        os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(253, 99))
    except PermissionError:
        pytest.skip("cannot mknod here")
    asked = []
    dm_tmp._mknodes = asked.append  # no libdm task here (it would look for a kernel dm)
    # Wanted 253:98: the stale node goes, libdm is asked, then fiesnap makes it.
    assert dm_tmp.ensure_node("fiesnap-c", 253, 98) == path
    assert asked == ["fiesnap-c"]
    assert os.stat(path).st_rdev == os.makedev(253, 98)


def test_unlink_only_what_is_ours(dm_tmp, tmp_path):
    path = dm_tmp.node_path("fiesnap-d")
    with open(path, "w") as f:
        f.write("x")
    dm_tmp._unlink_if_ours(path, os.makedev(253, 1))
    assert os.path.exists(path)  # a regular file is never removed
    os.unlink(path)
    os.symlink(str(tmp_path / "dm-gone"), path)
    dm_tmp._unlink_if_ours(path, os.makedev(253, 1))
    assert not os.path.lexists(path)  # dangling udev-style link: removed
    os.symlink(str(tmp_path / "mapper"), path)
    dm_tmp._unlink_if_ours(path, os.makedev(253, 1))
    assert os.path.lexists(path)  # link to a non-block: left alone
    os.unlink(path)


def test_remove_node_gone_leaves_foreign_file(dm_tmp, caplog):
    path = dm_tmp.node_path("fiesnap-e")
    with open(path, "w") as f:
        f.write("x")
    dm_tmp._ensure_node_gone("fiesnap-e", 253, 4)
    assert os.path.exists(path)
    assert "left alone" in caplog.text
