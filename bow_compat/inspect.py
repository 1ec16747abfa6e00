"""Show a device's dm-bow log without changing it: every log sector of the chain, every entry,
and whether its checksum verifies. Uses the same read-only walk as restore, so what inspect calls
valid is exactly what restore accepts."""

from __future__ import annotations

from bow_compat.format import capacity
from bow_compat.image import Image
from bow_compat.restore import Scan, ScannedLog, scan


def describe(image: Image) -> dict:
    """JSON-ready description; never raises for a corrupt log (it reports it in "error")."""
    s: Scan = scan(image, stop_at_first_error=False)
    logs = [_log(sl) for sl in s.logs]
    statuses = [e["checksum_status"] for log in logs for e in log["entries"]]
    return {
        "image_bytes": s.image_bytes,
        "state": s.state,
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
    if d["state"] == "none":
        return f"no dm-bow log: {d['error']}\n"
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
    lines.append("restorable" if d["valid"] else f"NOT restorable: {d['error']}")
    return "\n".join(lines) + "\n"
