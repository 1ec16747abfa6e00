"""activate / deactivate, start's resolve_target and the record's fields, with fakes.

Device-mapper, the device search and the raw identity read are faked; the
state folder is real (tmp_path), and so is the identity check: the fake read
returns a block encoded from the record (or a wrong one).
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
from test_host_adapters import MKFS, host, loop_image  # noqa: F401  (host: fixture)

from fiesnap.commands import activate
from fiesnap.commands import start
from fiesnap.kernel import blockdev
from fiesnap.kernel.blockdev import BlockDevice
from fiesnap.model.cowtable import CowTable
from fiesnap.kernel.dm import DmInfo
from fiesnap.errors import (
    CheckpointNameError,
    DeviceError,
    DeviceMapperError,
    NotRootError,
    RefusedError,
    StoreFormatError,
    UsageError,
)
from fiesnap.model.extents import ChunkRun
from fiesnap.model.identity import IDENTITY_BYTES, encode_identity
from fiesnap.kernel.mounts import private_mount
from fiesnap.model.extents import Extent
from fiesnap.model.record import CheckpointRecord
from fiesnap.model.seal import stamp_of
from fiesnap.services import deviceseal, storeid
from fiesnap.services.statedir import StateStore

MiB = 1 << 20
BOOT = "0a1b2c3d-0000-4000-8000-00000000000b"
OLD_BOOT = "0a1b2c3d-0000-4000-8000-00000000000a"


def _ext4_head(mounts: int = 3, mount_time: int = 1_000, kbytes: int = 50) -> bytes:
    """The first 2 KiB of a device holding ext4, with the fields a seal explains."""
    head = bytearray(2048)
    sb = 1024
    head[sb + 0x38:sb + 0x3A] = (0xEF53).to_bytes(2, "little")
    head[sb + 0x2C:sb + 0x30] = mount_time.to_bytes(4, "little")
    head[sb + 0x30:sb + 0x34] = (mount_time + 5).to_bytes(4, "little")
    head[sb + 0x34:sb + 0x36] = mounts.to_bytes(2, "little")
    head[sb + 0x178:sb + 0x180] = kbytes.to_bytes(8, "little")
    return bytes(head)
SETUP_ID = "5" * 32
CKPT_ID = "c" * 32


def _passthrough(name: str = "cp", *, minor: int = 16) -> CheckpointRecord:
    return CheckpointRecord(
        name=name, device=f"/dev/vd{name}", device_major=254, device_minor=minor,
        device_bytes=64 * MiB, fstype="ext4", fs_uuid=f"uuid-{name}", phase="passthrough",
        managed=True, setup_id=SETUP_ID,
    )


def _active(name: str = "cp", *, minor: int = 16, phase: str = "active") -> CheckpointRecord:
    cow = CowTable.from_runs([ChunkRun(100, 50)], 4096)
    return replace(
        _passthrough(name, minor=minor), checkpoint_id=CKPT_ID, chunk_bytes=4096, store_type="PO",
        store_relpath=f".fiesnap/store-{name}", store_file_bytes=51 * 4096,
        store_extents=(Extent(0, 405504, 208896, 0),), cow_table=cow, created="now",
        phase=phase, identity_offset=405504, generation=1, mode="online",
    )


def _info(minor: int, open_count: int = 0) -> DmInfo:
    return DmInfo(exists=True, suspended=False, live_table=True, inactive_table=False,
                  open_count=open_count, event_nr=0, major=253, minor=minor, read_only=False,
                  target_count=1)


class FakeDM:
    def __init__(self, events: list, present: dict[str, DmInfo] | None = None,
                 fail_remove: str | None = None) -> None:
        self.events = events
        self.present = dict(present or {})
        self.fail_remove = fail_remove

    def info(self, name):
        return self.present.get(name)

    def remove(self, name, **kw):
        self.events.append(("remove", name))
        if name == self.fail_remove:
            raise DeviceMapperError(f"device-mapper remove {name} failed: injected")
        del self.present[name]


class Env:
    """A state folder, a fake dm and fake adapters that log into one event list."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        self.events: list = []
        self.state = StateStore(str(tmp_path / "state"))
        self.dm = FakeDM(self.events)
        self.logged: list[str] = []
        #: what find_device answers, per checkpoint name (default: the recorded device)
        self.found: dict[str, BlockDevice | Exception | list] = {}
        #: what the raw identity read returns, per device (default: the record's own block)
        self.blocks: dict[str, bytes | Exception] = {}
        self.mounts: dict[tuple[int, int], list[str]] = {}
        #: the raw device head, per device (default: an ext4 last mounted at time 1000)
        self.heads: dict[str, bytes] = {}
        self.boot = (BOOT, 2_000)  # this boot's id and start time
        self.clock = 3_000.0
        monkeypatch.setattr(activate, "require_root", lambda: None)
        monkeypatch.setattr(activate, "find_device", self._find_device)
        monkeypatch.setattr(storeid, "read_identity_block", self._read_identity)
        monkeypatch.setattr(activate, "build_stack", self._build_stack)
        monkeypatch.setattr(activate, "create_passthrough", self._create_passthrough)
        monkeypatch.setattr(blockdev, "mounts_of", lambda ma, mi: list(self.mounts.get((ma, mi), [])))
        monkeypatch.setattr(activate.time, "sleep", lambda s: self.events.append(("sleep", s)))
        monkeypatch.setattr(deviceseal, "read_head", self._read_head)
        monkeypatch.setattr(deviceseal.boot, "boot_id", lambda: self.boot[0])
        monkeypatch.setattr(deviceseal.boot, "boot_time", lambda: self.boot[1])
        monkeypatch.setattr(deviceseal.time, "time", lambda: self.clock)

    def _read_head(self, device):
        self.events.append(("read_head", device))
        return self.heads.get(device, _ext4_head())

    def _find_device(self, want):
        self.events.append(("find_device", want.label))
        answer = self.found.get(want.label)
        if isinstance(answer, list):  # a sequence of answers, one per call
            answer = answer.pop(0)
        if isinstance(answer, Exception):
            raise answer
        if answer is not None:
            return answer
        r = self.state.load(want.label)
        assert (want.path, want.fs_uuid, want.size_bytes) == (r.device, r.fs_uuid, r.device_bytes)
        return BlockDevice(r.device, r.device_major, r.device_minor, r.device_bytes, 512)

    def _read_identity(self, device, offset):
        self.events.append(("read_identity", device, offset))
        block = self.blocks.get(device)
        if isinstance(block, Exception):
            raise block
        if block is not None:
            return block
        r = next(r for r in self.state.load_all() if r.device == device)
        return encode_identity(r.expected_identity())

    def _build_stack(self, dm, record, *, zero_header, log=lambda s: None):
        assert dm is self.dm
        self.events.append(("build_stack", record.name, zero_header, record.device_string))

    def _create_passthrough(self, dm, record):
        assert dm is self.dm
        self.events.append(("create_passthrough", record.name, record.device_string))

    def activate(self, name=None, **kw):
        return activate.activate(name, lambda: self.dm, self.state, self.logged.append, **kw)

    def deactivate(self, name):
        return activate.deactivate(name, lambda: self.dm, self.state, self.logged.append)[name]

    def kinds(self):
        return [e[0] for e in self.events]


@pytest.fixture
def env(monkeypatch, tmp_path) -> Env:
    return Env(monkeypatch, tmp_path)


# --------------------------------------------------------------------------
# activate: one name
# --------------------------------------------------------------------------


def test_activate_passthrough_creates_the_passthrough(env):
    env.state.save(_passthrough())
    (res,) = env.activate("cp")
    assert (res.name, res.result, res.detail) == ("cp", "activated", "passthrough")
    assert env.events == [("find_device", "cp"), ("create_passthrough", "cp", "254:16")]
    assert res.to_dict() == {"name": "cp", "result": "activated", "detail": "passthrough", "bypass": "",
                             "boot_attempts": None}


def test_activate_passthrough_already_active(env):
    env.state.save(_passthrough())
    env.dm.present["cp"] = _info(0)
    (res,) = env.activate("cp")
    assert res.result == "already active"
    assert env.events == []  # not even a device search


def test_activate_checkpoint_checks_identity_before_building(env):
    env.state.save(_active())
    (res,) = env.activate("cp")
    assert (res.result, res.detail) == ("activated", "checkpoint")
    assert env.events == [
        ("find_device", "cp"),
        ("read_identity", "/dev/vdcp", 405504),
        ("build_stack", "cp", False, "254:16"),  # never zero an existing store
    ]


def test_activate_follows_a_moved_device(env):
    env.state.save(_active())
    env.found["cp"] = BlockDevice("/dev/vdz", 254, 48, 64 * MiB, 512)
    env.blocks["/dev/vdz"] = encode_identity(_active().expected_identity())
    env.activate("cp")
    moved = env.state.load("cp")
    assert (moved.device, moved.device_major, moved.device_minor) == ("/dev/vdz", 254, 48)
    assert env.events[1] == ("read_identity", "/dev/vdz", 405504)  # read where it is now
    assert env.events[2] == ("build_stack", "cp", False, "254:48")


@pytest.mark.parametrize("phase,hint", [
    ("merging", "a rollback of 'cp' is under way: run 'fiesnap merge cp' to finish it"),
    ("copied", "a rollback of 'cp' is under way: run 'fiesnap merge cp' to finish it"),
    ("starting", "interrupted while starting: run 'fiesnap commit cp' to finish"),
    ("committing", "interrupted while committing: run 'fiesnap commit cp' to finish"),
])
def test_activate_refuses_unfinished_phases(env, phase, hint):
    env.state.save(_active(phase=phase))
    with pytest.raises(RefusedError) as e:
        env.activate("cp")
    assert hint in str(e.value)
    assert env.events == []


def test_activate_checkpoint_already_active(env):
    env.state.save(_active())
    env.dm.present.update({"cp": _info(0), "cp-snap": _info(1), "cp-cow": _info(2)})
    (res,) = env.activate("cp")
    assert res.result == "already active" and env.events == []


@pytest.mark.parametrize("present", [["cp-cow"], ["cp-cow", "cp-snap"], ["cp"]])
def test_activate_refuses_half_active(env, present):
    env.state.save(_active())
    env.dm.present.update({n: _info(i) for i, n in enumerate(present)})
    with pytest.raises(RefusedError, match=r"'cp' is half active \(.*\): run 'fiesnap deactivate cp' first"):
        env.activate("cp")
    assert env.events == []


@pytest.mark.parametrize("change,error,match", [
    (dict(checkpoint_id="d" * 32), RefusedError, "is for checkpoint d{32}, the record says c{32}"),
    (dict(generation=2), RefusedError, "has store map generation 2, the record says 1"),
    (dict(fs_uuid="other"), RefusedError, "is for filesystem other"),
    (dict(device_bytes=32 * MiB), RefusedError, "is for a device of 33554432 bytes"),
])
def test_activate_identity_mismatch_never_builds(env, change, error, match):
    env.state.save(_active())
    env.blocks["/dev/vdcp"] = encode_identity(replace(_active().expected_identity(), **change))
    with pytest.raises(error, match=match):
        env.activate("cp")
    assert "build_stack" not in env.kinds()


def test_activate_identity_absent_or_unreadable_never_builds(env):
    env.state.save(_active())
    env.blocks["/dev/vdcp"] = bytes(IDENTITY_BYTES)
    with pytest.raises(StoreFormatError, match=r"no fiesnap store identity at /dev/vdcp byte 405504 \(found zeros\)"):
        env.activate("cp")
    env.blocks["/dev/vdcp"] = OSError(5, "Input/output error")
    with pytest.raises(DeviceError, match="cannot read the store identity at /dev/vdcp byte 405504"):
        env.activate("cp")
    env.state.save(replace(_active(), identity_offset=-1))
    with pytest.raises(RefusedError, match="no store identity recorded"):
        env.activate("cp")
    assert "build_stack" not in env.kinds()


def test_activate_device_not_found_is_a_device_error(env):
    env.state.save(_active())
    env.found["cp"] = DeviceError("cannot find the device of 'cp'")
    with pytest.raises(DeviceError, match="cannot find"):
        env.activate("cp")
    assert env.kinds() == ["find_device"]


def test_activate_waits_for_devices_that_are_still_appearing(env):
    env.state.save(_passthrough())
    env.found["cp"] = [DeviceError("not yet"), DeviceError("not yet"), None]
    (res,) = env.activate("cp", wait_seconds=60)
    assert res.result == "activated"
    assert env.kinds() == ["find_device", "sleep", "find_device", "sleep", "find_device", "create_passthrough"]


def test_activate_unknown_name(env):
    with pytest.raises(CheckpointNameError, match="no checkpoint named 'nope'"):
        env.activate("nope")


def test_activate_needs_root(env, monkeypatch):
    def not_root():
        raise NotRootError("root")

    monkeypatch.setattr(activate, "require_root", not_root)
    with pytest.raises(NotRootError):
        env.activate(None)


# --------------------------------------------------------------------------
# activate --all
# --------------------------------------------------------------------------


def test_activate_all_continues_past_a_failure(env):
    env.state.save(_passthrough("a", minor=1))
    env.state.save(_active("b", minor=2, phase="merging"))
    env.state.save(_active("c", minor=3))
    with pytest.raises(RefusedError, match=r"^1 of 3 could not be activated; first: a rollback of 'b'"):
        env.activate(None)
    assert ("create_passthrough", "a", "254:1") in env.events
    assert ("build_stack", "c", False, "254:3") in env.events
    assert any(line.startswith("error: a rollback of 'b'") for line in env.logged)


def test_activate_all_counts_every_failure_and_raises_the_first_kind(env):
    env.state.save(_passthrough("a", minor=1))
    env.state.save(_active("b", minor=2))
    env.state.save(_active("c", minor=3))
    env.state.save(_passthrough("d", minor=4))
    env.found["a"] = DeviceError("cannot find the device of 'a'")
    env.blocks["/dev/vdb"] = bytes(IDENTITY_BYTES)
    with pytest.raises(DeviceError, match=r"^2 of 4 could not be activated; first: cannot find the device of 'a'"):
        env.activate(None)
    assert [e for e in env.events if e[0] in ("build_stack", "create_passthrough")] == [
        ("build_stack", "c", False, "254:3"), ("create_passthrough", "d", "254:4")]
    assert len([line for line in env.logged if line.startswith("error: ")]) == 2


def test_activate_all_with_nothing_recorded(env):
    assert env.activate(None) == []


def test_activate_all_success_returns_every_result(env):
    env.state.save(_passthrough("a", minor=1))
    env.state.save(_active("b", minor=2))
    env.dm.present["a"] = _info(0)
    res = env.activate(None)
    assert [(r.name, r.result) for r in res] == [("a", "already active"), ("b", "activated")]


# --------------------------------------------------------------------------
# deactivate
# --------------------------------------------------------------------------


def _up(env, record):
    env.state.save(record)
    env.dm.present.update({"cp": _info(0), "cp-snap": _info(1), "cp-cow": _info(2)})


def test_deactivate_removes_origin_then_snap_then_cow_and_seals(env):
    _up(env, _active())
    assert env.deactivate("cp") == ["cp", "cp-snap", "cp-cow"]
    assert env.events == [("remove", "cp"), ("remove", "cp-snap"), ("remove", "cp-cow"),
                          ("read_head", "/dev/vdcp")]  # read once nothing holds the device
    assert env.dm.present == {}
    # Ends nothing; the superblock as the origin left it is kept.
    assert env.state.load("cp") == replace(_active(), seal=stamp_of(_ext4_head(), "ext4"))


def test_deactivate_only_what_is_there(env):
    env.state.save(_active())
    env.dm.present["cp-cow"] = _info(2)
    assert env.deactivate("cp") == ["cp-cow"]
    # No origin was taken down: the device may have been written without it already
    # (mounted directly after a reboot), so sealing now would hide that.
    assert env.state.load("cp").seal is None and "read_head" not in env.kinds()
    env.state.save(_passthrough())
    assert env.deactivate("cp") == []


def test_deactivate_all_seals_each_and_goes_on_past_a_failure(env):
    env.state.save(_active("a", minor=1))
    env.state.save(_active("b", minor=2))
    env.state.save(_passthrough("c", minor=3))
    env.dm.present.update({"a": _info(0), "a-snap": _info(1), "a-cow": _info(2),
                           "b": _info(3, open_count=1), "b-snap": _info(4), "b-cow": _info(5),
                           "c": _info(6)})
    with pytest.raises(DeviceError, match=r"^1 of 3 could not be deactivated; first: /dev/mapper/b is open"):
        activate.deactivate(None, lambda: env.dm, env.state, env.logged.append)
    assert set(env.dm.present) == {"b", "b-snap", "b-cow"}
    assert env.state.load("a").seal is not None and env.state.load("b").seal is None


def test_deactivate_refuses_mounted(env):
    _up(env, _active())
    env.mounts[(253, 0)] = ["/srv/data"]
    with pytest.raises(RefusedError, match="/dev/mapper/cp is mounted on /srv/data: unmount it first"):
        env.deactivate("cp")
    assert env.events == [] and len(env.dm.present) == 3


def test_deactivate_refuses_open_origin_or_snapshot(env):
    _up(env, _active())
    env.dm.present["cp"] = _info(0, open_count=1)
    with pytest.raises(DeviceError, match="/dev/mapper/cp is open by another program"):
        env.deactivate("cp")
    env.dm.present["cp"] = _info(0)
    env.dm.present["cp-snap"] = _info(1, open_count=2)
    with pytest.raises(DeviceError, match="cp-snap is open by another program"):
        env.deactivate("cp")
    assert env.events == []


def test_deactivate_remove_failure_says_what_is_gone(env):
    _up(env, _active())
    env.dm.fail_remove = "cp-snap"
    with pytest.raises(DeviceMapperError, match="removed so far: cp; 'fiesnap activate cp' rebuilds them"):
        env.deactivate("cp")
    assert set(env.dm.present) == {"cp-snap", "cp-cow"}


# --------------------------------------------------------------------------
# writes that bypassed the origin while the stack was down
# --------------------------------------------------------------------------


def _sealed(head: bytes) -> CheckpointRecord:
    return replace(_active(), seal=stamp_of(head, "ext4"), built_boot=OLD_BOOT, built_at=900)


def test_activate_with_an_unchanged_seal_builds_and_forgets_the_seal(env):
    env.state.save(_sealed(_ext4_head()))
    (res,) = env.activate("cp")
    assert (res.result, res.bypass) == ("activated", "")
    after = env.state.load("cp")
    assert (after.seal, after.bypass, after.built_boot, after.built_at) == (None, "", BOOT, 3000)


def test_activate_after_a_direct_mount_marks_the_checkpoint_and_still_builds(env):
    env.state.save(_sealed(_ext4_head(mounts=3, kbytes=50)))
    env.heads["/dev/vdcp"] = _ext4_head(mounts=4, mount_time=2_500, kbytes=90)
    (res,) = env.activate("cp")
    assert res.result == "activated" and "build_stack" in env.kinds()  # the machine still boots
    assert res.bypass == ("/dev/vdcp was written outside /dev/mapper/cp after 'fiesnap deactivate': "
                          "mounted read-write 1 time(s), last at 1970-01-01 00:41:40 UTC, 40 KiB written")
    assert env.state.load("cp").bypass == res.bypass
    assert any(line.startswith("warning: /dev/vdcp was written outside") and "merge cp' will refuse"
               in line for line in env.logged)
    env.heads["/dev/vdcp"] = _ext4_head()
    (again,) = env.activate("cp")  # the next boot: said again, not looked for again
    assert again.bypass == res.bypass == env.state.load("cp").bypass
    assert env.kinds().count("read_head") == 1


@pytest.mark.parametrize("built_boot,mount_time,clock,bypassed", [
    (OLD_BOOT, 2_100, 3_000.0, True),   # mounted after this boot began, before activate
    (OLD_BOOT, 1_900, 3_000.0, False),  # last mount was in the boot the stack was up in
    (OLD_BOOT, 2_100, 800.0, False),    # clock behind the last build: times prove nothing
    (BOOT, 2_100, 3_000.0, False),      # the stack was built in this boot: that mount went through it
    ("", 2_100, 3_000.0, False),        # a record from before builds were recorded
])
def test_activate_without_a_seal_judges_by_the_mount_time(env, built_boot, mount_time, clock, bypassed):
    env.state.save(replace(_active(), built_boot=built_boot, built_at=900 if built_boot else 0))
    env.heads["/dev/vdcp"] = _ext4_head(mounts=7, mount_time=mount_time)
    env.clock = clock
    (res,) = env.activate("cp")
    assert bool(res.bypass) is bypassed
    if bypassed:
        assert res.bypass == ("/dev/vdcp was mounted read-write directly during this boot, before "
                              "/dev/mapper/cp was activated (ext4 mount count 7)")



# --------------------------------------------------------------------------


class _OsWith:
    """os, with stat() of some paths answered by other paths (no /dev/mapper on this host)."""

    def __init__(self, redirect: dict[str, str]) -> None:
        self._redirect = redirect

    def __getattr__(self, name):
        return getattr(os, name)

    def stat(self, path, *a, **kw):
        return os.stat(self._redirect.get(path, path), *a, **kw)


@pytest.fixture
def nodes(env, tmp_path, monkeypatch):
    """Block device nodes in tmp: the managed device, its /dev/mapper node, a stranger's."""
    if os.geteuid() != 0:
        pytest.skip("needs root (mknod)")
    made = {}
    for label, (ma, mi) in {"dev": (254, 16), "mapper": (253, 7), "plain": (254, 99),
                            "unmanaged": (254, 32)}.items():
        p = tmp_path / f"node-{label}"
        os.mknod(p, 0o600 | 0o060000, os.makedev(ma, mi))
        made[label] = str(p)
    env.state.save(replace(_passthrough(), device=made["dev"]))
    env.state.save(replace(_passthrough("old", minor=32), device=made["unmanaged"], managed=False, setup_id=""))
    monkeypatch.setattr(start, "os", _OsWith({"/dev/mapper/cp": made["mapper"]}))
    monkeypatch.chdir(tmp_path)
    return made


def test_resolve_name(env, nodes):
    assert start.resolve_target("cp", env.state) == "cp"


def test_resolve_unknown_name(env, nodes):
    with pytest.raises(CheckpointNameError, match="no device under fiesnap named 'nope': run 'fiesnap setup"):
        start.resolve_target("nope", env.state)


def test_resolve_mapper_path(env, nodes):
    assert start.resolve_target("/dev/mapper/cp", env.state) == "cp"


def test_resolve_recorded_device(env, nodes):
    assert start.resolve_target(nodes["dev"], env.state) == "cp"


def test_resolve_plain_device_is_offline(env, nodes):
    assert start.resolve_target(nodes["plain"], env.state) is None
    assert start.resolve_target(nodes["unmanaged"], env.state) is None  # not managed: offline start
    assert start.resolve_target("/dev/nonexistent-fiesnap", env.state) is None


def test_resolve_directory_that_is_not_a_mount_point(env, nodes, tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(UsageError, match="is not a mount point"):
        start.resolve_target(str(tmp_path / "d"), env.state)


def test_resolve_mount_point_of_the_managed_device(env, nodes, tmp_path, monkeypatch):
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(start, "_mount_source_devno", lambda p: os.makedev(253, 7))
    assert start.resolve_target(str(tmp_path / "mnt"), env.state) == "cp"
    monkeypatch.setattr(start, "_mount_source_devno", lambda p: os.makedev(254, 16))  # the raw device
    assert start.resolve_target(str(tmp_path / "mnt"), env.state) == "cp"


def test_resolve_mount_point_not_through_fiesnap(env, nodes, tmp_path, monkeypatch):
    (tmp_path / "mnt").mkdir()
    monkeypatch.setattr(start, "_mount_source_devno", lambda p: os.makedev(254, 99))
    with pytest.raises(DeviceError, match=r"is mounted straight from 254:99, not through fiesnap"):
        start.resolve_target(str(tmp_path / "mnt"), env.state)


def _bind(src: str, dst: str) -> None:
    r = subprocess.run(["mount", "--bind", src, dst], capture_output=True, text=True)
    if r.returncode:
        pytest.skip(f"mount --bind failed: {r.stderr.strip()}")


def _umount(point: str) -> None:
    subprocess.run(["umount", point], capture_output=True)
    if os.path.ismount(point):
        subprocess.run(["umount", "-l", point], capture_output=True)


@pytest.mark.root
def test_resolve_real_mount_points(env, host, tmp_path):
    """A loop device's filesystem, mounted and bind-mounted elsewhere: unmanaged, then managed."""
    with loop_image(tmp_path, "fs", 32 * MiB, MKFS["ext4-4k"][1]) as dev:
        st = os.stat(dev)
        with private_mount(dev, "ext4") as mp:
            os.mkdir(os.path.join(mp, "sub"))
            dst = tmp_path / "dst"
            dst.mkdir()
            _bind(os.path.join(mp, "sub"), str(dst))
            try:
                assert start._mount_source_devno(mp) == st.st_rdev
                assert start._mount_source_devno(str(dst)) == st.st_rdev
                assert start._mount_source_devno(os.path.join(mp, "sub")) is None
                for target in (mp, str(dst)):
                    with pytest.raises(DeviceError, match=f"mounted straight from {os.major(st.st_rdev)}:"
                                                          f"{os.minor(st.st_rdev)}, not through fiesnap"):
                        start.resolve_target(target, env.state)
                env.state.save(replace(_passthrough("loopy"), device=dev, device_major=os.major(st.st_rdev),
                                       device_minor=os.minor(st.st_rdev)))
                assert start.resolve_target(mp, env.state) == "loopy"
                assert start.resolve_target(str(dst) + "/", env.state) == "loopy"
                assert start.resolve_target(dev, env.state) == "loopy"
            finally:
                _umount(str(dst))


@pytest.mark.root
def test_same_filesystem_bind_mount_is_a_mount_point(host, tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    _bind(str(src), str(dst))
    try:
        assert start._mount_source_devno(str(dst)) == os.stat(tmp_path).st_dev
    finally:
        _umount(str(dst))


# --------------------------------------------------------------------------
# CheckpointRecord
# --------------------------------------------------------------------------


def test_as_passthrough_keeps_identity_clears_checkpoint():
    r = replace(_active(), frozen_seconds=0.1, free_map=((0, 4096),))
    p = r.with_phase("committing").as_passthrough()
    keep = ("name", "device", "device_major", "device_minor", "device_bytes", "fstype", "fs_uuid",
            "managed", "setup_id")
    assert {k: getattr(p, k) for k in keep} == {k: getattr(r, k) for k in keep}
    assert p.phase == "passthrough" and not p.has_checkpoint and r.has_checkpoint
    fresh = CheckpointRecord(name="x", device="/d", device_major=1, device_minor=2, device_bytes=3,
                             fstype="ext4", fs_uuid="u")
    for k in ("checkpoint_id", "chunk_bytes", "store_type", "store_relpath", "store_file_bytes",
              "store_extents", "cow_table", "free_map", "created", "identity_offset", "generation",
              "mode", "frozen_seconds", "previous_identity"):
        assert getattr(p, k) == getattr(fresh, k), k


def test_setup_record_json_round_trip(tmp_path):
    state = StateStore(str(tmp_path))
    r = _passthrough()
    state.save(r)
    back = state.load("cp")
    assert back == r
    data = json.loads((tmp_path / "cp.json").read_text())
    assert (data["managed"], data["setup_id"], data["identity_offset"], data["generation"], data["mode"]) == (
        True, SETUP_ID, -1, 1, "offline")
    state.save(_active())
    assert state.load("cp") == _active()


def test_old_records_without_the_new_fields_still_load(tmp_path):
    old = _active().to_dict()
    for k in ("managed", "setup_id", "identity_offset", "generation", "mode"):
        del old[k]
    old["some_future_field"] = 1  # unknown keys are ignored
    (tmp_path / "cp.json").write_text(json.dumps(old))
    r = StateStore(str(tmp_path)).load("cp")
    assert (r.managed, r.setup_id, r.identity_offset, r.generation, r.mode) == (False, "", -1, 1, "offline")
    assert r.checkpoint_id == CKPT_ID and r.phase == "active"
