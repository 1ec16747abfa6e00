"""Command-line interface. Thin: parse, call a command module, print; errors become one line + exit code."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from fiesnap import __version__
from fiesnap.clirun import run_app, say
from fiesnap.commands import activate as activate_cmd
from fiesnap.commands import commit as commit_cmd
from fiesnap.commands import extend as extend_cmd
from fiesnap.commands import merge as merge_cmd
from fiesnap.commands import setup as setup_cmd
from fiesnap.commands import start as start_cmd
from fiesnap.commands import status as status_cmd
from fiesnap.commands.guards import DEFAULT_FREE_AWARE
from fiesnap.commands.instant import InstantResult
from fiesnap.commands.monitor import run_monitor
from fiesnap.errors import FiesnapError, RefusedError, UsageError
from fiesnap.model.monitor_policy import MonitorPolicy, parse_step
from fiesnap.model.units import format_bytes, parse_size
from fiesnap.services.statedir import StateStore

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "Rollback checkpoints for a plain ext4 or XFS filesystem, on the kernel's stock "
        "dm-snapshot, with the COW store kept in a preallocated file on the filesystem itself."
    ),
)
err = Console(stderr=True, highlight=False)
# Piped output (scripts, logs) must not be squeezed to 80 columns.
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def _dm_factory():
    from fiesnap.kernel.dm import DeviceMapper

    return DeviceMapper()


_say = say


def _log(msg: str) -> None:
    _say(f"fiesnap: {msg}")


def _emit_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


class _RichProgress:
    def __init__(self, total: int) -> None:
        self._p = Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=err, transient=False,
        )
        self._p.start()
        self._task = self._p.add_task("merging", total=total)

    def advance(self, n: int) -> None:
        self._p.advance(self._task, n)

    def close(self) -> None:
        self._p.stop()


def _size(text: str, what: str) -> int:
    try:
        return parse_size(text)
    except UsageError as e:
        raise UsageError(f"{what}: {e}") from None


@app.command()
def setup(
    device: str = typer.Argument(..., help="Unmounted block device holding ext4 or XFS."),
    name: str = typer.Option(..., "--name", "-n", help="Name of the device to mount: /dev/mapper/NAME."),
    as_json: bool = typer.Option(False, "--json", help="Print the new record as JSON on stdout."),
) -> None:
    """Put DEVICE under fiesnap: /dev/mapper/NAME becomes a pass-through of it; mount that.

    Mounting through NAME from then on (fstab: /dev/mapper/NAME, not UUID=) is what lets
    'fiesnap start NAME' checkpoint the filesystem while it stays mounted.
    """
    record = setup_cmd.setup(device, name, _dm_factory, StateStore(), _log)
    if as_json:
        _emit_json(status_cmd.status(_dm_factory, StateStore(), record.name)[0].to_dict())
    else:
        out.print(f"{device} is now /dev/mapper/{record.name}: mount that", markup=False)


@app.command()
def start(
    target: str = typer.Argument(
        ..., metavar="NAME|MOUNTPOINT|DEVICE",
        help="A device under fiesnap (its NAME or mount point; may be mounted and busy), "
             "or an unmounted block device holding ext4 or XFS."),
    size: str = typer.Option(..., "--size", "-s", help="Store size: 64M, 2G, 1.5GiB or bytes."),
    name: Optional[str] = typer.Option(None, "--name", "-n",
                                       help="Checkpoint name for a DEVICE (default: its basename)."),
    chunk_size: str = typer.Option("4K", "--chunk-size", help="dm-snapshot chunk size, a power of two from 4K to 512K."),
    free_aware: bool = typer.Option(
        DEFAULT_FREE_AWARE, "--free-aware/--plain",
        help="Free-aware store: writes into space that was free at the checkpoint copy nothing "
             "(docs/design.md). --plain: every first write of a chunk is copied."),
    boot_attempts: Optional[int] = typer.Option(
        None, "--boot-attempts", metavar="N",
        help="An update checkpoint: each boot's 'fiesnap activate' counts one attempt; once N "
             "boots passed without a commit, activate rolls it back (docs/boot.md). NAME only."),
    unless_active: bool = typer.Option(
        False, "--unless-active",
        help="If NAME holds a checkpoint already, leave it and exit 0 (for update hooks)."),
    as_json: bool = typer.Option(False, "--json", help="Print the new checkpoint as JSON on stdout."),
) -> None:
    """Take a checkpoint: of NAME online (mounted and busy), or of an unmounted DEVICE.

    Of NAME (set up with 'fiesnap setup'): online, the filesystem may stay mounted and busy; it
    is frozen for a moment while /dev/mapper/NAME switches to snapshot-origin.
    Of an unmounted DEVICE: builds /dev/mapper/NAME (mount that), NAME-snap and NAME-cow.
    """
    req = start_cmd.StartRequest(target=target, size=_size(size, "--size"), name=name,
                                 chunk_bytes=_size(chunk_size, "--chunk-size"), free_aware=free_aware,
                                 boot_attempts=boot_attempts, unless_active=unless_active)
    record, started = start_cmd.start_unless_active(req, _dm_factory, StateStore(), _log)
    if as_json:
        _emit_json({**status_cmd.status(_dm_factory, StateStore(), record.name)[0].to_dict(),
                    "started": started})
    elif started:
        out.print(f"checkpoint {record.name} started: the filesystem is on /dev/mapper/{record.name}",
                  markup=False)
    else:
        out.print(f"{record.name} holds a checkpoint already ({record.phase}): none started", markup=False)


@app.command()
def extend(
    name: str = typer.Argument(..., help="Checkpoint whose store to grow (mounted or not)."),
    by: Optional[str] = typer.Option(None, "--by", help="Grow the store file by SIZE (64M, 1G, ...)."),
    to: Optional[str] = typer.Option(None, "--to", help="Grow the store file to SIZE."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Grow a live checkpoint's store online, using only chunks that were free at the checkpoint.

    Chunks that were in use at the checkpoint (freed since, and handed to the store file) or that
    have an exception stay allocated but unmapped: writing store data there would destroy
    checkpoint data. Only NAME-cow is reloaded; no I/O is lost. The store's growth is what it
    maps; when none of the new chunks is safe it does not grow: exit 7 (the result is still
    printed with --json).
    """
    result = extend_cmd.extend(name, _dm_factory, StateStore(), _log,
                               by=_size(by, "--by") if by is not None else None,
                               to=_size(to, "--to") if to is not None else None)
    if as_json:
        _emit_json(result.to_dict())
    if result.mapped_bytes <= 0:
        raise RefusedError(f"{result.nothing_mapped()}: commit or merge before it fills")
    if not as_json:
        out.print(f"{name}: store {format_bytes(result.store_bytes_before)} -> "
                  f"{format_bytes(result.store_bytes_after)} (+{format_bytes(result.mapped_bytes)} mapped; "
                  f"store file {format_bytes(result.file_bytes_before)} -> {format_bytes(result.file_bytes_after)}, "
                  f"{result.plan.skipped_chunks} unsafe chunks skipped)", markup=False)


@app.command()
def monitor(
    name: Optional[str] = typer.Argument(None, help="One checkpoint."),
    all_: bool = typer.Option(False, "--all", help="Every active checkpoint (what the monitor unit runs)."),
    threshold: float = typer.Option(50.0, "--threshold", help="Grow when the store is this % used."),
    step: str = typer.Option("100%", "--step", help="How much to grow: SIZE (64M) or PCT of the store (50%)."),
    max_size: Optional[str] = typer.Option(None, "--max", help="Never grow the store past SIZE."),
    interval: float = typer.Option(2.0, "--interval", help="Seconds between polls."),
    once: bool = typer.Option(False, "--once", help="One round, then exit (1 if a checkpoint is lost or its store cannot grow safely)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every decision."),
) -> None:
    """Watch store usage and grow stores before they fill (foreground; see fiesnap-monitor.service).

    Polls (the kernel raises no event for usage growth), grows by --step or by what the measured
    write rate needs, warns at 80/90/95% and says loudly when the filesystem has no room left, or
    when an extension mapped nothing (its new blocks were unsafe): then it backs off.
    """
    if bool(name) == all_:
        raise UsageError("give exactly one of NAME or --all")
    step_bytes, step_pct = parse_step(step)
    policy = MonitorPolicy(threshold_pct=threshold, step_bytes=step_bytes, step_pct=step_pct,
                           max_bytes=_size(max_size, "--max") if max_size else None, interval_s=interval)
    raise typer.Exit(run_monitor(name, policy, _dm_factory, StateStore(), _say, verbose=verbose, once=once))


@app.command()
def activate(
    name: Optional[str] = typer.Argument(None, help="One recorded name."),
    all_: bool = typer.Option(False, "--all", help="Every recorded name (what the boot unit runs)."),
    wait: float = typer.Option(0.0, "--wait", help="Seconds to keep looking for devices that are still appearing."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """After boot: rebuild /dev/mapper/NAME, and a checkpoint's whole stack over its existing store.

    The store's identity block (checkpoint id, filesystem UUID, device size, map checksum) must
    match the record before anything is mapped; the store is never zeroed here.
    """
    if bool(name) == all_:
        raise UsageError("give exactly one of NAME or --all")
    results = activate_cmd.activate(name, _dm_factory, StateStore(), _log, wait_seconds=wait)
    if as_json:
        _emit_json({"activated": [r.to_dict() for r in results]})
    else:
        for r in results:
            out.print(f"{r.name}: {r.result}" + (f" ({r.detail})" if r.detail else ""), markup=False)


@app.command()
def deactivate(
    name: Optional[str] = typer.Argument(None, help="Recorded name to take down."),
    all_: bool = typer.Option(False, "--all", help="Every recorded name (what the boot unit runs at shutdown)."),
    as_json: bool = typer.Option(False, "--json", help="Print the removed devices as JSON on stdout."),
) -> None:
    """Take devices down without ending anything ('fiesnap activate NAME' brings them back).

    A checkpoint taken down is sealed: activate and merge then notice a device written
    without the stack in between (mounted directly, say), and merge refuses.
    """
    if bool(name) == all_:
        raise UsageError("give exactly one of NAME or --all")
    removed = activate_cmd.deactivate(name, _dm_factory, StateStore(), _log)
    if as_json:
        _emit_json({"name": name, "removed": removed[name]} if name else
                   {"deactivated": [{"name": n, "removed": r} for n, r in removed.items()]})
    else:
        for n, r in removed.items():
            out.print(f"{n}: removed {', '.join(r) or 'nothing (not active)'}", markup=False)


@app.command()
def release(
    name: str = typer.Argument(..., help="A device put under fiesnap with 'fiesnap setup'."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Undo setup: remove the pass-through /dev/mapper/NAME and its record (no checkpoint, unmounted)."""
    record = setup_cmd.release(name, _dm_factory, StateStore(), _log)
    if as_json:
        _emit_json({"name": name, "device": record.device, "result": "released"})
    else:
        out.print(f"{name} released: mount {record.device} directly", markup=False)


@app.command()
def status(
    name: Optional[str] = typer.Argument(None, help="One checkpoint (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Stable machine output on stdout; byte figures are integers."),
) -> None:
    """Show checkpoints: state, store size and usage, chunk size, extents, device, start time."""
    rows = [s.to_dict() for s in status_cmd.status(_dm_factory, StateStore(), name)]
    if as_json:
        _emit_json({"checkpoints": rows})
        return
    if not rows:
        out.print("no checkpoints")
        return
    table = Table(title=None)
    for col in ("name", "state", "device", "store", "used", "meta", "use%", "chunk", "extents", "started", "mounted"):
        table.add_column(col)
    for r in rows:
        def b(v):
            return "-" if v is None else format_bytes(v)
        table.add_row(
            r["name"], r["state"], r["device"], b(r["store_bytes"]), b(r["used_bytes"]),
            b(r["metadata_bytes"]), "-" if r["percent_used"] is None else f"{r['percent_used']:.1f}",
            b(r["chunk_bytes"]), str(r["extents"] or "-"), r["start_time"] or "-",
            ", ".join(r["mounted_on"]) or "-",
        )
    out.print(table)
    for r in rows:
        a = r["boot_attempts"]
        if a:
            out.print(f"{r['name']}: update checkpoint, boot attempts {a['used']} of {a['allowed']} used, "
                      f"{a['left']} left" + ("; this boot is one: 'fiesnap commit' (or boot-complete) keeps it"
                                             if a["on_trial"] else ""), markup=False)
        if r["auto_rollback"]:
            out.print(f"{r['name']}: rolling back by itself: {r['auto_rollback']}", markup=False)
        m = r["kernel_merge"]
        if m:
            out.print(f"{r['name']}: kernel merge " + ("complete: 'fiesnap merge' (or the monitor) finishes it"
                      if m["complete"] else f"{m['percent_done']}% done, {m['remaining']} of {m['entries']} "
                      "chunks left; the checkpoint is on /dev/mapper/" + r["name"]), markup=False)
        if r["bypass"]:
            out.print(f"{r['name']}: cannot be rolled back: {r['bypass']}", markup=False)
        if r["suspended"]:
            out.print(f"{r['name']}: {', '.join(r['suspended'])} suspended, holding every write: "
                      f"an interrupted command left it so; any fiesnap command on {r['name']} "
                      "(or the monitor) resumes it", markup=False)


@app.command()
def commit(
    name: Optional[str] = typer.Argument(None, help="Checkpoint to end, keeping all changes."),
    boot_complete: bool = typer.Option(
        False, "--boot-complete",
        help="Commit every update checkpoint whose boot attempt was counted in this boot "
             "(what fiesnap-boot-complete.service runs once boot-complete.target is reached)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Keep all changes: end the checkpoint and remove the snapshot, the store device and the store file.

    A device under fiesnap (setup) goes back to the pass-through /dev/mapper/NAME, mounted or not.
    Otherwise: mounted on /dev/mapper/NAME it stays mounted as a plain pass-through (run commit
    again after unmounting to remove it); unmounted, NAME is removed.
    """
    if bool(name) == boot_complete:
        raise UsageError("give exactly one of NAME or --boot-complete")
    if boot_complete:
        verdicts = commit_cmd.commit_boot_complete(_dm_factory, StateStore(), _log)
        if as_json:
            _emit_json({"boot_complete": [v.to_dict() for v in verdicts]})
        else:
            for v in verdicts:
                out.print(f"{v.name}: {v.result} ({v.detail})", markup=False)
            if not verdicts:
                out.print("no update checkpoints")
        return
    result = commit_cmd.commit(name, _dm_factory, StateStore(), _log)
    if as_json:
        _emit_json({"name": name, "result": result})
    else:
        out.print(f"checkpoint {name} committed ({result})", markup=False)


def _merge(name: str, keep_store: bool, as_json: bool, instant: bool = False) -> None:
    show_bar = not as_json and err.is_terminal
    result = merge_cmd.merge(name, _dm_factory, StateStore(), _log, keep_store=keep_store,
                             progress_factory=_RichProgress if show_bar else None, instant=instant)
    if isinstance(result, InstantResult):
        if as_json:
            _emit_json(result.to_dict())
        elif result.result == "merging":
            out.print(f"{name}: the checkpoint is on /dev/mapper/{name} now (mount it); the kernel is "
                      f"merging {result.entries} chunks back ('fiesnap merge {name}' waits and finishes)",
                      markup=False)
        else:
            out.print(f"rolled back {name}: the kernel merged {result.entries} chunks", markup=False)
        return
    data = {
        "name": name,
        "runs": result.runs if result else 0,
        "chunks": result.chunks if result else 0,
        "bytes_copied": result.bytes_copied if result else 0,
        "seconds": round(result.seconds, 3) if result else 0.0,
        "store_removed": not keep_store,
    }
    if as_json:
        _emit_json(data)
    else:
        out.print(f"rolled back {name}: {data['chunks']} chunks ({format_bytes(data['bytes_copied'])}) restored",
                  markup=False)


_KEEP = typer.Option(False, "--keep-store", help="Keep the store file after the merge.")
_JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout.")


@app.command()
def merge(name: str = typer.Argument(..., help="Checkpoint to roll back to."), keep_store: bool = _KEEP,
          instant: bool = typer.Option(
              False, "--instant",
              help="Hand the store to the kernel's snapshot-merge: /dev/mapper/NAME shows the checkpoint "
                   "at once and may be mounted while the kernel copies back; run merge again to wait "
                   "and finish (docs/design.md, 'Instant rollback')."),
          as_json: bool = _JSON) -> None:
    """Roll back: copy the saved chunks back onto the device (filesystem must be unmounted).

    Safe to re-run after an interruption (kill, power loss): it finishes the job exactly. During
    a kernel merge (--instant), waits for it and finishes, also with the filesystem mounted.
    """
    if instant and keep_store:
        raise UsageError("--keep-store goes with the merge that finishes: 'fiesnap merge NAME --keep-store' "
                         "once the kernel has merged")
    _merge(name, keep_store, as_json, instant)


@app.command("rollback")
def rollback(name: str = typer.Argument(..., help="Checkpoint to roll back to."), keep_store: bool = _KEEP,
             as_json: bool = _JSON) -> None:
    """Alias of merge."""
    _merge(name, keep_store, as_json)


@app.command()
def version() -> None:
    """Print fiesnap's version."""
    out.print(__version__)


def main() -> None:
    run_app(app, "fiesnap", known=(FiesnapError,),
            interrupted="re-run the same command to finish or undo cleanly")
