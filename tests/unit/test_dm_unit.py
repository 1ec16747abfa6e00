"""fiesnap.kernel.dm, .libdm and .dmnodes without a kernel device-mapper: ABI layouts,
parsing, checks, errors, the binding's typed handles, node handling.

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
from fiesnap.kernel import dmnodes
from fiesnap.kernel import libdm
from fiesnap.kernel.dm import DeviceMapper, DmInfo, check_uuid, dm_error
from fiesnap.kernel.dmnodes import check_name, udev_running
from fiesnap.kernel.libdm import (
    DM_VERSIONS_NAME_OFFSET,
    DmInfoStruct,
    DmVersionsStruct,
    parse_dm_versions,
)
from fiesnap.model.dmtable import DmTarget
from fiesnap.errors import DeviceMapperError


def _have_libdm() -> bool:
    try:
        ctypes.CDLL(libdm.SONAME)
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


def test_dm_versions_layout():
    assert DmVersionsStruct.next.offset == 0 and DmVersionsStruct.version.offset == 4
    assert DM_VERSIONS_NAME_OFFSET == 16


def test_task_type_numbers():
    assert (libdm.DM_DEVICE_CREATE, libdm.DM_DEVICE_RELOAD, libdm.DM_DEVICE_REMOVE) == (0, 1, 2)
    assert (libdm.DM_DEVICE_SUSPEND, libdm.DM_DEVICE_RESUME, libdm.DM_DEVICE_INFO) == (4, 5, 6)
    assert (libdm.DM_DEVICE_STATUS, libdm.DM_DEVICE_TABLE, libdm.DM_DEVICE_WAITEVENT) == (10, 11, 12)
    assert (libdm.DM_DEVICE_LIST, libdm.DM_DEVICE_CLEAR, libdm.DM_DEVICE_MKNODES) == (13, 14, 15)
    assert (libdm.DM_DEVICE_LIST_VERSIONS, libdm.DM_DEVICE_TARGET_MSG) == (16, 17)


def test_udev_flag_values():
    assert libdm.UDEV_DISABLE_DM_RULES == 0x1
    assert (libdm.UDEV_DISABLE_SUBSYSTEM_RULES, libdm.UDEV_DISABLE_DISK_RULES) == (0x2, 0x4)
    assert (libdm.UDEV_DISABLE_OTHER_RULES, libdm.UDEV_LOW_PRIORITY) == (0x8, 0x10)
    assert libdm.UDEV_DISABLE_LIBRARY_FALLBACK == 0x20
    assert libdm.UDEV_PRIMARY_SOURCE == 0x40
    assert libdm.UDEV_FLAGS_PRIVATE_LAYER == 0x2 | 0x4 | 0x8


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


# --- dm_versions chains ---------------------------------------------------------------


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


def test_parse_dm_versions_truncated():
    buf = _versions_buf([("linear", (1, 4, 0)), ("zero", (1, 1, 0))])
    with pytest.raises(ValueError):
        parse_dm_versions(buf[:30])


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
    assert str(ei.value) == libdm.MISSING == "libdevmapper not found: install the dmsetup package"
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
    lib = ctypes.CDLL(libdm.SONAME)
    lib.dm_set_uuid_prefix.argtypes = [ctypes.c_char_p]
    lib.dm_set_uuid_prefix.restype = ctypes.c_int
    libdm.messages().clear()
    assert lib.dm_set_uuid_prefix(b"a-prefix-that-is-far-too-long") == 0
    msgs = libdm.messages()
    assert any("too long" in text and lvl == 3 for lvl, text in msgs), msgs
    out, err = capfd.readouterr()
    assert "too long" not in out + err


def test_log_hook_never_raises():
    libdm.messages().clear()
    libdm._on_log(3 | 128, b"x.c", 1, -1, b"hello from libdm")
    libdm._on_log(4, None, 0, 0, b"raw %d format")
    libdm._on_log(7, None, 0, 0, None)  # debug: not kept
    assert libdm.messages() == [(3, "hello from libdm"), (4, "raw %d format")]


def test_last_error_shows_only_whole_sentences():
    """A format with conversions is never shown (its arguments cannot be
    read); an error wins over a later warning."""
    libdm.messages().clear()
    assert libdm.last_error() == ""
    libdm._on_log(3, b"a.c", 1, -1, b"Failure to communicate with kernel device-mapper driver.")
    libdm._on_log(3, b"a.c", 2, -1, b"device-mapper: %s ioctl on %s failed: %s")
    libdm._on_log(4, b"a.c", 3, 0, b"a warning at 100%%")
    assert libdm.last_error() == "Failure to communicate with kernel device-mapper driver."
    libdm.messages().clear()
    libdm._on_log(4, b"a.c", 3, 0, b"a warning at 100%%")
    assert libdm.last_error() == "a warning at 100%"


@needs_libdm
def test_handles_refuse_other_pointers():
    """A task argument takes a task handle only: no int, no NULL, no other
    pointer (not even the target cursor, which itself may be NULL)."""
    lib = libdm.load()
    for bad in (0, 1234, None, ctypes.c_void_p(5), libdm.DmTargetCursor(5)):
        with pytest.raises(ctypes.ArgumentError):
            lib.dm_task_destroy(bad)
    with pytest.raises(ctypes.ArgumentError):
        lib.dm_get_next_target(libdm.DmTask(5), libdm.DmTask(5), None, None, None, None)


@needs_libdm
def test_signature_table_is_bound_with_errcheck():
    lib = libdm.load()
    assert libdm.load() is lib  # once per process
    for fname, (argtypes, restype, errcheck) in libdm.SIGNATURES.items():
        fn = getattr(lib, fname)
        assert list(fn.argtypes) == argtypes and fn.restype is restype
        assert getattr(fn, "errcheck", None) is errcheck
    with pytest.raises(libdm.CallFailed) as ei:
        lib.dm_get_library_version(ctypes.create_string_buffer(2), 2)  # too small: libdm says 0
    assert ei.value.func == "dm_get_library_version"
    assert isinstance(ei.value, DeviceMapperError)


def test_udev_running(monkeypatch, tmp_path):
    ctl = tmp_path / "control"
    monkeypatch.setattr(dmnodes, "UDEV_CONTROL", str(ctl))
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
    monkeypatch.setattr(dmnodes, "UDEV_CONTROL", str(tmp_path / "no-udev"))
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
    dm_tmp.nodes.mknodes = asked.append  # no libdm task here (it would look for a kernel dm)
    # Wanted 253:98: the stale node goes, libdm is asked, then fiesnap makes it.
    assert dm_tmp.ensure_node("fiesnap-c", 253, 98) == path
    assert asked == ["fiesnap-c"]
    assert os.stat(path).st_rdev == os.makedev(253, 98)


def test_unlink_only_what_is_ours(dm_tmp, tmp_path):
    path = dm_tmp.node_path("fiesnap-d")
    with open(path, "w") as f:
        f.write("x")
    dm_tmp.nodes.unlink_if_ours(path, os.makedev(253, 1))
    assert os.path.exists(path)  # a regular file is never removed
    os.unlink(path)
    os.symlink(str(tmp_path / "dm-gone"), path)
    dm_tmp.nodes.unlink_if_ours(path, os.makedev(253, 1))
    assert not os.path.lexists(path)  # dangling udev-style link: removed
    os.symlink(str(tmp_path / "mapper"), path)
    dm_tmp.nodes.unlink_if_ours(path, os.makedev(253, 1))
    assert os.path.lexists(path)  # link to a non-block: left alone
    os.unlink(path)


def test_remove_node_gone_leaves_foreign_file(dm_tmp, caplog):
    path = dm_tmp.node_path("fiesnap-e")
    with open(path, "w") as f:
        f.write("x")
    dm_tmp.nodes.ensure_gone("fiesnap-e", 253, 4)
    assert os.path.exists(path)
    assert "left alone" in caplog.text
