"""Command-line interface. Thin: parse, call a command module, print; errors become one line + exit code.

It starts on every monitor poll and every boot, so it imports what a command needs when that
command runs: the command modules, libdevmapper, rich's tables and progress bars.

One module because it is the whole command surface a user reads in `--help`: each command is a
few lines of options, an example and what to print, and the checks every command shares
(device-mapper present, state folder safe, one line per error) sit beside them.
"""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from fiesnap import __version__
from fiesnap.clirun import run_app, say
from fiesnap.errors import EXIT_CODES, DeviceMapperError, FiesnapError, RefusedError, UsageError

# "\b": click prints the paragraph as it is, without rewrapping it.
_EXIT_TABLE = "\b\n" + "\n".join(f"{code:>3}  {text}" for code, text in EXIT_CODES)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain click help: '\b' keeps the example and exit code blocks as written
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help=(
        "Rollback checkpoints for a plain ext4 or XFS filesystem, on the kernel's stock "
        "dm-snapshot, with the COW store kept in a preallocated file on the filesystem itself.\n\n"
        "Run as root. Records live in /var/lib/fiesnap (FIESNAP_STATE_DIR overrides; it must be "
        "root's alone). 'fiesnap COMMAND -h' shows a command's options and an example; "
        "docs/design.md explains the design, docs/boot.md the boot units."
    ),
    epilog="Exit codes:\n\n" + _EXIT_TABLE,
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"fiesnap {__version__}\n")
        raise typer.Exit(0)


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print fiesnap's version and exit."),
) -> None:
    """Rollback checkpoints for a plain ext4 or XFS filesystem."""


def _dm_factory():
    from fiesnap.kernel.dm import DeviceMapper

    return DeviceMapper()


def _ready(*, snapshot: bool = False):
    """The state folder, checked, once the kernel is known to have device-mapper (and, for a
    command that builds a snapshot, the snapshot target): a missing driver is one line saying
    what to load, before any device or record is looked at. Not root comes first (what to do
    is plain), then an unsafe state folder (the more serious of the other two)."""
    from fiesnap.commands.guards import require_root
    from fiesnap.kernel import dmsupport
    from fiesnap.services.statedir import StateStore

    require_root()
    state = StateStore()
    state.names()  # walks and checks the folder's path; creates nothing
    dmsupport.require_driver(ask_library=lambda: _dm_factory().driver_version())
    if snapshot:
        reason = dmsupport.snapshot_target_missing(set(_dm_factory().target_versions()))
        if reason is not None:
            raise DeviceMapperError(reason)
    return state


_say = say


def _log(msg: str) -> None:
    _say(f"fiesnap: {msg}")


def _echo(line: str) -> None:
    """One line on stdout, never wrapped: scripts and logs read it."""
    sys.stdout.write(line + "\n")


def _emit_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class _RichProgress:
    def __init__(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        self._p = Progress(
            "[progress.description]{task.description}", BarColumn(), DownloadColumn(),
            TransferSpeedColumn(), TimeRemainingColumn(), console=Console(stderr=True, highlight=False),
            transient=False,
        )
        self._p.start()
        self._task = self._p.add_task("merging", total=total)

    def advance(self, n: int) -> None:
        self._p.advance(self._task, n)

    def close(self) -> None:
        self._p.stop()


def _size(text: str, what: str) -> int:
    from fiesnap.model.units import parse_size

    try:
        return parse_size(text)
    except UsageError as e:
        raise UsageError(f"{what}: {e}") from None


def _checked_name(value: Optional[str]) -> Optional[str]:
    """A NAME argument is checked as it is parsed: '' or a path is a usage error, not 'all'."""
    if value is not None:
        from fiesnap.model.record import validate_name

        validate_name(value)
    return value


def _one_of(name: Optional[str], flag: bool, flag_name: str, command: str) -> None:
    if (name is not None) == flag:
        raise UsageError(f"give exactly one of NAME or {flag_name} (see 'fiesnap {command} --help')")


def _example(*lines: str) -> str:
    return ("Example:" if len(lines) == 1 else "Examples:") + "\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


_NAME = "NAME"


@app.command(short_help="Put a device under fiesnap: mount /dev/mapper/NAME.", epilog=_example("fiesnap setup /dev/sdb1 --name data    # then: mount /dev/mapper/data /srv/data"))
def setup(
    device: str = typer.Argument(..., metavar="DEVICE", help="Unmounted block device holding ext4 or XFS."),
    name: str = typer.Option(..., "--name", "-n", metavar=_NAME, callback=_checked_name, help="Name of the device to mount: /dev/mapper/NAME."),
    as_json: bool = typer.Option(False, "--json", help="Print the new record as JSON on stdout."),
) -> None:
    """Put DEVICE under fiesnap: /dev/mapper/NAME becomes a pass-through of it; mount that.

    Mounting through NAME from then on (fstab: /dev/mapper/NAME, not UUID=) is what lets
    'fiesnap start NAME' checkpoint the filesystem while it stays mounted.
    """
    from fiesnap.commands import setup as setup_cmd
    from fiesnap.commands import status as status_cmd

    state = _ready()
    record = setup_cmd.setup(device, name, _dm_factory, state, _log)
    if as_json:
        _emit_json(status_cmd.status(_dm_factory, state, record.name)[0].to_dict())
    else:
        _echo(f"{device} is now /dev/mapper/{record.name}: mount that")


@app.command(short_help="Take a checkpoint (online, or of an unmounted device).", epilog=_example(
    "fiesnap start data --size 2G                       # online, mounted and busy",
    "fiesnap start /srv/data --size 2G --boot-attempts 3 --unless-active   # before an update",
    "fiesnap start /dev/sdb1 --size 2G --name data      # unmounted, not under fiesnap"))
def start(
    target: str = typer.Argument(
        ..., metavar="NAME|MOUNTPOINT|DEVICE",
        help="A device under fiesnap (its NAME or mount point; may be mounted and busy), "
             "or an unmounted block device holding ext4 or XFS."),
    size: str = typer.Option(..., "--size", "-s", metavar="SIZE", help="Store size: 64M, 2G, 1.5GiB or bytes."),
    name: Optional[str] = typer.Option(None, "--name", "-n", metavar=_NAME, callback=_checked_name,
                                       help="Checkpoint name for a DEVICE (default: its basename)."),
    chunk_size: str = typer.Option("4K", "--chunk-size", metavar="SIZE",
                                   help="dm-snapshot chunk size, a power of two from 4K to 512K."),
    free_aware: bool = typer.Option(
        True, "--free-aware/--plain",
        help="Free-aware store (the default): writes into space that was free at the checkpoint copy "
             "nothing (docs/design.md). --plain: every first write of a chunk is copied."),
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
    from fiesnap.commands import start as start_cmd
    from fiesnap.commands import status as status_cmd

    req = start_cmd.StartRequest(target=target, size=_size(size, "--size"), name=name,
                                 chunk_bytes=_size(chunk_size, "--chunk-size"), free_aware=free_aware,
                                 boot_attempts=boot_attempts, unless_active=unless_active)
    start_cmd.check_request(req)
    state = _ready(snapshot=True)
    record, started = start_cmd.start_unless_active(req, _dm_factory, state, _log)
    if as_json:
        _emit_json({**status_cmd.status(_dm_factory, state, record.name)[0].to_dict(),
                    "started": started})
    elif started:
        _echo(f"checkpoint {record.name} started: the filesystem is on /dev/mapper/{record.name}")
    else:
        _echo(f"{record.name} holds a checkpoint already ({record.phase}): none started")


@app.command(short_help="Grow a live checkpoint's store: --by or --to SIZE.", epilog=_example("fiesnap extend data --by 1G", "fiesnap extend data --to 4G --json"))
def extend(
    name: str = typer.Argument(..., metavar=_NAME, callback=_checked_name, help="Checkpoint whose store to grow (mounted or not)."),
    by: Optional[str] = typer.Option(None, "--by", metavar="SIZE", help="Grow the store file by SIZE (64M, 1G, ...)."),
    to: Optional[str] = typer.Option(None, "--to", metavar="SIZE", help="Grow the store file to SIZE."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Grow a live checkpoint's store online (--by SIZE or --to SIZE), using only chunks that
    were free at the checkpoint.

    Chunks that were in use at the checkpoint (freed since, and handed to the store file) or that
    have an exception stay allocated but unmapped: writing store data there would destroy
    checkpoint data. Only NAME-cow is reloaded; no I/O is lost. The store's growth is what it
    maps; when none of the new chunks is safe it does not grow: exit 7 (the result is still
    printed with --json).
    """
    from fiesnap.commands import extend as extend_cmd
    from fiesnap.model.units import format_bytes

    if (by is None) == (to is None):
        raise UsageError("give exactly one of --by SIZE or --to SIZE (see 'fiesnap extend --help')")
    grow_by = _size(by, "--by") if by is not None else None
    grow_to = _size(to, "--to") if to is not None else None
    state = _ready()
    result = extend_cmd.extend(name, _dm_factory, state, _log, by=grow_by, to=grow_to)
    if as_json:
        _emit_json(result.to_dict())
    if result.mapped_bytes <= 0:
        raise RefusedError(f"{result.nothing_mapped()}: commit or merge before it fills")
    if not as_json:
        _echo(f"{name}: store {format_bytes(result.store_bytes_before)} -> "
              f"{format_bytes(result.store_bytes_after)} (+{format_bytes(result.mapped_bytes)} mapped; "
              f"store file {format_bytes(result.file_bytes_before)} -> {format_bytes(result.file_bytes_after)}, "
              f"{result.plan.skipped_chunks} unsafe chunks skipped)")


@app.command(short_help="Grow stores before they fill: NAME or --all.", epilog=_example("fiesnap monitor --all                 # what fiesnap-monitor.service runs",
                             "fiesnap monitor data --once -v        # one round, every decision logged"))
def monitor(
    name: Optional[str] = typer.Argument(None, metavar="[NAME]", callback=_checked_name, help="One checkpoint (or --all)."),
    all_: bool = typer.Option(False, "--all", help="Every active checkpoint (what the monitor unit runs)."),
    threshold: float = typer.Option(50.0, "--threshold", metavar="PCT", help="Grow when the store is this % used."),
    step: str = typer.Option("100%", "--step", metavar="SIZE|PCT",
                             help="How much to grow: SIZE (64M) or PCT of the store (50%)."),
    max_size: Optional[str] = typer.Option(None, "--max", metavar="SIZE", help="Never grow the store past SIZE."),
    interval: float = typer.Option(2.0, "--interval", metavar="S", help="Seconds between polls."),
    once: bool = typer.Option(False, "--once", help="One round, then exit (1 if a checkpoint is lost or its store cannot grow safely)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every decision."),
) -> None:
    """Watch store usage and grow stores before they fill: NAME or --all (foreground; see
    fiesnap-monitor.service).

    Polls (the kernel raises no event for usage growth), grows by --step or by what the measured
    write rate needs, warns at 80/90/95% and says loudly when the filesystem has no room left, or
    when an extension mapped nothing (its new blocks were unsafe): then it backs off.
    """
    from fiesnap.commands.monitor import run_monitor
    from fiesnap.model.monitor_policy import MonitorPolicy, parse_step

    _one_of(name, all_, "--all", "monitor")
    step_bytes, step_pct = parse_step(step)
    policy = MonitorPolicy(threshold_pct=threshold, step_bytes=step_bytes, step_pct=step_pct,
                           max_bytes=_size(max_size, "--max") if max_size else None, interval_s=interval)
    state = _ready()
    raise typer.Exit(run_monitor(name, policy, _dm_factory, state, _say, verbose=verbose, once=once))


@app.command(short_help="After boot: rebuild devices and checkpoints.", epilog=_example("fiesnap activate --all --wait 30      # what fiesnap-activate.service runs",
                             "fiesnap activate data --json"))
def activate(
    name: Optional[str] = typer.Argument(None, metavar="[NAME]", callback=_checked_name, help="One recorded name (or --all)."),
    all_: bool = typer.Option(False, "--all", help="Every recorded name (what the boot unit runs)."),
    wait: float = typer.Option(0.0, "--wait", metavar="S", help="Seconds to keep looking for devices that are still appearing."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
) -> None:
    """After boot: rebuild /dev/mapper/NAME, and a checkpoint's whole stack over its existing
    store: NAME or --all.

    The store's identity block (checkpoint id, filesystem UUID, device size, map checksum) must
    match the record before anything is mapped; the store is never zeroed here.
    """
    from fiesnap.commands import activate as activate_cmd

    _one_of(name, all_, "--all", "activate")
    state = _ready()
    results = activate_cmd.activate(name, _dm_factory, state, _log, wait_seconds=wait)
    if as_json:
        _emit_json({"activated": [r.to_dict() for r in results]})
    else:
        for r in results:
            _echo(f"{r.name}: {r.result}" + (f" ({r.detail})" if r.detail else ""))
        if not results:
            _echo("nothing recorded: no device or checkpoint to activate")


@app.command(short_help="Take devices down without ending anything.", epilog=_example("fiesnap deactivate data", "fiesnap deactivate --all    # what the boot unit runs at shutdown"))
def deactivate(
    name: Optional[str] = typer.Argument(None, metavar="[NAME]", callback=_checked_name, help="Recorded name to take down (or --all)."),
    all_: bool = typer.Option(False, "--all", help="Every recorded name (what the boot unit runs at shutdown)."),
    as_json: bool = typer.Option(False, "--json", help="Print the removed devices as JSON on stdout."),
) -> None:
    """Take devices down without ending anything: NAME or --all ('fiesnap activate NAME' brings
    them back).

    A checkpoint taken down is sealed: activate and merge then notice a device written
    without the stack in between (mounted directly, say), and merge refuses.
    """
    from fiesnap.commands import activate as activate_cmd

    _one_of(name, all_, "--all", "deactivate")
    state = _ready()
    removed = activate_cmd.deactivate(name, _dm_factory, state, _log)
    if as_json:
        _emit_json({"name": name, "removed": removed[name]} if name else
                   {"deactivated": [{"name": n, "removed": r} for n, r in removed.items()]})
    else:
        for n, r in removed.items():
            _echo(f"{n}: removed {', '.join(r) or 'nothing (not active)'}")


@app.command(short_help="Undo setup (no checkpoint, unmounted).", epilog=_example("umount /srv/data && fiesnap release data    # then mount /dev/sdb1 directly"))
def release(
    name: str = typer.Argument(..., metavar=_NAME, callback=_checked_name, help="A device put under fiesnap with 'fiesnap setup'."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Undo setup: remove the pass-through /dev/mapper/NAME and its record (no checkpoint, unmounted)."""
    from fiesnap.commands import setup as setup_cmd

    state = _ready()
    record = setup_cmd.release(name, _dm_factory, state, _log)
    if as_json:
        _emit_json({"name": name, "device": record.device, "result": "released"})
    else:
        _echo(f"{name} released: mount {record.device} directly")


@app.command(short_help="Show checkpoints and their stores' usage.", epilog=_example("fiesnap status", "fiesnap status data --json | jq .checkpoints[0].percent_used"))
def status(
    name: Optional[str] = typer.Argument(None, metavar="[NAME]", callback=_checked_name, help="One checkpoint (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Stable machine output on stdout; byte figures are integers."),
) -> None:
    """Show checkpoints: state, store size and usage, chunk size, extents, device, start time."""
    from fiesnap.commands import status as status_cmd

    state = _ready()
    rows = [s.to_dict() for s in status_cmd.status(_dm_factory, state, name)]
    if as_json:
        _emit_json({"checkpoints": rows})
        return
    if not rows:
        _echo("no checkpoints")
        return
    _print_table(rows)
    for r in rows:
        for line in _status_notes(r):
            _echo(line)


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from fiesnap.model.units import format_bytes

    def b(v):
        return "-" if v is None else format_bytes(v)

    table = Table(title=None)
    for col in ("name", "state", "device", "store", "used", "meta", "use%", "chunk", "extents", "started", "mounted"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["name"], r["state"], r["device"], b(r["store_bytes"]), b(r["used_bytes"]),
            b(r["metadata_bytes"]), "-" if r["percent_used"] is None else f"{r['percent_used']:.1f}",
            b(r["chunk_bytes"]), str(r["extents"] or "-"), r["start_time"] or "-",
            ", ".join(r["mounted_on"]) or "-",
        )
    # Piped output (scripts, logs) must not be squeezed to 80 columns.
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)


def _status_notes(r: dict) -> list[str]:
    """The lines under the table that say what a row's state asks of the reader."""
    notes = []
    a = r["boot_attempts"]
    if a:
        notes.append(f"{r['name']}: update checkpoint, boot attempts {a['used']} of {a['allowed']} used, "
                     f"{a['left']} left" + ("; this boot is one: 'fiesnap commit' (or boot-complete) keeps it"
                                            if a["on_trial"] else ""))
    if r["auto_rollback"]:
        notes.append(f"{r['name']}: rolling back by itself: {r['auto_rollback']}")
    m = r["kernel_merge"]
    if m:
        notes.append(f"{r['name']}: kernel merge " + ("complete: 'fiesnap merge' (or the monitor) finishes it"
                     if m["complete"] else f"{m['percent_done']}% done, {m['remaining']} of {m['entries']} "
                     "chunks left; the checkpoint is on /dev/mapper/" + r["name"]))
    if r["bypass"]:
        notes.append(f"{r['name']}: cannot be rolled back: {r['bypass']}")
    if r["suspended"]:
        notes.append(f"{r['name']}: {', '.join(r['suspended'])} suspended, holding every write: "
                     f"an interrupted command left it so; any fiesnap command on {r['name']} "
                     "(or the monitor) resumes it")
    return notes


@app.command(short_help="Keep all changes and end the checkpoint.", epilog=_example("fiesnap commit data", "fiesnap commit --boot-complete    # what fiesnap-boot-complete.service runs"))
def commit(
    name: Optional[str] = typer.Argument(None, metavar="[NAME]", callback=_checked_name, help="Checkpoint to end, keeping all changes (or --boot-complete)."),
    boot_complete: bool = typer.Option(
        False, "--boot-complete",
        help="Commit every update checkpoint whose boot attempt was counted in this boot "
             "(what fiesnap-boot-complete.service runs once boot-complete.target is reached)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Keep all changes: end the checkpoint (NAME or --boot-complete) and remove the snapshot,
    the store device and the store file.

    A device under fiesnap (setup) goes back to the pass-through /dev/mapper/NAME, mounted or not.
    Otherwise: mounted on /dev/mapper/NAME it stays mounted as a plain pass-through (run commit
    again after unmounting to remove it); unmounted, NAME is removed.
    """
    from fiesnap.commands import commit as commit_cmd

    _one_of(name, boot_complete, "--boot-complete", "commit")
    state = _ready()
    if boot_complete:
        verdicts = commit_cmd.commit_boot_complete(_dm_factory, state, _log)
        if as_json:
            _emit_json({"boot_complete": [v.to_dict() for v in verdicts]})
        else:
            for v in verdicts:
                _echo(f"{v.name}: {v.result} ({v.detail})")
            if not verdicts:
                _echo("no update checkpoints")
        return
    result = commit_cmd.commit(name, _dm_factory, state, _log)
    if as_json:
        _emit_json({"name": name, "result": result})
    else:
        _echo(f"checkpoint {name} committed ({result})")


def _merge(name: str, keep_store: bool, as_json: bool, instant: bool = False) -> None:
    from fiesnap.commands import merge as merge_cmd
    from fiesnap.commands.instant import InstantResult
    from fiesnap.model.units import format_bytes

    state = _ready()
    if as_json:
        progress_factory = None
    elif _stderr_is_terminal():
        progress_factory = _RichProgress  # a bar with the rate and the time left
    else:  # a log or a pipe: a line every tenth, with the same
        from fiesnap.commands.progress import LoggedProgress

        progress_factory = lambda total: LoggedProgress(f"{name!r}: rollback", total, _log)  # noqa: E731
    result = merge_cmd.merge(name, _dm_factory, state, _log, keep_store=keep_store,
                             progress_factory=progress_factory, instant=instant)
    if isinstance(result, InstantResult):
        if as_json:
            _emit_json(result.to_dict())
        elif result.result == "merging":
            _echo(f"{name}: the checkpoint is on /dev/mapper/{name} now (mount it); the kernel is "
                  f"merging {result.entries} chunks back ('fiesnap merge {name}' waits and finishes)")
        else:
            _echo(f"rolled back {name}: the kernel merged {result.entries} chunks")
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
        _echo(f"rolled back {name}: {data['chunks']} chunks ({format_bytes(data['bytes_copied'])}) restored")


_KEEP = typer.Option(False, "--keep-store", help="Keep the store file after the merge.")
_JSON = typer.Option(False, "--json", help="Print the result as JSON on stdout.")
_MERGE_EXAMPLE = _example("umount /srv/data && fiesnap merge data && mount /dev/mapper/data /srv/data",
                          "umount /srv/data && fiesnap merge data --instant && mount /dev/mapper/data /srv/data")


@app.command(short_help="Roll back to the checkpoint.", epilog=_MERGE_EXAMPLE)
def merge(name: str = typer.Argument(..., metavar=_NAME, callback=_checked_name, help="Checkpoint to roll back to."), keep_store: bool = _KEEP,
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


@app.command("rollback", short_help="Alias of merge.", epilog=_example("umount /srv/data && fiesnap rollback data"))
def rollback(name: str = typer.Argument(..., metavar=_NAME, callback=_checked_name, help="Checkpoint to roll back to."), keep_store: bool = _KEEP,
             as_json: bool = _JSON) -> None:
    """Alias of merge."""
    _merge(name, keep_store, as_json)


@app.command("install-units", short_help="Write the systemd units for this fiesnap.", epilog=_example(
    "fiesnap install-units && systemctl daemon-reload && systemctl enable fiesnap-activate.service",
    "fiesnap install-units --print     # show them, change nothing"))
def install_units(
    directory: str = typer.Option("/etc/systemd/system", "--dir", metavar="DIR",
                                  help="Where to write the unit files."),
    print_only: bool = typer.Option(False, "--print", help="Print the units on stdout and write nothing."),
    force: bool = typer.Option(False, "--force", help="Replace unit files that differ from what would be written."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON on stdout."),
) -> None:
    """Write fiesnap's systemd units, running this installed fiesnap.

    fiesnap-activate.service (rebuilds devices and checkpoints at boot, before fstab's mounts),
    fiesnap-monitor.service (grows stores before they fill) and fiesnap-boot-complete.service
    (commits update checkpoints once the boot is good), their commands pointing at the fiesnap
    this command runs as. Refused when a user other than root could change that fiesnap's code:
    the units run it as root at every boot. Enable them with systemctl afterwards (docs/boot.md).
    """
    from fiesnap.commands import units as units_cmd

    units = units_cmd.render_units(units_cmd.installed_command())
    if print_only:
        if as_json:
            _emit_json({"units": [{"name": u.name, "text": u.text} for u in units]})
        else:
            for u in units:
                _echo(f"# {u.name}\n{u.text}")
        return
    results = units_cmd.install_units(units, directory, force=force)
    if as_json:
        _emit_json({"directory": directory, "units": [r.to_dict() for r in results]})
    else:
        for r in results:
            _echo(f"{r.path}: {r.result}")
        _echo("next: systemctl daemon-reload; systemctl enable fiesnap-activate.service fiesnap-monitor.service "
              "(and fiesnap-boot-complete.service for update checkpoints)")


@app.command(short_help="Print fiesnap's version.", epilog=_example("fiesnap version"))
def version() -> None:
    """Print fiesnap's version (as 'fiesnap --version')."""
    _echo(__version__)


def main() -> None:
    run_app(app, "fiesnap", known=(FiesnapError,),
            interrupted="re-run the same command to finish or undo cleanly")
