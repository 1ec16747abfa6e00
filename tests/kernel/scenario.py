"""Workloads and checkpoint-record access for the real-kernel tests (run in the guest).

Digests, raw I/O and shell helpers live in helpers.py."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import re
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass

from fiesnap.model.seeding import SeedLayout, recorded_plan

from .helpers import MiB, device_digest, fsck_clean, make_fs, tree_digest


def populate(root: str, seed: int = 1) -> None:
    """A checkpoint-time tree: big and small files, a sqlite db, dirs, a symlink."""
    rnd = random.Random(seed)
    os.makedirs(f"{root}/data/deep/er", exist_ok=True)
    for i in range(6):
        with open(f"{root}/data/big{i}.bin", "wb") as f:
            f.write(rnd.randbytes(3 * MiB + i * 4099))
    for i in range(40):
        with open(f"{root}/data/deep/small{i}.txt", "wb") as f:
            f.write(rnd.randbytes(rnd.randint(0, 9000)))
    with open(f"{root}/data/deep/er/truncate-me.bin", "wb") as f:
        f.write(rnd.randbytes(2 * MiB))
    with open(f"{root}/data/rename-me.txt", "w") as f:
        f.write("checkpoint-time name\n" * 100)
    os.symlink("data/big0.bin", f"{root}/link-to-big0")
    db = sqlite3.connect(f"{root}/data/app.db")
    db.execute("create table t (k integer primary key, v text)")
    db.executemany("insert into t values (?, ?)", [(i, f"row {i} " * 20) for i in range(3000)])
    db.commit()
    db.close()
    os.sync()


def churn(root: str, seed: int = 2) -> None:
    """Every kind of change the checkpoint must undo."""
    rnd = random.Random(seed)
    # 1 MiB sequential overwrites, with O_DIRECT so each reaches the origin as a 1 MiB bio.
    fd = os.open(f"{root}/data/big1.bin", os.O_WRONLY | os.O_DIRECT)
    buf = mmap.mmap(-1, MiB)
    for off in (0, MiB, 2 * MiB):
        buf[:] = rnd.randbytes(MiB)
        os.pwrite(fd, buf, off)
    os.close(fd)
    buf.close()
    # small unaligned overwrites
    with open(f"{root}/data/big2.bin", "r+b") as f:
        for _ in range(200):
            f.seek(rnd.randrange(0, 3 * MiB - 100))
            f.write(rnd.randbytes(rnd.randint(1, 77)))
    # deletes, new files, truncate, rename
    for victim in [f"{root}/data/big3.bin"] + [f"{root}/data/deep/small{i}.txt" for i in range(0, 40, 3)]:
        if os.path.exists(victim):
            os.unlink(victim)
    for i in range(5):
        with open(f"{root}/data/new{i}.bin", "wb") as f:
            f.write(rnd.randbytes(MiB + i * 777))
    os.truncate(f"{root}/data/deep/er/truncate-me.bin", 12345 + seed)
    if os.path.exists(f"{root}/data/rename-me.txt"):
        os.rename(f"{root}/data/rename-me.txt", f"{root}/data/renamed.txt")
    else:
        os.rename(f"{root}/data/renamed.txt", f"{root}/data/renamed-again.txt")
    with open(f"{root}/data/deep/small1.txt", "ab") as f:
        f.write(b"appended after the checkpoint")
    db = sqlite3.connect(f"{root}/data/app.db")
    db.execute("update t set v = 'changed' where k % 7 = 0")
    db.execute("delete from t where k % 11 = 0")
    db.executemany("insert or replace into t values (?, ?)", [(10000 + i, f"new {seed} " * 30) for i in range(500)])
    db.commit()
    db.close()
    os.sync()


@dataclass
class Record:
    raw: dict

    @property
    def store_ranges(self) -> list[tuple[int, int]]:
        """The store file's own physical byte ranges (its content is not part of the checkpoint)."""
        return [(p, n) for _l, p, n, _f in self.raw["store_extents"]]

    @property
    def outside_checkpoint(self) -> list[tuple[int, int]]:
        """Byte ranges a rollback need not bring back: the store file's blocks and, for a
        free-aware store, the chunks it seeded (free at the checkpoint: a write there is not
        copied, so after a rollback they hold whatever was written since). The seeded chunks
        come from the record's free map; tests/kernel/test_free_aware.py checks them against
        a free map of its own."""
        chunk = self.raw["chunk_bytes"]
        seeded = []
        if self.raw.get("seeded_areas"):
            plan = recorded_plan(SeedLayout(chunk, self.raw["seeded_areas"]), self.raw["free_map"],
                                 self.raw.get("seed_map") or ())
            seeded = [(r.start * chunk, r.count * chunk) for r in plan.seeded.runs]
        return self.store_ranges + seeded

    @property
    def fresh_used_bytes(self) -> int:
        """What status reports as used for a store nothing was saved in yet: the header and
        metadata area 0 (plain), or the header, the seeded areas and the first area after
        them (free-aware)."""
        return (2 + self.raw.get("seeded_areas", 0)) * self.raw["chunk_bytes"]

    @property
    def first_cow_chunk_offset(self) -> int:
        seg = self.raw["cow_table"]["segments"][0]
        return seg["phys_start"] * self.raw["chunk_bytes"]


def load_record(state_dir: str, name: str) -> Record:
    with open(os.path.join(state_dir, f"{name}.json")) as f:
        return Record(json.load(f))


def prepare(lab, kind, name="cp", size="48M", with_files=True, store=None):
    """mkfs + files, then start (`store`: "--plain" or "--free-aware", else the suite's choice):
    returns (files' digest, record, device image at the checkpoint)."""
    make_fs(lab.disk, kind)
    lab.mount(lab.disk)
    if with_files:
        populate(lab.mnt)
    before = tree_digest(lab.mnt)
    lab.umount()
    lab.fiesnap("start", lab.disk, "--size", size, "--name", name, *([store] if store else []))
    rec = load_record(lab.state, name)
    return before, rec, device_digest(lab.disk, rec.outside_checkpoint)


def churn_through(lab, name="cp", seed=2):
    lab.mount(f"/dev/mapper/{name}")
    churn(lab.mnt, seed=seed)
    after = tree_digest(lab.mnt)
    lab.umount()
    return after


def saved_before_freeze(start_stderr: str) -> int:
    """Chunks an online free-aware start saved inside the freeze because they were allocated
    after its table was prepared (0 for other starts): each holds one store chunk."""
    m = re.search(r"(\d+) allocated before the freeze were saved", start_stderr)
    return int(m.group(1)) if m else 0


#: The regression tests of dm-snapshot's traps run against both stores.
BOTH_STORES = ("--plain", "--free-aware")


# ------------------------------------------------------------------ online checkpoints

WRITER_CODE = r'''
import hashlib, os, sys, time
root, log, stop = sys.argv[1], sys.argv[2], sys.argv[3]
os.makedirs(f"{root}/w", exist_ok=True)
i = 0
with open(log, "a") as lg:
    while not os.path.exists(stop):
        seed = hashlib.sha256(str(i).encode()).digest()
        data = seed * ((4096 + i * 37 % 20000) // 32)
        tmp, final = f"{root}/w/.tmp{i}", f"{root}/w/f{i:06d}"
        with open(tmp, "wb") as f:
            f.write(data)
        os.rename(tmp, final)
        lg.write(f"{i}\n")
        lg.flush()
        i += 1
        time.sleep(0.01)
'''


def writer_content(i: int) -> bytes:
    seed = hashlib.sha256(str(i).encode()).digest()
    return seed * ((4096 + i * 37 % 20000) // 32)


class Writer:
    """A process creating files under ROOT/w one after another (write, then rename into
    place) while fiesnap works; it logs each finished file outside the filesystem."""

    def __init__(self, root: str, workdir: str):
        self.root = root
        self.log = os.path.join(workdir, "writer.log")
        self.stop_file = os.path.join(workdir, "writer.stop")
        for p in (self.log, self.stop_file):
            if os.path.exists(p):
                os.unlink(p)
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER_CODE, root, self.log, self.stop_file],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def done(self) -> int:
        """Files finished so far."""
        try:
            with open(self.log) as f:
                return sum(1 for line in f if line.endswith("\n"))
        except FileNotFoundError:
            return 0

    def wait_for(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while self.done() < n:
            assert self.proc.poll() is None, f"writer died: {self.proc.stdout.read()}"
            assert time.monotonic() < deadline, f"writer made only {self.done()} files"
            time.sleep(0.1)

    def stop(self) -> int:
        """Stop it; assert it never failed; return how many files it finished."""
        with open(self.stop_file, "w"):
            pass
        out, _ = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, f"the writer failed while fiesnap worked: {out}"
        return self.done()


def writer_files(root: str) -> list[int]:
    """Indexes of the finished writer files present under ROOT/w, each checked byte for byte."""
    present = sorted(int(n[1:]) for n in os.listdir(f"{root}/w") if n.startswith("f"))
    for i in present:
        with open(f"{root}/w/f{i:06d}", "rb") as f:
            assert f.read() == writer_content(i), f"writer file {i} is damaged"
    return present


def online_setup(lab, kind, name="cp"):
    """mkfs, setup NAME, mount /dev/mapper/NAME, populate; leaves it mounted."""
    make_fs(lab.disk, kind)
    lab.fiesnap("setup", lab.disk, "--name", name)
    lab.mount(f"/dev/mapper/{name}")
    populate(lab.mnt)


def assert_fsck_clean(lab, dev: str, kind: str) -> None:
    """fsck an unmounted filesystem after a rollback. XFS first gets a mount: freezing XFS
    leaves its log covered but not clean, so an online checkpoint image (like a freeze-based
    LVM snapshot) needs log recovery, which xfs_repair -n refuses to do; ext4's freeze leaves
    a clean journal."""
    if kind == "xfs":
        lab.mount(dev)
        lab.umount()
    ok, log = fsck_clean(dev, kind)
    assert ok, log


#: A file whose blocks `scatter` rewrites one in two: every saved chunk is its own run, so the
#: kernel's merge commits its table once per chunk (slow enough to be caught mid-way).
SCATTER_FILE = "data/scatter.bin"


def add_scatter_file(root: str, mib: int = 24) -> None:
    with open(os.path.join(root, SCATTER_FILE), "wb") as f:
        f.write(random.Random(7).randbytes(mib * MiB))
    os.sync()


def scatter(root: str) -> int:
    """Rewrite every other 4 KiB block of SCATTER_FILE with O_DIRECT; returns blocks written."""
    path = os.path.join(root, SCATTER_FILE)
    size = os.path.getsize(path)
    buf = mmap.mmap(-1, 4096)
    buf[:] = random.Random(8).randbytes(4096)
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    n = 0
    try:
        for off in range(0, size, 8192):
            os.pwrite(fd, buf, off)
            n += 1
    finally:
        os.close(fd)
        buf.close()
    return n
