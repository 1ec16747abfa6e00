"""Errors with the exit codes a bow_compat command returns.

Same scheme as fiesnap.errors: one class per kind of failure, a one-line message saying what is
wrong and what to do, so scripts can tell "bad input" from "nothing to do" from "the log on the
device cannot be trusted".
"""

from __future__ import annotations


class BowError(Exception):
    """Base class: a one-line message saying what is wrong and what to do."""

    exit_code = 1


class BowUsageError(BowError):
    """Bad argument (path, option)."""

    exit_code = 2


class BowStateError(BowError):
    """The device is not in a state the command acts on (no dm-bow log: nothing to restore)."""

    exit_code = 7


class BowFormatError(BowError):
    """The dm-bow log is corrupt, truncated or of an unknown version: restoring it is unsafe."""

    exit_code = 8
