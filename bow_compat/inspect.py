"""Show a device's dm-bow log without changing it: every log sector of the chain, every entry,
and whether its checksum verifies. Uses the same read-only walk as restore, so what inspect calls
valid is exactly what restore accepts."""

from __future__ import annotations

from bow_compat.errors import BowError
from bow_compat.format import HEADER_SIZE, capacity, peek_magic
from bow_compat.image import Image
from bow_compat.restore import Scan, ScannedLog, scan


def describe(image: Image) -> dict:
    """JSON-ready description; never raises for a corrupt log (it reports it in "error")."""
    return examine(image)[0]


def examine(image: Image) -> tuple[dict, BowError | None]:
    """The description, and the error restore would refuse IMAGE with (no log: BowStateError,
    exit 7; corrupt: BowFormatError, exit 8) or None; the CLI raises it after printing."""
    s: Scan = scan(image, stop_at_first_error=False)
    return _describe(image, s), s.error


def _describe(image: Image, s: Scan) -> dict:
    magic = peek_magic(image.read(0, min(image.size, HEADER_SIZE)))
    logs = [_log(sl) for sl in s.logs]
    statuses = [e["checksum_status"] for log in logs for e in log["entries"]]
    return {
        "image_bytes": s.image_bytes,
        "state": s.state,
        "block0_magic": None if magic is None else f"0x{magic:08x}",
        "block_size": s.block_size,
        "valid": s.error is None,
        "error": None if s.error is None else str(s.error),
        "error_kind": None if s.error is None else type(s.error).__name__,
        "log_sectors": logs,
        "entries": sum(log["count"] for log in logs),
        "bytes_to_copy": sum(e["size"] for log in logs for e in log["entries"]),
        "checksums": {k: statuses.count(k) for k in ("ok", "bad", "unchecked", "not reached")},
    }


def _log(sl: ScannedLog) -> dict:
    log = sl.log
    entries = []
    for i, e in enumerate(log.entries):
        check = sl.checks.get(i)
        status = ("not reached" if check is None else "unchecked" if check.ok is None
                  else "ok" if check.ok else "bad")
        entries.append({"index": i, "source": e.source, "dest": e.dest, "size": e.size,
                        "checksum": e.checksum, "checksum_status": status,
                        "computed": None if check is None else check.computed})
    return {
        "sequence": log.sequence, "state": log.state, "magic": f"0x{log.magic:08x}",
        "header_version": f"0x{log.header_version:04x}", "header_size": log.header_size,
        "block_size": log.block_size, "count": log.count,
        "capacity": capacity(log.block_size, log.header_size), "sector0": log.sector0,
        "read_from_sector": sl.read_from, "entries": entries,
    }


def render_text(d: dict) -> str:
    """The description for a terminal: one line per log sector and per entry."""
    if d["state"] == "none":  # the error itself (and what to do) is the command's error line
        return (f"state none, image {d['image_bytes']} bytes: no dm-bow log in block 0 "
                f"({'magic ' + d['block0_magic'] if d['block0_magic'] else 'too small'})\n")
    lines = [f"state {d['state']}, block size {d['block_size']}, image {d['image_bytes']} bytes"]
    for log in d["log_sectors"]:
        where = "block 0" if log["read_from_sector"] == 0 else \
            f"saved at sector {log['read_from_sector']}"
        lines.append(f"log sector {log['sequence']} ({where}): {log['state']} {log['magic']}, "
                     f"version {log['header_version']}, header {log['header_size']} B, "
                     f"{log['count']}/{log['capacity']} entries, sector0 {log['sector0']}")
        for e in log["entries"]:
            lines.append(f"  #{e['index']:<3} sector {e['source']} <- {e['dest']}  "
                         f"{e['size']} B  crc 0x{e['checksum']:08x} {e['checksum_status']}")
    c = d["checksums"]
    lines.append(f"{d['entries']} entries, {d['bytes_to_copy']} bytes to copy back; checksums: "
                 f"{c['ok']} ok, {c['bad']} bad, {c['unchecked']} unchecked, "
                 f"{c['not reached']} not reached")
    lines.append("restorable" if d["valid"] else "NOT restorable (the error says why)")
    return "\n".join(lines) + "\n"
