"""`bow-compat`: record a dm-log-writes trace, replay it through the dm-bow model, restore,
inspect.

Thin like fiesnap's CLI: parse, call the module, print; every error becomes one line on stderr
and the error class's exit code (bow_compat.errors.EXIT_CODES, also in --help).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from fiesnap import __version__
from fiesnap.clirun import run_app

from . import inspect as bow_inspect
from .errors import EXIT_CODES, BowCommandError, BowError
from .image import FileImage
from .replay import replay as run_replay
from .restore import plan_restore, restore as run_restore

EXIT_IO = 4  # a file or device that cannot be opened, read or written


def _exit_codes() -> str:
    return "\b\n" + "\n".join(f"{code:>3}  {what}" for code, what in EXIT_CODES)


app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
    help=(
        "dm-bow compatible backup-on-write: record a dm-log-writes trace of a command's writes "
        "to a device, replay it as dm-bow would, roll a device back from its dm-bow log (the "
        "recovery tool dm-bow shipped without), and print the log. Formats: docs/bow-format.md."
    ),
    epilog="Exit codes:\n\n" + _exit_codes(),  # \b: click keeps the lines as they are
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"bow-compat {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                 help="Print the version and exit."),
) -> None:
    pass


class _Bar:
    """A rich progress bar on stderr, only when stderr is a terminal."""

    def __init__(self, description: str, *, in_bytes: bool) -> None:
        self.on = err.is_terminal
        cols = [TextColumn("{task.description}"), BarColumn()]
        cols += [DownloadColumn()] if in_bytes else [TextColumn("{task.completed}/{task.total}")]
        self._p = Progress(*cols, TimeRemainingColumn(), console=err, transient=True)
        self._task = self._p.add_task(description, total=None)

    def __enter__(self) -> "_Bar":
        if self.on:
            self._p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.on:
            self._p.stop()

    def __call__(self, done: int, total: int) -> None:
        if self.on:
            self._p.update(self._task, completed=done, total=total)


def _emit(data: dict, as_json: bool, text: str) -> None:
    if as_json:
        out.print_json(json.dumps(data))
    else:
        out.print(text)


@contextmanager
def _about(path: str) -> Iterator[None]:
    """Prefix a BowError about IMAGE with its path, as an OSError names it."""
    try:
        yield
    except BowError as e:
        if not str(e).startswith(path):
            e.args = (f"{path}: {e}",)
        raise


@app.command(
    epilog=(
        "\b\nExample (as root; for an image file, 'losetup -f --show FILE' gives a device):\n"
        "  bow-compat record /dev/sdb1 --log /dev/sdc --base base.img -- sh -c 'cp -a /usr/share/doc .'\n"
        "  bow-compat replay /dev/sdc --base base.img --out bow.img\n\n"
        "COMMAND runs with the mount point as its working directory and in $BOW_COMPAT_MOUNT; "
        "with --json its output goes to stderr. The dm device is named bow-record-<device>."),
)
def record(
    device: str = typer.Argument(..., metavar="DEVICE", help="Unmounted block device with an ext4 or XFS filesystem: the device to trace."),
    command: list[str] = typer.Argument(..., metavar="-- COMMAND [ARGS]...", help="The workload, run in the mount point once the checkpoint mark is logged."),
    log_device: str = typer.Option(..., "--log", metavar="LOGDEV", help="Block device that receives the dm-log-writes log (overwritten; at least as big as what COMMAND writes)."),
    base: str = typer.Option(..., "--base", metavar="BASE", help="New file: DEVICE as it was when logging began (replay's --base)."),
    mountpoint: str | None = typer.Option(None, "--mount", metavar="DIR", help="Mount point (an existing directory); default: a new one, removed afterwards."),
    mark: str = typer.Option("checkpoint", "--mark", metavar="NAME", help="Mark logged after fstrim, with the filesystem frozen (replay's --mark)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Record COMMAND's writes to DEVICE as a dm-log-writes trace.

    Copies DEVICE to BASE, puts a dm-log-writes device over DEVICE logging to LOGDEV, mounts
    it, runs fstrim, logs the mark with the filesystem frozen, runs COMMAND, unmounts and
    removes the dm device. Every check runs first: bad input changes nothing. On a failure or
    ^C everything built is torn down, and the error says what is left where."""
    from .record import record as run_record  # fiesnap's kernel adapters: only when recording

    with _Bar("copy to BASE", in_bytes=True) as bar:
        res = run_record(device, log_device, base, command, mountpoint=mountpoint, mark=mark,
                         command_stdout=sys.stderr if as_json else None, progress=bar)
    d = res.to_dict()
    bs = "" if res.block_size == 4096 else f" --block-size {res.block_size}"
    mk = "" if mark == "checkpoint" else f" --mark {mark}"
    _emit(d, as_json, f"{device}: {res.trace_entries} trace entries recorded in {log_device}; "
                      f"{base} is {device} as logging began; COMMAND exited {res.command_exit}\n"
                      f"next: bow-compat replay {log_device} --base {base} --out OUT.img{bs}{mk}")
    if res.command_exit:
        raise BowCommandError(f"COMMAND {res.command[0]} exited {res.command_exit}; the trace up "
                              f"to its end is recorded in {log_device}, {base} is kept")


@app.command(epilog=(
    "\b\nExample:\n  bow-compat replay /dev/sdc --base base.img --out bow.img --json\n\n"
    "--json: trace_entries, writes, discards, marks count the dm-log-writes trace (LOG); "
    "log_entries, log_sectors, log_bytes the dm-bow log the replay wrote into OUT."))
def replay(
    log: str = typer.Argument(..., metavar="LOG", help="dm-log-writes log: the log device or an image of it."),
    base: str = typer.Option(..., "--base", metavar="BASE", help="Device image when logging began (only read)."),
    out_image: str = typer.Option(..., "--out", metavar="OUT", help="Image to create: the device as dm-bow leaves it."),
    mark: str = typer.Option("checkpoint", "--mark", metavar="NAME", help="Log mark that starts the checkpoint."),
    block_size: int = typer.Option(4096, "--block-size", metavar="N", help="Block size: a power of two, 512..65536 (dm-bow itself takes 512..4096; use the filesystem's)."),
    force: bool = typer.Option(False, "--force", help="Replace OUT if it is an existing regular file (never LOG, BASE or a device)."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Replay a dm-log-writes trace onto a copy of BASE through dm-bow.

    Entries before the mark are applied as they are (their discards are the free space), the
    rest with backup-on-write. OUT appears only on success; BASE is never modified. OUT must be
    a new file (or, with --force, an existing regular file): never LOG, BASE, a device or a
    directory (exit 2, nothing written)."""
    with _Bar("replay", in_bytes=False) as bar:
        res = run_replay(log, base, out_image, mark=mark, block_size=block_size, force=force,
                         progress=bar)
    d = res.to_dict()
    text = (f"{out_image}: replayed {d['trace_entries']} trace entries "
            f"({d['trace_entries_before_mark']} before the mark): {d['data_bytes']} data bytes "
            f"written, {d['backup_bytes']} backed up, {d['copy_io_bytes']} bytes of copy I/O; "
            f"dm-bow log: {d['log_entries']} entries in {d['log_sectors']} log sector(s), "
            f"{d['log_bytes']} bytes written")
    if d["enospc"]:
        text += (f"; free space ran out at trace entry {d['enospc']['trace_entry']} (sector "
                 f"{d['enospc']['sector']}): {d['failed_ios']} write(s) failed as dm-bow fails them")
    _emit(d, as_json, text)


@app.command(epilog="\b\nExample:\n  bow-compat restore --dry-run bow.img && bow-compat restore bow.img")
def restore(
    image: str = typer.Argument(..., metavar="IMAGE", help="Image file or block device holding a dm-bow log."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only validate the log and show the plan."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Roll IMAGE back to its dm-bow checkpoint, in place.

    Validates the whole log and every checksum before writing anything (a corrupt log: exit 8,
    nothing written); an interrupted restore is finished by running it again. No log: exit 7."""
    with _about(image), FileImage(image, writable=not dry_run) as img:
        if dry_run:
            plan = plan_restore(img)
            d = plan.to_dict()
            _emit(d, as_json, f"{image}: log valid; a restore would copy {d['bytes_to_copy']} bytes "
                               f"back ({d['entries']} entries)")
            return
        with _Bar("restore", in_bytes=True) as bar:
            res = run_restore(img, progress=bar)
    d = res.to_dict()
    _emit(d, as_json, f"{image}: restored to the checkpoint ({d['bytes_copied']} bytes copied"
                       f"{', resumed an interrupted restore' if d.get('resumed') else ''})")


@app.command(epilog="\b\nExample:\n  bow-compat inspect bow.img --json")
def inspect(
    image: str = typer.Argument(..., metavar="IMAGE", help="Image file or block device holding a dm-bow log."),
    as_json: bool = typer.Option(False, "--json", help="Print the log as JSON."),
) -> None:
    """Print IMAGE's dm-bow log; changes nothing.

    Every log sector and entry, checksums verified. Exits as restore would refuse IMAGE, after
    printing what it found: 7 if there is no dm-bow log, 8 if the log is corrupt."""
    with _about(image), FileImage(image, writable=False) as img:
        d, refusal = bow_inspect.examine(img)
        _emit(d, as_json, bow_inspect.render_text(d).rstrip("\n"))
        if refusal is not None:
            raise refusal


def _file_error(e: Exception) -> tuple[str, int] | None:
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}; check the path and permissions", EXIT_IO
    return None


def main() -> None:
    run_app(app, "bow-compat", known=(BowError,), translate=_file_error,
            interrupted="a restore is finished by running it again; replay leaves no OUT")


if __name__ == "__main__":
    main()
