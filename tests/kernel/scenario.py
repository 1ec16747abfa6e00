"""Workloads and byte-level checks for the real-kernel checkpoint tests (run in the guest)."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import sqlite3
import subprocess
from dataclasses import dataclass

MiB = 1 << 20
_ZERO_MIB = bytes(MiB)
_ZERO_SHA = hashlib.sha256(_ZERO_MIB).hexdigest()


def sh(*cmd: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, **kw)


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


def tree_digest(root: str) -> dict[str, tuple]:
    """Every file's mode, size and sha256 (symlink targets), skipping fiesnap's store folder."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = os.path.relpath(dirpath, root)
        if rel_dir == "." and ".fiesnap" in dirnames:
            dirnames.remove(".fiesnap")
        if rel_dir == "." and "lost+found" in dirnames:
            dirnames.remove("lost+found")
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.normpath(os.path.join(rel_dir, name))
            st = os.lstat(path)
            if os.path.islink(path):
                out[rel] = ("link", os.readlink(path))
            elif os.path.isdir(path):
                out[rel] = ("dir", st.st_mode)
            else:
                with open(path, "rb") as f:
                    out[rel] = ("file", st.st_mode, st.st_size, hashlib.sha256(f.read()).hexdigest())
    return out


def device_image_digest(dev: str, exclude: list[tuple[int, int]] = ()) -> list[str]:
    """Per-MiB sha256 of the whole device read with O_DIRECT, excluded byte ranges zeroed."""
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        buf = mmap.mmap(-1, MiB)
        digests = []
        for off in range(0, size, MiB):
            n = os.preadv(fd, [buf], off)
            data = bytearray(buf[:n])
            for start, length in exclude:
                lo, hi = max(start, off), min(start + length, off + n)
                if lo < hi:
                    data[lo - off:hi - off] = bytes(hi - lo)
            # sha256 is slow under TCG; most of a scratch disk is zeros.
            digests.append(_ZERO_SHA if data == _ZERO_MIB else hashlib.sha256(data).hexdigest())
        buf.close()
        return digests
    finally:
        os.close(fd)


def differing_mib(a: list[str], b: list[str]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a, b)) if x != y] + (
        [-1] if len(a) != len(b) else []
    )


@dataclass
class Record:
    raw: dict

    @property
    def store_ranges(self) -> list[tuple[int, int]]:
        """The store file's own physical byte ranges (its content is not part of the checkpoint)."""
        return [(p, n) for _l, p, n, _f in self.raw["store_extents"]]

    @property
    def first_cow_chunk_offset(self) -> int:
        seg = self.raw["cow_table"]["segments"][0]
        return seg["phys_start"] * self.raw["chunk_bytes"]


def load_record(state_dir: str, name: str) -> Record:
    with open(os.path.join(state_dir, f"{name}.json")) as f:
        return Record(json.load(f))


def read_raw(dev: str, offset: int, length: int = 4096) -> bytes:
    fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, max(4096, length))
        os.preadv(fd, [buf], offset)
        return bytes(buf[:length])
    finally:
        os.close(fd)


def write_raw(dev: str, offset: int, data: bytes) -> None:
    fd = os.open(dev, os.O_WRONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, max(4096, len(data)))
        buf[: len(data)] = data
        os.pwritev(fd, [buf], offset)
        os.fsync(fd)
    finally:
        os.close(fd)
