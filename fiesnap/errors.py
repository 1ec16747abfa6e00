"""Errors with the exit codes the CLI returns.

Every failure the user can cause maps to one class with its own exit code, so
scripts can tell "bad input" from "refused for safety" from "kernel said no".
"""

from __future__ import annotations


class FiesnapError(Exception):
    """Base class: a one-line message saying what is wrong and what to do."""

    exit_code = 1


class UsageError(FiesnapError):
    """Bad argument (size, name, chunk size)."""

    exit_code = 2


class NotRootError(FiesnapError):
    exit_code = 3


class DeviceError(FiesnapError):
    """Missing, non-block, busy or mounted device."""

    exit_code = 4


class FilesystemError(FiesnapError):
    """No filesystem, unsupported filesystem, not enough free space, bad extents."""

    exit_code = 5


class CheckpointNameError(FiesnapError):
    """Unknown or taken checkpoint name."""

    exit_code = 6


class RefusedError(FiesnapError):
    """Refused for safety: merge while mounted, invalid/overflowed snapshot, bad store."""

    exit_code = 7


class StoreFormatError(RefusedError):
    """The COW store's exception table is not valid: a rollback is impossible."""

    exit_code = 8


class DeviceMapperError(FiesnapError):
    """A device-mapper call failed."""

    exit_code = 9


class StateError(FiesnapError):
    exit_code = 10


class StateBusyError(StateError):
    """Another fiesnap command holds the state folder's lock."""


#: Every exit status a fiesnap command returns, for `--help` and the docs.
EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "success"),
    (1, "internal error (FIESNAP_DEBUG=1 shows why); monitor --once: a store lost or stuck"),
    (UsageError.exit_code, "bad argument or option (size, chunk size, name, missing choice)"),
    (NotRootError.exit_code, "not root"),
    (DeviceError.exit_code, "device missing, not a block device, mounted or in use"),
    (FilesystemError.exit_code, "no or unsupported filesystem, no free space, unusable extents"),
    (CheckpointNameError.exit_code, "unknown or taken name"),
    (RefusedError.exit_code, "refused for safety (mounted, invalid or overflowed checkpoint, ...)"),
    (StoreFormatError.exit_code, "the store's table is not valid: no rollback, data untouched"),
    (DeviceMapperError.exit_code, "no device-mapper in the kernel, or a dm call failed"),
    (StateError.exit_code, "state folder unsafe or unreadable, or locked by another command"),
    (130, "interrupted (^C): run the same command again"),
)
