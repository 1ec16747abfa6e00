"""`bow-compat`: replay a dm-log-writes trace through the dm-bow model, restore, inspect.

Thin like fiesnap's CLI: parse, call the module, print; every error becomes one line on stderr
and the error class's exit code (2 usage, 4 file/device, 7 state, 8 corrupt log).
"""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from fiesnap.clirun import run_app

from . import inspect as bow_inspect
from .errors import BowError
from .image import FileImage
from .replay import replay as run_replay
from .restore import plan_restore, restore as run_restore

EXIT_IO = 4  # a file or device that cannot be opened, read or written

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help=(
        "dm-bow compatible backup-on-write: replay a dm-log-writes trace as dm-bow would, "
        "roll a device back from its dm-bow log (the recovery tool dm-bow shipped without), "
        "and print the log."
    ),
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


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


@app.command()
def replay(
    log: str = typer.Argument(..., help="dm-log-writes log (image file or the log device)."),
    base: str = typer.Option(..., "--base", help="Device image when logging began (only read)."),
    out_image: str = typer.Option(..., "--out", help="Image to create: the device as dm-bow leaves it."),
    mark: str = typer.Option("checkpoint", "--mark", help="Log mark that starts the checkpoint."),
    block_size: int = typer.Option(4096, "--block-size", help="Block size: a power of two, 512..65536 (dm-bow itself takes 512..4096)."),
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
    text = (f"{out_image}: {d['entries']} log entries ({d['entries_before_mark']} before the mark), "
            f"{d['data_bytes']} data bytes written, {d['backup_bytes']} backed up, "
            f"{d['log_bytes']} log bytes in {d['log_sectors']} log sector(s), "
            f"{d['copy_io_bytes']} bytes of copy I/O")
    if d["enospc"]:
        text += (f"; free space ran out at log entry {d['enospc']['entry']} (sector "
                 f"{d['enospc']['sector']}): {d['failed_ios']} write(s) failed as dm-bow fails them")
    _emit(d, as_json, text)


@app.command()
def restore(
    image: str = typer.Argument(..., help="Image file or block device holding a dm-bow log."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only validate the log and show the plan."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Roll IMAGE back to its dm-bow checkpoint, in place.

    Validates the whole log and every checksum before writing anything (a corrupt log: exit 8,
    nothing written); an interrupted restore is finished by running it again."""
    with FileImage(image, writable=not dry_run) as img:
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


@app.command()
def inspect(
    image: str = typer.Argument(..., help="Image file or block device holding a dm-bow log."),
    as_json: bool = typer.Option(False, "--json", help="Print the log as JSON."),
) -> None:
    """Print IMAGE's dm-bow log; changes nothing.

    Every log sector and entry, checksums verified. Exits 8 if the log is corrupt, after
    printing what could be read."""
    with FileImage(image, writable=False) as img:
        d = bow_inspect.describe(img)
    _emit(d, as_json, bow_inspect.render_text(d))
    if not d["valid"] and d["state"] != "none":
        raise typer.Exit(8)


def _file_error(e: Exception) -> tuple[str, int] | None:
    if isinstance(e, OSError):
        where = f"{e.filename}: " if e.filename else ""
        return f"{where}{e.strerror or e}; check the path and permissions", EXIT_IO
    return None


def main() -> None:
    run_app(app, "bow-compat", known=(BowError,), translate=_file_error,
            interrupted="a restore is finished by running it again")


if __name__ == "__main__":
    main()
