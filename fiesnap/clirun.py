"""Run a typer app the way both of this project's commands (fiesnap, bow-compat) must end:
a known error is one line on stderr and its own exit code (followed by a `note:` line for each
thing that went wrong while undoing it), a usage error exit 2, ^C 130, and a bug one line too
(FIESNAP_DEBUG=1 shows the traceback)."""

from __future__ import annotations

import os
import sys
from typing import Callable, NoReturn

import typer

USAGE_EXIT = 2


def say(line: str) -> None:
    """One unwrapped line on stderr (rich would wrap it at the terminal width)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def run_app(
    app: typer.Typer,
    prog: str,
    *,
    known: tuple[type[Exception], ...],
    interrupted: str,
    translate: Callable[[Exception], tuple[str, int] | None] = lambda e: None,
) -> NoReturn:
    """Run `app` on sys.argv and exit. `known` errors carry `exit_code`; `translate` may turn
    another exception into (message, exit code)."""
    try:
        rv = app(standalone_mode=False, prog_name=prog)  # also when run as 'python -m'
        sys.exit(rv if isinstance(rv, int) else 0)
    except known as e:
        say(f"{prog}: error: {e}")
        for note in getattr(e, "__notes__", ()):  # what undoing a failure ran into: rare, but act on it
            say(f"{prog}: note: {note}")
        sys.exit(getattr(e, "exit_code", 1))
    except KeyboardInterrupt:
        say(f"{prog}: interrupted; {interrupted}")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors (typer vendors click), translated ones, bugs
        t = translate(e)
        if t is not None:
            say(f"{prog}: error: {t[0]}")
            sys.exit(t[1])
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            message = e.format_message()
            if type(e).__name__ == "NoArgsIsHelpError":  # no arguments: the help is the answer
                sys.stdout.write(message.rstrip("\n") + "\n")
            elif message:
                ctx = getattr(e, "ctx", None)
                where = getattr(ctx, "command_path", None) or prog
                say(f"{prog}: error: {message.rstrip('.')} (see '{where} --help')")
            sys.exit(USAGE_EXIT)
        if type(e).__name__ == "Abort":
            sys.exit(130)
        if os.environ.get("FIESNAP_DEBUG"):
            raise
        say(f"{prog}: internal error: {type(e).__name__}: {e} (FIESNAP_DEBUG=1 shows a traceback)")
        sys.exit(1)
