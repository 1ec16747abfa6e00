"""The checkpoint record: one typed, immutable value, parsed and validated once (pure).

The state folder holds one JSON record per name. It is read by a root tool
that acts on block devices, so `CheckpointRecord.from_dict` checks every field
(types, ranges, the COW table's invariants, the phase) before anything uses
it, and the rest of fiesnap only ever sees the typed value: the COW table as
a `CowTable`, the store's extents as `Extent`s, the free map as byte ranges.

A state change returns a new record (`with_phase`, `with_checkpoint`,
`grown`, ...); the state folder saves it atomically. The phases a record may
move between are one table, `TRANSITIONS` (also in docs/design.md): a record
that would skip a step (say, from `active` straight to `copied`) is a bug,
and `with_phase` refuses it.

One module because a field, the state changes that set it and the parser
that checks it on the way in change together; split, a field added to the
record and forgotten by the parser would be trusted unchecked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from fiesnap.errors import FilesystemError, StateError, UsageError
from fiesnap.model.cowtable import CowTable
from fiesnap.model.extents import Extent, head_location, whole_chunks, without_head
from fiesnap.model.identity import IDENTITY_BYTES, StoreIdentity, map_checksum
from fiesnap.model.seal import SuperblockStamp
from fiesnap.model.seeding import SeedLayout, seeded_cow_table
from fiesnap.model.units import is_int

RECORD_VERSION = 1

#: far more boots than any boot loader tries; a larger count is a typo.
MAX_BOOT_ATTEMPTS = 100

#: header + first metadata area + at least one data chunk, with room to spare.
MIN_STORE_CHUNKS = 8

# dm names allow more, but these keep /dev/mapper paths and file names boring.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
_RESERVED_SUFFIXES = ("-snap", "-cow", "-real")
_HEX32 = re.compile(r"^[0-9a-f]{32}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_BOOT_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")

#: A checkpoint's life. An interrupted merge or commit leaves its phase behind
#: so that a re-run knows where to resume.
PHASES = ("starting", "active", "merging", "copied", "committing", "passthrough",
          "handover", "kernel-merging")

#: a rollback is under way: the device is not the checkpoint's nor the current data until it ends
ROLLBACK_PHASES = ("merging", "copied", "handover", "kernel-merging")

#: phase -> the phases a record may move to next.
#:   starting    -> active (the stack is up), committing (clean up a start that
#:                  died), passthrough (an online start undone)
#:   active      -> merging (rollback), committing (keep the changes)
#:   merging     -> copied (every saved chunk is back on the device)
#:   copied      -> passthrough (a device under fiesnap; others are deleted)
#:   committing  -> passthrough (as above)
#:   passthrough -> starting (the next online checkpoint)
#:   active      -> handover (an instant rollback: the stack is down, the table is being
#:                  made fit for the kernel's snapshot-merge)
#:   handover    -> kernel-merging (NAME is a snapshot-merge device: the checkpoint's
#:                  content at once, the kernel copying back in the background)
#:   kernel-merging -> passthrough (the kernel's merge is complete; others are deleted)
TRANSITIONS: dict[str, frozenset[str]] = {
    "starting": frozenset({"active", "committing", "passthrough"}),
    "active": frozenset({"merging", "committing", "handover"}),
    "handover": frozenset({"kernel-merging"}),
    "kernel-merging": frozenset({"passthrough"}),
    "merging": frozenset({"copied"}),
    "copied": frozenset({"passthrough"}),
    "committing": frozenset({"passthrough"}),
    "passthrough": frozenset({"starting"}),
}

MODES = ("offline", "online")
STORE_TYPES = ("P", "PO")


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise UsageError(
            f"invalid name {name!r}: use 1-64 letters, digits, '_', '.', '+' or '-', "
            "starting with a letter or digit"
        )
    if name.endswith(_RESERVED_SUFFIXES):
        raise UsageError(
            f"invalid name {name!r}: names ending in -snap, -cow or -real are used for "
            "fiesnap's own devices; choose another name"
        )
    return name


def check_boot_attempts(attempts: int) -> int:
    if not is_int(attempts) or not 1 <= attempts <= MAX_BOOT_ATTEMPTS:
        raise UsageError(f"--boot-attempts must be a whole number from 1 to {MAX_BOOT_ATTEMPTS}, "
                         f"not {attempts!r}")
    return attempts


def store_map(extents: Iterable[Extent], chunk_bytes: int, seeded_areas: int = 0) -> CowTable:
    """The store's chunks: whole chunks of the file, never the identity block; with
    seeded areas, laid out as a free-aware store (model/seeding.py)."""
    runs = whole_chunks(without_head(extents, IDENTITY_BYTES), chunk_bytes)
    have = sum(r.count for r in runs)
    need = MIN_STORE_CHUNKS + (seeded_areas + 1 if seeded_areas else 0)
    if have < need:
        raise FilesystemError(
            f"the store file has only {have} whole {chunk_bytes}-byte chunks, {need} are needed: "
            + ("choose a larger --size (a free-aware store keeps one chunk per seeded area)" if seeded_areas
               else "the filesystem is too fragmented; choose a larger --size or a smaller --chunk-size")
        )
    if seeded_areas:
        return seeded_cow_table(runs, SeedLayout(chunk_bytes, seeded_areas))
    return CowTable.from_runs(runs, chunk_bytes)


@dataclass(frozen=True)
class PreviousIdentity:
    """The identity block an interrupted `extend` may have left on disk: the
    map it names is a prefix of the recorded one, so activate accepts it."""

    generation: int
    map_sha256: str


@dataclass(frozen=True)
class CheckpointRecord:
    """Everything needed to rebuild, inspect, commit or merge a checkpoint.

    A name put under fiesnap with `setup` (`managed`) keeps its record between
    checkpoints in phase "passthrough"; the checkpoint fields are then empty
    (`cow_table` is None).
    """

    name: str
    device: str
    device_major: int
    device_minor: int
    device_bytes: int
    fstype: str
    fs_uuid: str
    phase: str = "starting"
    #: set up with `fiesnap setup`: /dev/mapper/NAME outlives each checkpoint.
    managed: bool = False
    #: id of the `setup` that made /dev/mapper/NAME (its dm UUID); "" if not managed.
    setup_id: str = ""
    checkpoint_id: str = ""
    chunk_bytes: int = 0
    store_type: str = ""
    store_relpath: str = ""
    store_file_bytes: int = 0
    store_extents: tuple[Extent, ...] = ()
    cow_table: CowTable | None = None
    #: checkpoint-time free space of the filesystem, (start, length) in bytes.
    free_map: tuple[tuple[int, int], ...] = ()
    created: str = ""
    #: device byte offset of the store file's identity block (-1: none written).
    identity_offset: int = -1
    #: bumped whenever the store map changes; also in the identity block.
    generation: int = 1
    previous_identity: PreviousIdentity | None = None
    #: how the checkpoint was taken: "offline" (device unmounted) or "online" (frozen).
    mode: str = "offline"
    #: how long an online start kept the filesystem frozen.
    frozen_seconds: float | None = None
    #: the raw device's superblock as `deactivate` left it (model/seal.py).
    seal: SuperblockStamp | None = None
    #: the boot (kernel boot id) and time (epoch seconds) the stack was last built in.
    built_boot: str = ""
    built_at: int = 0
    #: why a rollback can no longer be exact (writes that bypassed the origin); "" if none seen.
    bypass: str = ""
    #: free-aware store (model/seeding.py): seeded metadata areas reserved (0: a plain
    #: store), and how many seeded exceptions the checkpoint-time free map gave.
    seeded_areas: int = 0
    seeded_chunks: int = 0
    #: the free map the seeded table was prepared from, when it is not `free_map` (an online
    #: start prepares it before the freeze and corrects it for the checkpoint-time map).
    seed_map: tuple[tuple[int, int], ...] = ()
    #: an update checkpoint (model/lifecycle.py): boots of the new system it allows (0: not
    #: one), how many activate has counted, the boot that counted the last one, and why
    #: activate started rolling it back ("" unless it did).
    boot_attempts: int = 0
    attempts_used: int = 0
    attempt_boot: str = ""
    auto_rollback: str = ""
    #: an instant rollback (model/kernel_merge.py): the exceptions handed to the kernel's merge.
    merge_entries: int = 0

    # -- queries -----------------------------------------------------------

    @property
    def has_checkpoint(self) -> bool:
        return self.phase != "passthrough" and bool(self.checkpoint_id)

    @property
    def device_string(self) -> str:
        return f"{self.device_major}:{self.device_minor}"

    @property
    def cow(self) -> CowTable:
        """The store map; only a record with a checkpoint has one."""
        if self.cow_table is None:
            raise StateError(f"checkpoint record {self.name!r} has no store map: it holds no checkpoint")
        return self.cow_table

    @property
    def store_bytes(self) -> int:
        """What the store occupies on disk: its backed chunks (a free-aware store's
        COW address space is larger, and mostly holes)."""
        return self.cow.backed_chunks * self.chunk_bytes

    @property
    def free_aware(self) -> bool:
        return self.seeded_areas > 0

    @property
    def seed_layout(self) -> SeedLayout | None:
        return SeedLayout(self.chunk_bytes, self.seeded_areas) if self.seeded_areas else None

    @property
    def origin_chunks(self) -> int:
        """Chunks the kernel can address on the origin (a partial last chunk counts)."""
        return -(-self.device_bytes // self.chunk_bytes)

    def expected_identity(self) -> StoreIdentity:
        """What the store's identity block must say for this record."""
        return StoreIdentity(
            checkpoint_id=self.checkpoint_id, fs_uuid=self.fs_uuid,
            device_bytes=self.device_bytes, chunk_bytes=self.chunk_bytes,
            map_sha256=map_checksum(self.cow.to_dict()), generation=self.generation)

    # -- state changes (each returns a new record) -------------------------

    def with_phase(self, phase: str) -> CheckpointRecord:
        if phase == self.phase:
            return self
        if phase not in TRANSITIONS.get(self.phase, ()):
            raise StateError(
                f"internal error: checkpoint {self.name!r} cannot go from {self.phase} to {phase}"
            )
        return replace(self, phase=phase)

    def as_passthrough(self) -> CheckpointRecord:
        """The same device under fiesnap with no checkpoint (after commit or merge)."""
        self.with_phase("passthrough")  # checks the step
        return CheckpointRecord(
            name=self.name, device=self.device, device_major=self.device_major,
            device_minor=self.device_minor, device_bytes=self.device_bytes,
            fstype=self.fstype, fs_uuid=self.fs_uuid, phase="passthrough",
            managed=self.managed, setup_id=self.setup_id,
        )

    def with_checkpoint(self, *, checkpoint_id: str, store_type: str, chunk_bytes: int,
                        store_relpath: str, store_file_bytes: int, extents: Iterable[Extent],
                        created: str, mode: str,
                        free_map: Iterable[tuple[int, int]] = (),
                        seeded_areas: int = 0) -> CheckpointRecord:
        """A new checkpoint's record in phase "starting"; its map is what the identity block hashes."""
        extents = tuple(extents)
        cow = store_map(extents, chunk_bytes, seeded_areas)
        identity_offset = head_location(extents, IDENTITY_BYTES)
        first = identity_offset // chunk_bytes
        last = (identity_offset + IDENTITY_BYTES - 1) // chunk_bytes
        if cow.store_chunks().overlaps(first, last - first + 1):
            raise FilesystemError("internal check failed: the identity block lies inside the mapped store; retry")
        base = self if self.phase == "starting" else self.with_phase("starting")
        return replace(
            base, checkpoint_id=checkpoint_id, chunk_bytes=chunk_bytes, store_type=store_type,
            store_relpath=store_relpath, store_file_bytes=store_file_bytes, store_extents=extents,
            cow_table=cow, free_map=tuple((s, n) for s, n in free_map), created=created,
            identity_offset=identity_offset, generation=1, previous_identity=None, mode=mode,
            frozen_seconds=None, seal=None, built_boot="", built_at=0, bypass="",
            seeded_areas=seeded_areas, seeded_chunks=0, seed_map=(),
            boot_attempts=0, attempts_used=0, attempt_boot="", auto_rollback="")

    def with_boot_attempts(self, attempts: int) -> CheckpointRecord:
        """An update checkpoint: activate counts each boot and rolls back after `attempts`."""
        check_boot_attempts(attempts)
        return replace(self, boot_attempts=attempts, attempts_used=0, attempt_boot="", auto_rollback="")

    def attempt_counted(self, boot_id: str) -> CheckpointRecord:
        """This boot is one more attempt of the new system."""
        if self.attempts_used >= self.boot_attempts:
            raise StateError(f"internal error: checkpoint {self.name!r} has no boot attempt left to count")
        return replace(self, attempts_used=self.attempts_used + 1, attempt_boot=boot_id)

    def handed_over(self, entries: int) -> CheckpointRecord:
        """An instant rollback begins: the stack is down, `entries` exceptions go to the kernel."""
        return replace(self.with_phase("handover"), merge_entries=entries)

    def rolling_back(self, why: str) -> CheckpointRecord:
        """activate decided to roll back by itself: an interrupted rollback is finished at the next boot."""
        return replace(self, auto_rollback=why)

    def with_free_map(self, free_map: Iterable[tuple[int, int]], *,
                      frozen_seconds: float | None = None, seeded_chunks: int = 0,
                      seed_map: Iterable[tuple[int, int]] = ()) -> CheckpointRecord:
        return replace(self, free_map=tuple((s, n) for s, n in free_map),
                       frozen_seconds=frozen_seconds, seeded_chunks=seeded_chunks,
                       seed_map=tuple((s, n) for s, n in seed_map))

    def relocated(self, device: str, major: int, minor: int) -> CheckpointRecord:
        """The same device found under another name or number after a reboot."""
        return replace(self, device=device, device_major=major, device_minor=minor)

    def with_store_file(self, file_bytes: int, extents: Iterable[Extent]) -> CheckpointRecord:
        """The store file grew; its map did not (yet)."""
        return replace(self, store_file_bytes=file_bytes, store_extents=tuple(extents))

    def grown(self, cow: CowTable) -> CheckpointRecord:
        """A longer store map: generation + 1, and the identity on disk now
        (the old map's) stays acceptable until the block is rewritten."""
        before = self.expected_identity()
        return replace(self, cow_table=cow, generation=self.generation + 1,
                       previous_identity=PreviousIdentity(before.generation, before.map_sha256))

    def identity_rewritten(self) -> CheckpointRecord:
        return replace(self, previous_identity=None)

    def built(self, boot_id: str, at: int) -> CheckpointRecord:
        """The stack is up (start, activate): the device is reachable only through it, so
        a seal taken before means nothing now."""
        return replace(self, seal=None, built_boot=boot_id, built_at=at)

    def sealed(self, stamp: SuperblockStamp) -> CheckpointRecord:
        """The stack went down (deactivate): the superblock as the origin left it."""
        return replace(self, seal=stamp)

    def bypassed(self, why: str) -> CheckpointRecord:
        """Writes reached the device without exceptions: merge must refuse from now on."""
        return replace(self, bypass=why)

    # -- persistence -------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        notes: dict[str, Any] = {}
        if self.previous_identity is not None:
            notes["previous_identity"] = {"generation": self.previous_identity.generation,
                                          "map_sha256": self.previous_identity.map_sha256}
        if self.frozen_seconds is not None:
            notes["frozen_seconds"] = self.frozen_seconds
        if self.seal is not None:
            notes["seal"] = self.seal.to_dict()
        if self.built_boot:
            notes["built"] = {"boot_id": self.built_boot, "at": self.built_at}
        if self.bypass:
            notes["bypass"] = self.bypass
        return {
            "version": RECORD_VERSION,
            "name": self.name, "device": self.device, "device_major": self.device_major,
            "device_minor": self.device_minor, "device_bytes": self.device_bytes,
            "fstype": self.fstype, "fs_uuid": self.fs_uuid, "phase": self.phase,
            "managed": self.managed, "setup_id": self.setup_id,
            "checkpoint_id": self.checkpoint_id, "chunk_bytes": self.chunk_bytes,
            "store_type": self.store_type, "store_relpath": self.store_relpath,
            "store_file_bytes": self.store_file_bytes,
            "store_extents": [[e.logical, e.physical, e.length, e.flags] for e in self.store_extents],
            "cow_table": self.cow_table.to_dict() if self.cow_table is not None else {},
            "free_map": [[s, n] for s, n in self.free_map],
            "created": self.created, "identity_offset": self.identity_offset,
            "generation": self.generation, "mode": self.mode, "notes": notes,
            "seeded_areas": self.seeded_areas, "seeded_chunks": self.seeded_chunks,
            "seed_map": [[s, n] for s, n in self.seed_map],
            "boot_attempts": self.boot_attempts, "boot_attempts_used": self.attempts_used,
            "attempt_boot": self.attempt_boot, "auto_rollback": self.auto_rollback,
            "merge_entries": self.merge_entries,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: object, where: str = "checkpoint record") -> CheckpointRecord:
        """Parse and check a record read from disk; StateError names the first bad field."""
        return _Parser(data, where).record()


class _Parser:
    """One pass over a record's JSON: every field checked, unknown fields ignored."""

    def __init__(self, data: object, where: str) -> None:
        if not isinstance(data, Mapping):
            raise StateError(f"{where} is not a JSON object: remove or restore it")
        self.data, self.where = data, where

    def bad(self, key: str, why: str) -> StateError:
        return StateError(f"{self.where}: field {key!r} {why}: the record is damaged; "
                          "restore it from a backup or remove it")

    def get(self, key: str, default: Any = ...) -> Any:
        if key in self.data:
            return self.data[key]
        if default is ...:
            raise self.bad(key, "is missing")
        return default

    def int_(self, key: str, default: Any = ..., lo: int = 0) -> int:
        v = self.get(key, default)
        if not is_int(v) or v < lo:
            raise self.bad(key, f"must be an integer >= {lo}, not {v!r}")
        return v

    def str_(self, key: str, default: Any = ..., pattern: re.Pattern | None = None,
             choices: tuple[str, ...] | None = None) -> str:
        v = self.get(key, default)
        if not isinstance(v, str):
            raise self.bad(key, f"must be a string, not {type(v).__name__}")
        if pattern is not None and v and not pattern.match(v):
            raise self.bad(key, f"has an invalid value {v!r}")
        if choices is not None and v not in choices:
            raise self.bad(key, f"must be one of {', '.join(choices)}, not {v!r}")
        return v

    def int_list(self, key: str, width: int) -> list[tuple[int, ...]]:
        v = self.get(key, [])
        if not isinstance(v, list):
            raise self.bad(key, "must be a list")
        out = []
        for item in v:
            if not (isinstance(item, list) and len(item) == width
                    and all(is_int(x) and x >= 0 for x in item)):
                raise self.bad(key, f"holds {item!r}, not {width} integers >= 0")
            out.append(tuple(item))
        return out

    def record(self) -> CheckpointRecord:
        version = self.get("version", None)
        if version != RECORD_VERSION:
            raise StateError(
                f"{self.where} has version {version}, this fiesnap reads version "
                f"{RECORD_VERSION}: use the fiesnap that wrote it"
            )
        name = self.str_("name")
        try:
            validate_name(name)
        except UsageError:
            raise self.bad("name", f"is not a valid name ({name!r})") from None
        device = self.str_("device")
        if not device.startswith("/"):
            raise self.bad("device", f"must be an absolute path, not {device!r}")
        managed = self.get("managed", False)
        if not isinstance(managed, bool):
            raise self.bad("managed", "must be true or false")
        phase = self.str_("phase", "starting", choices=PHASES)
        chunk_bytes = self.int_("chunk_bytes", 0)
        cow_raw = self.get("cow_table", {})
        cow = None
        if cow_raw:
            if not isinstance(cow_raw, Mapping):
                raise self.bad("cow_table", "must be an object")
            cow = CowTable.from_dict(cow_raw)  # StateError on anything malformed
            if cow.chunk_bytes != chunk_bytes:
                raise self.bad("cow_table", f"has chunk size {cow.chunk_bytes}, the record {chunk_bytes}")
        checkpoint_id = self.str_("checkpoint_id", "", pattern=_HEX32)
        if phase != "passthrough" and checkpoint_id and cow is None:
            raise self.bad("cow_table", f"is missing for a checkpoint in phase {phase}")
        frozen = None
        notes = self.get("notes", {})
        if not isinstance(notes, Mapping):
            raise self.bad("notes", "must be an object")
        previous = None
        if "previous_identity" in notes:
            p = notes["previous_identity"]
            if not (isinstance(p, Mapping) and is_int(p.get("generation")) and p["generation"] >= 1
                    and isinstance(p.get("map_sha256"), str) and _HEX64.match(p["map_sha256"])):
                raise self.bad("notes", f"has an invalid previous identity {p!r}")
            previous = PreviousIdentity(p["generation"], p["map_sha256"])
        if "frozen_seconds" in notes:
            f = notes["frozen_seconds"]
            if not isinstance(f, (int, float)) or isinstance(f, bool) or f < 0:
                raise self.bad("notes", f"has an invalid frozen_seconds {f!r}")
            frozen = float(f)
        seal = None
        if "seal" in notes:
            try:
                seal = SuperblockStamp.from_dict(notes["seal"])
            except ValueError as e:
                raise self.bad("notes", f"has a seal that {e}") from None
        built_boot, built_at = "", 0
        if "built" in notes:
            b = notes["built"]
            if not (isinstance(b, Mapping) and isinstance(b.get("boot_id"), str)
                    and _BOOT_ID.match(b["boot_id"]) and is_int(b.get("at")) and b["at"] >= 0):
                raise self.bad("notes", f"has an invalid 'built' {b!r}")
            built_boot, built_at = b["boot_id"], b["at"]
        bypass = notes.get("bypass", "")
        if not isinstance(bypass, str):
            raise self.bad("notes", "has a 'bypass' that is not a string")
        seeded_areas = self.int_("seeded_areas", 0)
        seeded_chunks = self.int_("seeded_chunks", 0)
        if seeded_areas:
            if cow is None:
                raise self.bad("seeded_areas", "is set for a record with no store map")
            try:
                layout = SeedLayout(chunk_bytes, seeded_areas)
                layout.check_table(cow)
            except ValueError as e:
                raise self.bad("cow_table", f"does not fit its {seeded_areas} seeded areas ({e})") from None
            if seeded_chunks > layout.capacity:
                raise self.bad("seeded_chunks", f"exceeds what {seeded_areas} areas hold")
        seed_map = tuple((s, n) for s, n in self.int_list("seed_map", 2))
        if seed_map and not seeded_areas:
            raise self.bad("seed_map", "is set for a plain store")
        if not seeded_areas:
            if seeded_chunks:
                raise self.bad("seeded_chunks", "is set for a plain store")
            if cow is not None and cow.backed_chunks != cow.total_chunks:
                raise self.bad("cow_table", "has unbacked stretches, which only a free-aware store has")
        boot_attempts = self.int_("boot_attempts", 0)
        attempts_used = self.int_("boot_attempts_used", 0)
        attempt_boot = self.str_("attempt_boot", "", pattern=_BOOT_ID)
        auto_rollback = self.str_("auto_rollback", "")
        if boot_attempts > MAX_BOOT_ATTEMPTS:
            raise self.bad("boot_attempts", f"exceeds {MAX_BOOT_ATTEMPTS}")
        if attempts_used > boot_attempts:
            raise self.bad("boot_attempts_used", f"is {attempts_used}, more than the {boot_attempts} allowed")
        if boot_attempts and (not managed or not checkpoint_id):
            raise self.bad("boot_attempts", "is set for a record that is not a checkpoint of a device under fiesnap")
        if (attempt_boot or auto_rollback) and not boot_attempts:
            raise self.bad("attempt_boot" if attempt_boot else "auto_rollback",
                           "is set for a checkpoint that counts no boot attempts")
        if auto_rollback and phase not in ("active", "merging", "copied"):
            raise self.bad("auto_rollback", f"is set in phase {phase}")
        merge_entries = self.int_("merge_entries", 0)
        if merge_entries and phase not in ("handover", "kernel-merging"):
            raise self.bad("merge_entries", f"is set in phase {phase}")
        generation = self.int_("generation", 1, lo=1)
        if phase in ("handover", "kernel-merging") and (cow is None or generation != 1):
            raise self.bad("phase", f"is {phase} for a checkpoint whose store was never handed over "
                           "(no store map, or a grown one)")
        return CheckpointRecord(
            name=name, device=device,
            device_major=self.int_("device_major"), device_minor=self.int_("device_minor"),
            device_bytes=self.int_("device_bytes", lo=1),
            fstype=self.str_("fstype"), fs_uuid=self.str_("fs_uuid"),
            phase=phase, managed=managed,
            setup_id=self.str_("setup_id", "", pattern=_HEX32),
            checkpoint_id=checkpoint_id, chunk_bytes=chunk_bytes,
            store_type=self.str_("store_type", "", choices=("",) + STORE_TYPES),
            store_relpath=self.str_("store_relpath", ""),
            store_file_bytes=self.int_("store_file_bytes", 0),
            store_extents=tuple(Extent(*e) for e in self.int_list("store_extents", 4)),
            cow_table=cow,
            free_map=tuple((s, n) for s, n in self.int_list("free_map", 2)),
            created=self.str_("created", ""),
            identity_offset=self.int_("identity_offset", -1, lo=-1),
            generation=generation,
            previous_identity=previous,
            mode=self.str_("mode", "offline", choices=MODES),
            frozen_seconds=frozen, seal=seal, built_boot=built_boot, built_at=built_at, bypass=bypass,
            seeded_areas=seeded_areas, seeded_chunks=seeded_chunks, seed_map=seed_map,
            boot_attempts=boot_attempts, attempts_used=attempts_used, attempt_boot=attempt_boot,
            auto_rollback=auto_rollback, merge_entries=merge_entries,
        )
