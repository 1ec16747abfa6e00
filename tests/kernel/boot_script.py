"""What the multi-boot lab scripts share (power_loss.py, update_boots.py).

Each boot runs the script again with FIESNAP_LAB_BOOT=k; FIESNAP_LAB_CARRY is a host folder
every boot sees, for what must outlive a boot (digests, checkpoint ids). The state folder is
on a scratch disk of its own, mounted at STATE_MNT in every boot, so that it survives the power
cuts exactly as the checkpointed disks do.
"""

from __future__ import annotations

import json
import os
import time

from tests.kernel.helpers import run_fiesnap

LAB_POWEROFF = 99  # tests/lab: the wrapper cuts the power without syncing
BOOT = int(os.environ.get("FIESNAP_LAB_BOOT", "0"))
CARRY = os.environ.get("FIESNAP_LAB_CARRY", "")
STATE_MNT = "/run/fiesnap-state"
STATE = f"{STATE_MNT}/state"
_T0 = time.monotonic()


def say(msg: str) -> None:
    print(f"boot {BOOT} +{time.monotonic() - _T0:.0f}s: {msg}", flush=True)


def fiesnap(*args: str, check: bool = True, **kw):
    """fiesnap with the carried state folder; kw as for run_fiesnap (kill_after, ...)."""
    p = run_fiesnap(*args, state_dir=STATE, **kw)
    if check and p.returncode != 0:
        raise AssertionError(f"fiesnap {' '.join(args)} -> {p.returncode}: {p.stderr}")
    return p


def carry(name: str, data: dict | None = None) -> dict:
    """Save `data` for the later boots under `name` (when given); return what is saved."""
    path = os.path.join(CARRY, f"{name}.json")
    if data is not None:
        with open(path, "w") as f:
            json.dump(data, f)
    with open(path) as f:
        return json.load(f)


def jsonable(tree: dict) -> dict:
    """A tree digest as it reads back from the carry folder (tuples become lists)."""
    return json.loads(json.dumps(tree))
