"""Errors with the exit codes a bow_compat command returns.

The same numbers as fiesnap.errors, one class per kind of failure, a one-line message saying what
is wrong and what to do, so scripts can tell "bad input" from "nothing to do" from "the log on
the device cannot be trusted". 4 is also what an OSError (a path that cannot be opened, read or
written) becomes in the CLI.
"""

from __future__ import annotations


class BowError(Exception):
    """Base class: a one-line message saying what is wrong and what to do."""

    exit_code = 1


class BowUsageError(BowError):
    """Bad argument: an option's value, or a path of the wrong kind (a directory, an existing OUT)."""

    exit_code = 2


class BowNotRootError(BowError):
    """The command changes the kernel's state (device-mapper, mounts): only root may."""

    exit_code = 3


class BowDeviceError(BowError):
    """A device that is missing, not a block device, mounted or otherwise in use."""

    exit_code = 4


class BowFilesystemError(BowError):
    """No filesystem on the device, or mount, fstrim or unmount failed."""

    exit_code = 5


class BowCommandError(BowError):
    """The workload command `record` ran exited with a failure (the trace is still recorded)."""

    exit_code = 6


class BowStateError(BowError):
    """The device is not in a state the command acts on (no dm-bow log: nothing to restore)."""

    exit_code = 7


class BowFormatError(BowError):
    """The dm-bow log is corrupt, truncated or of an unknown version: restoring it is unsafe."""

    exit_code = 8


class BowKernelError(BowError):
    """A device-mapper call failed, or a teardown left a dm device or a mount behind."""

    exit_code = 9


class BowInterrupted(BowError):
    """^C or SIGTERM during `record`: what it built is torn down, the message says what is left."""

    exit_code = 130


EXIT_CODES = (  # for --help and the docs
    (0, "success"),
    (2, "usage: a bad option or argument, a path of the wrong kind (a directory ...)"),
    (3, "not root (record)"),
    (4, "a file or device that is missing, cannot be opened, read or written, or is in use"),
    (5, "no filesystem on the device, or mount/fstrim/umount failed (record)"),
    (6, "the recorded COMMAND failed; the trace is still complete (record)"),
    (7, "nothing to do: no dm-bow log (inspect, restore)"),
    (8, "corrupt or truncated log: nothing was written"),
    (9, "device-mapper failed, or something was left behind (the message says what)"),
    (130, "interrupted"),
)
