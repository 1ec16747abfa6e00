"""The seven workloads of the A/B report: real programs on real data, each deterministic.

Every workload has a `populate(root)` that builds the checkpoint-time tree on a fresh ext4 and a
`run(root)` that is the update measured against each peer (no checkpoint, dm-log-writes for the
dm-bow model, fiesnap's two stores, an LVM snapshot). `run` returns figures of its own (fio's
per-job times); the caller times it as a whole, `sync` included.

The data is real where the machine has it: the lab's two Debian kernel packages (6.1 and 6.12,
fetched by `make lab`) are the two versions of a package and the download that gets unpacked,
this project's own git history is the source tree, dpkg's status file is the host's.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from common import KiB, MiB, REPO, aligned_buffer, sh

BLOCK = 4096
FIO_JOBS = Path(__file__).resolve().parent / "fio" / "writes.fio"


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    what: str                                   # one sentence for the report
    populate: Callable[[str], None]
    run: Callable[[str], dict]
    data: dict = field(default_factory=dict)    # where its real data came from
    needs: Callable[[], object] = lambda: None  # raises SystemExit if its data or program is missing


# --------------------------------------------------------------------- the lab's kernel packages

@dataclass(frozen=True)
class KernelTree:
    package: str
    version: str
    cache: Path     # .lab/kernels/<requested>: kernel.json, root/, debs/
    modules: Path   # root/lib/modules/<version>/kernel


def kernel_trees() -> tuple[KernelTree, KernelTree]:
    """The two unpacked kernel packages the lab keeps, older first."""
    found = []
    for meta in sorted((Path(REPO) / ".lab" / "kernels").glob("*/kernel.json")):
        k = json.loads(meta.read_text())
        modules = meta.parent / "root" / "lib" / "modules" / k["version"] / "kernel"
        if modules.is_dir():
            found.append(KernelTree(k["package"], k["version"], meta.parent, modules))
    if len(found) < 2:
        raise SystemExit("the package workloads need both lab kernels unpacked in .lab/kernels: run `make lab`")

    def key(t: KernelTree) -> tuple:
        return tuple(int(p) if p.isdigit() else 0 for p in t.version.replace("+", ".").replace("-", ".").split("."))

    found.sort(key=key)
    return found[0], found[-1]


PACKAGE_DIRS = ("fs", "net", "sound")


def package_files(tree: KernelTree) -> dict[str, Path]:
    """The package's files under PACKAGE_DIRS, by installed name. Newer Debian kernels ship
    modules xz-compressed; the name drops `.xz`, so one version's file replaces the other's."""
    files = {}
    for d in PACKAGE_DIRS:
        for p in sorted((tree.modules / d).rglob("*")):
            if p.is_file():
                rel = str(p.relative_to(tree.modules))
                files[rel[:-3] if rel.endswith(".xz") else rel] = p
    return files


def _copy_tree(files: dict[str, Path], dest: str) -> None:
    for rel, src in files.items():
        out = os.path.join(dest, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        shutil.copyfile(src, out)


def _write_fsync(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------- 1 package upgrade

PKG = "usr/lib/modules/current/kernel"
DPKG_STATUS = "/var/lib/dpkg/status"


def populate_package(root: str) -> None:
    old, _ = kernel_trees()
    _copy_tree(package_files(old), os.path.join(root, PKG))
    os.makedirs(f"{root}/var/lib/dpkg/info", exist_ok=True)
    shutil.copyfile(DPKG_STATUS, f"{root}/var/lib/dpkg/status")
    with open(f"{root}/var/lib/dpkg/info/kernel-modules.list", "w") as f:
        f.write("".join(f"/{PKG}/{rel}\n" for rel in package_files(old)))


def run_package(root: str) -> dict:
    """dpkg's order: every new file unpacked to NAME.dpkg-new and fsynced, then each renamed
    over NAME, then the files the new version no longer has removed, then its database
    (the file list and the status file, each written to a new file and renamed)."""
    old, new = kernel_trees()
    old_files, new_files = package_files(old), package_files(new)
    base = os.path.join(root, PKG)
    for rel, src in new_files.items():
        out = os.path.join(base, rel)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        _write_fsync(out + ".dpkg-new", src.read_bytes())
    for rel in new_files:
        os.rename(os.path.join(base, rel) + ".dpkg-new", os.path.join(base, rel))
    gone = [rel for rel in old_files if rel not in new_files]
    for rel in gone:
        os.unlink(os.path.join(base, rel))
    info = f"{root}/var/lib/dpkg/info/kernel-modules.list"
    _write_fsync(info + ".new", "".join(f"/{PKG}/{rel}\n" for rel in new_files).encode())
    os.rename(info + ".new", info)
    status = f"{root}/var/lib/dpkg/status"
    text = Path(status).read_bytes().replace(old.version.encode(), new.version.encode())
    _write_fsync(status + "-new", text)
    os.rename(status + "-new", status)
    return {"files_replaced": sum(1 for r in new_files if r in old_files),
            "files_added": sum(1 for r in new_files if r not in old_files), "files_removed": len(gone),
            "bytes_unpacked": sum(p.stat().st_size for p in new_files.values())}


# --------------------------------------------------------------------- 2 database

DB = "var/lib/app/app.db"
DB_ROWS = 60_000


def _row(rnd: random.Random, i: int) -> tuple:
    return (i, f"item-{rnd.randrange(1 << 30):08x}", rnd.randbytes(rnd.randint(600, 1400)))


def populate_database(root: str) -> None:
    os.makedirs(os.path.dirname(f"{root}/{DB}"), exist_ok=True)
    rnd = random.Random(11)
    db = sqlite3.connect(f"{root}/{DB}")
    db.execute("pragma journal_mode=wal")
    db.execute("create table items (id integer primary key, name text, body blob)")
    db.execute("create index items_name on items (name)")
    db.executemany("insert into items values (?, ?, ?)", (_row(rnd, i) for i in range(DB_ROWS)))
    db.commit()
    db.execute("pragma wal_checkpoint(truncate)")
    db.close()


def run_database(root: str) -> dict:
    """WAL transactions of random updates, inserts and deletes, then VACUUM (which rewrites the
    whole database through the WAL) and a truncating checkpoint."""
    rnd = random.Random(12)
    db = sqlite3.connect(f"{root}/{DB}")
    db.execute("pragma journal_mode=wal")
    next_id = DB_ROWS
    for _ in range(30):
        with db:
            db.executemany("update items set body = ? where id = ?",
                           [(rnd.randbytes(rnd.randint(600, 1400)), rnd.randrange(next_id)) for _ in range(300)])
            db.executemany("insert into items values (?, ?, ?)", [_row(rnd, next_id + k) for k in range(200)])
            next_id += 200
            db.executemany("delete from items where id = ?", [(rnd.randrange(next_id),) for _ in range(150)])
    db.execute("pragma wal_checkpoint(truncate)")
    before = os.path.getsize(f"{root}/{DB}")
    db.execute("vacuum")
    db.execute("pragma wal_checkpoint(truncate)")
    db.close()
    return {"db_bytes_before_vacuum": before, "db_bytes_after": os.path.getsize(f"{root}/{DB}")}


# --------------------------------------------------------------------- 3 logs and rotation

LOGS = ("syslog", "auth.log", "kern.log", "daemon.log", "app.log", "access.log")
LOG_KEEP = 4


def _log_lines(rnd: random.Random, nbytes: int, t0: int) -> bytes:
    words = ("connection", "accepted", "from", "session", "opened", "closed", "user", "GET", "POST",
             "/api/v1/items", "200", "404", "took", "ms", "worker", "started", "kernel:", "eth0", "link", "up")
    out, n, t = [], 0, t0
    while n < nbytes:
        t += rnd.randint(0, 3)
        line = (f"2026-12-01T{t // 3600 % 24:02d}:{t // 60 % 60:02d}:{t % 60:02d} host "
                f"svc[{rnd.randint(100, 9999)}]: " + " ".join(rnd.choice(words) for _ in range(rnd.randint(5, 14)))
                + f" id={rnd.getrandbits(48):012x}\n").encode()
        out.append(line)
        n += len(line)
    return b"".join(out)


def populate_logs(root: str) -> None:
    rnd = random.Random(21)
    d = f"{root}/var/log"
    os.makedirs(d, exist_ok=True)
    for name in LOGS:
        with open(f"{d}/{name}", "wb") as f:
            f.write(_log_lines(rnd, 6 * MiB, 0))
        for k in range(1, LOG_KEEP + 1):
            with gzip.open(f"{d}/{name}.{k}.gz", "wb", compresslevel=6) as f:
                f.write(_log_lines(rnd, 4 * MiB, k))


def run_logs(root: str) -> dict:
    """Three rounds: each log grows by 3 MiB in 64 KiB appends with an fdatasync per MiB, then
    logrotate's steps: the oldest .gz deleted, the others renamed up, the log renamed to .1
    and compressed by gzip (which writes .1.gz and deletes .1), a new empty log."""
    rnd = random.Random(22)
    d = f"{root}/var/log"
    appended = 0
    for rnd_no in range(3):
        for name in LOGS:
            data = _log_lines(rnd, 3 * MiB, 1000 * (rnd_no + 1))
            fd = os.open(f"{d}/{name}", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                for off in range(0, len(data), 64 * KiB):
                    os.write(fd, data[off:off + 64 * KiB])
                    if (off // (64 * KiB)) % 16 == 15:
                        os.fdatasync(fd)
                os.fdatasync(fd)
            finally:
                os.close(fd)
            appended += len(data)
        for name in LOGS:
            oldest = f"{d}/{name}.{LOG_KEEP}.gz"
            if os.path.exists(oldest):
                os.unlink(oldest)
            for k in range(LOG_KEEP - 1, 0, -1):
                if os.path.exists(f"{d}/{name}.{k}.gz"):
                    os.rename(f"{d}/{name}.{k}.gz", f"{d}/{name}.{k + 1}.gz")
            os.rename(f"{d}/{name}", f"{d}/{name}.1")
            sh("gzip", "-6", f"{d}/{name}.1")
            open(f"{d}/{name}", "wb").close()
    return {"appended_bytes": appended, "rotations": 3 * len(LOGS)}


# --------------------------------------------------------------------- 4 in-place rewrite

IMAGE, IMAGE_MIB = "srv/vm/disk.img", 160
TABLE, TABLE_MIB = "srv/db/table.ibd", 96


def _random_file(path: str, mib: int, seed: int) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rnd = random.Random(seed)
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(rnd.randbytes(MiB))


def populate_rewrite(root: str) -> None:
    _random_file(f"{root}/{IMAGE}", IMAGE_MIB, 31)
    _random_file(f"{root}/{TABLE}", TABLE_MIB, 32)


def run_rewrite(root: str) -> dict:
    """A VM disk image rewritten in place with O_DIRECT 64 KiB writes (1,000 of them, random
    places), then a database file with buffered 16 KiB page writes (3,000, random places), an
    fsync every 200 as a database commits."""
    rnd = random.Random(33)
    buf = aligned_buffer(64 * KiB)
    fd = os.open(f"{root}/{IMAGE}", os.O_WRONLY | os.O_DIRECT)
    try:
        for i in range(1000):
            buf[:8] = i.to_bytes(8, "little")
            os.pwrite(fd, buf, rnd.randrange(IMAGE_MIB * MiB // (64 * KiB)) * 64 * KiB)
        os.fsync(fd)
    finally:
        os.close(fd)
    page = bytearray(rnd.randbytes(16 * KiB))
    fd = os.open(f"{root}/{TABLE}", os.O_WRONLY)
    try:
        for i in range(3000):
            page[:8] = i.to_bytes(8, "little")
            os.pwrite(fd, page, rnd.randrange(TABLE_MIB * MiB // (16 * KiB)) * 16 * KiB)
            if i % 200 == 199:
                os.fsync(fd)
        os.fsync(fd)
    finally:
        os.close(fd)
    return {"direct_bytes": 1000 * 64 * KiB, "buffered_bytes": 3000 * 16 * KiB}


# --------------------------------------------------------------------- 5 new files

def _newest_deb() -> Path:
    _, new = kernel_trees()
    debs = sorted((new.cache / "debs").glob(f"{new.package}_*.deb"))
    if not debs:
        raise SystemExit(f"no {new.package} .deb in {new.cache / 'debs'}: run `make lab`")
    return debs[-1]


def populate_new_files(root: str) -> None:
    old, _ = kernel_trees()
    _copy_tree({rel: p for rel, p in package_files(old).items() if rel.startswith("fs/")},
               os.path.join(root, "usr/lib/modules/current/kernel"))


def run_new_files(root: str) -> dict:
    """A download (the newer kernel package, copied in and fsynced) unpacked with dpkg-deb."""
    deb = _newest_deb()
    os.makedirs(f"{root}/var/cache/apt/archives", exist_ok=True)
    out = f"{root}/var/cache/apt/archives/{deb.name}"
    shutil.copyfile(deb, out)
    fd = os.open(out, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    os.makedirs(f"{root}/opt/unpacked", exist_ok=True)   # dpkg-deb -x makes only the last folder
    sh("dpkg-deb", "-x", out, f"{root}/opt/unpacked", timeout=1800)
    unpacked = sum(p.stat().st_size for p in Path(f"{root}/opt/unpacked").rglob("*") if p.is_file())
    return {"download_bytes": deb.stat().st_size, "unpacked_bytes": unpacked, "package": deb.name}


# --------------------------------------------------------------------- 6 source tree

SRC = "home/dev/src"


def _git(root: str, *args: str) -> str:
    return sh("git", "-c", "safe.directory=*", "-C", f"{root}/{SRC}", *args, timeout=1200).stdout.strip()


def source_versions() -> tuple[str, str]:
    """The project's first commit and its current one: two versions of one real source tree."""
    g = ("git", "-c", "safe.directory=*", "-C", REPO)
    head = subprocess.run((*g, "rev-parse", "HEAD"), capture_output=True, text=True)
    first = subprocess.run((*g, "rev-list", "--max-parents=0", "HEAD"), capture_output=True, text=True)
    if head.returncode or first.returncode or not first.stdout.split():
        raise SystemExit(f"the source-tree workload needs this project's git history in {REPO} (a clone, "
                         f"not an exported tree): {(head.stderr or first.stderr).strip()}")
    return first.stdout.split()[-1], head.stdout.strip()


def populate_source(root: str) -> None:
    first, _ = source_versions()
    os.makedirs(os.path.dirname(f"{root}/{SRC}"), exist_ok=True)
    sh("git", "-c", "safe.directory=*", "clone", "-q", "--no-hardlinks", "--no-checkout", REPO, f"{root}/{SRC}",
       timeout=1200)
    _git(root, "checkout", "-q", first)


def run_source(root: str) -> dict:
    """git checkout from the first version to the current one and back, and forward again:
    three switches, each deleting, creating and rewriting files and rewriting git's index."""
    first, head = source_versions()
    for rev in (head, first, head):
        _git(root, "checkout", "-q", rev)
    files = int(_git(root, "ls-files").count("\n")) + 1
    return {"from": first[:12], "to": head[:12], "switches": 3, "files_at_end": files}


# --------------------------------------------------------------------- 7 fio

FIO_OVER, FIO_OVER_MIB = "data/over.bin", 256


def _need_fio() -> None:
    if shutil.which("fio") is None:
        raise SystemExit("fio is not installed: `make bench-sysdeps` installs it")


def fio_sections() -> list[str]:
    return [ln.strip()[1:-1] for ln in FIO_JOBS.read_text().splitlines()
            if ln.strip().startswith("[") and ln.strip() != "[global]"]


def populate_fio(root: str) -> None:
    _random_file(f"{root}/{FIO_OVER}", FIO_OVER_MIB, 41)


def run_fio(root: str) -> dict:
    """Every job of benchmarks/fio/writes.fio, one after the other; each job's wall time
    (fio start to its end_fsync) and fio's own figures."""
    _need_fio()
    jobs = {}
    env = dict(os.environ, FIO_DIR=f"{root}/data")
    for section in fio_sections():
        t0 = time.monotonic()
        p = subprocess.run(["fio", f"--section={section}", "--output-format=json", str(FIO_JOBS)],
                           capture_output=True, text=True, env=env, timeout=1800, stdin=subprocess.DEVNULL)
        took = time.monotonic() - t0
        if p.returncode != 0:
            raise RuntimeError(f"fio {section} -> exit {p.returncode}: {p.stderr[-400:]}")
        job = json.loads(p.stdout[p.stdout.index("{"):])["jobs"][0]
        w = job["write"]
        jobs[section] = {"wall_s": round(took, 3), "fio_runtime_s": job["job_runtime"] / 1000,
                         "io_bytes": w["io_bytes"], "bw_bytes": w["bw_bytes"], "iops": round(w["iops"], 1)}
    return {"jobs": jobs}


WORKLOADS: tuple[Workload, ...] = (
    Workload("package_upgrade", "Package upgrade",
             "A Debian kernel package's modules (fs, net, sound) upgraded from 6.1 to 6.12 the way dpkg "
             "does it: each file unpacked to .dpkg-new and fsynced, renamed over the old one, the files "
             "6.12 dropped removed, then dpkg's file list and status file replaced.",
             populate_package, run_package, {"source": "the lab's linux-image packages; dpkg status of the host"}, kernel_trees),
    Workload("database", "SQLite database (WAL)",
             "A 60,000-row SQLite database in WAL mode: 30 transactions of 300 updates, 200 inserts and "
             "150 deletes, a checkpoint, then VACUUM and a truncating checkpoint.",
             populate_database, run_database, {"source": "Python's sqlite3 (the system libsqlite3)"}),
    Workload("logs", "Logs with rotation",
             "Six logs, each appended 3 MiB three times (64 KiB writes, fdatasync per MiB), rotated after "
             "each round like logrotate: oldest .gz deleted, others renamed, the log compressed by gzip.",
             populate_logs, run_logs, {"source": "generated log lines; gzip"}),
    Workload("rewrite_in_place", "In-place rewrite of large files",
             "A 160 MiB VM disk image rewritten in 1,000 random 64 KiB O_DIRECT writes, then a 96 MiB "
             "database file in 3,000 random buffered 16 KiB page writes, fsync every 200.",
             populate_rewrite, run_rewrite, {"source": "random data"}),
    Workload("new_files", "Download and unpack into free space",
             "The 6.12 kernel package (107 MiB) downloaded into the filesystem and unpacked with "
             "dpkg-deb -x next to a checkpoint-time tree.",
             populate_new_files, run_new_files, {"source": "the lab's linux-image-6.12 package"}, _newest_deb),
    Workload("source_tree", "Source tree switched between versions",
             "This project's git repository checked out at its first commit, then switched to the "
             "current commit, back, and forward again with git checkout.",
             populate_source, run_source, {"source": "this repository's history"}, source_versions),
    Workload("fio", "fio write jobs",
             "benchmarks/fio/writes.fio: sequential 1 MiB and random 4 KiB writes, O_DIRECT and "
             "buffered, over a 256 MiB file written before the checkpoint and into new files.",
             populate_fio, run_fio, {"source": "fio job file in benchmarks/fio/"}, _need_fio),
)


def preflight(workloads: list[Workload]) -> None:
    """Every chosen workload's data and programs present, before any disk is touched: a missing
    one stops the run at once with what to do, not half-way through."""
    for w in workloads:
        w.needs()


def by_name(names: str) -> list[Workload]:
    if names in ("", "all"):
        return list(WORKLOADS)
    known = {w.name: w for w in WORKLOADS}
    out = []
    for n in names.split(","):
        if n not in known:
            raise SystemExit(f"unknown workload {n!r}: pick from {', '.join(known)}")
        out.append(known[n])
    return out
