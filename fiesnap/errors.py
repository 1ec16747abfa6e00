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
