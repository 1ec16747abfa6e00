"""The update lifecycle (pure): what activate does with an update checkpoint at each boot.

`fiesnap start NAME --boot-attempts N` before an update makes an update checkpoint: the new
system gets N boots to prove itself. The record counts them, the way Android's vold counts
dm-bow's and systemd-boot counts boot entries' tries (a counter outside the filesystem under
test, decremented before the new system runs, never after):

- each boot's `activate` counts one attempt, saved durably, before the device is exposed;
  a power cut before the save left nothing exposed, one after it spent the attempt, which is
  what that boot was;
- a commit (by hand, or `commit --boot-complete` once systemd's boot assessment reached
  boot-complete.target in a counted boot) ends the checkpoint keeping the update's data;
- an activate that finds every attempt spent and no commit rolls the checkpoint back instead
  of exposing it; the record says so first (`auto_rollback`), so that a rollback a power cut
  interrupts is finished by the next boot's activate rather than counted or exposed.

A boot is one boot id (/proc/sys/kernel/random/boot_id): activate run twice in one boot, or
in the boot that started the checkpoint, counts nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from fiesnap.model.record import CheckpointRecord

#: what activate does with a checkpoint at this boot
EXPOSE = "expose"        # build the stack; no attempt to count (or none to count again)
COUNT = "count"          # count one attempt durably, then build the stack
ROLL_BACK = "roll back"  # attempts spent without a commit: merge instead of exposing


@dataclass(frozen=True)
class BootAttempts:
    """An update checkpoint's attempts, as status and activate report them."""

    allowed: int
    used: int
    #: the last attempt was counted in this boot: a commit now is this boot's verdict.
    on_trial: bool

    @property
    def left(self) -> int:
        return self.allowed - self.used

    def to_dict(self) -> dict:
        return {"allowed": self.allowed, "used": self.used, "left": self.left, "on_trial": self.on_trial}


def attempts_of(record: CheckpointRecord, boot_id: str) -> BootAttempts | None:
    """None for a checkpoint that counts no boots."""
    if not record.boot_attempts:
        return None
    return BootAttempts(record.boot_attempts, record.attempts_used,
                        bool(record.attempt_boot) and record.attempt_boot == boot_id)


def decide_at_boot(record: CheckpointRecord, boot_id: str) -> str:
    """EXPOSE, COUNT or ROLL_BACK for an active checkpoint whose stack is down."""
    if not record.boot_attempts or record.phase != "active":
        return EXPOSE
    if record.auto_rollback:
        return ROLL_BACK  # decided earlier, then refused or cut short: never exposed again
    if boot_id in (record.attempt_boot, record.built_boot):
        return EXPOSE  # counted already in this boot, or started in it: not a new attempt
    if record.attempts_used < record.boot_attempts:
        return COUNT
    return ROLL_BACK


def rollback_reason(record: CheckpointRecord) -> str:
    """What activate records, and logs, when it rolls a checkpoint back by itself."""
    n = record.boot_attempts
    if n == 1:
        return "the update's only boot attempt was used without a commit"
    return f"all {n} boot attempts of the update were used without a commit"


def commits_at_boot_complete(record: CheckpointRecord, boot_id: str) -> bool:
    """`commit --boot-complete`: an active update checkpoint counted in this very boot."""
    return (record.phase == "active" and bool(record.boot_attempts) and not record.auto_rollback
            and record.attempt_boot == boot_id)
