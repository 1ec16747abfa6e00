"""Is device-mapper there? Asked once, before a command's first dm call, so that a kernel
without it gets one line saying what to load instead of libdevmapper's own complaints
("Incompatible libdevmapper ... kernel driver (unknown version)", "are you root?") or, worse,
a command that lists nothing and calls that success.

The kernel's dm driver registers the misc device `device-mapper`; /proc/misc lists it once
dm-mod is loaded or built in. Opening /dev/mapper/control asks the kernel to load dm-mod (the
node's char-major-10-236 alias), so that is tried once. Never stricter than libdevmapper: when
/proc/misc still lacks it, libdevmapper itself is asked for the driver's version (it makes a
missing control node and opens it), and only its failure too is a refusal.
The snapshot targets live in their own module (dm-snapshot), which the kernel loads by itself
when a table names them; it can only be missing from the kernel altogether, which the
modules.builtin and modules.dep files of the running kernel tell.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from fiesnap.errors import DeviceMapperError

MISC_NAME = "device-mapper"
CONTROL = "/dev/mapper/control"
SNAPSHOT_MODULE = "dm-snapshot"

NO_DM = ("this kernel has no device-mapper driver loaded ({why}): load it with "
         "'modprobe dm-snapshot' (it brings dm-mod; a custom kernel needs CONFIG_BLK_DEV_DM and "
         "CONFIG_DM_SNAPSHOT), then run the command again")
NO_SNAPSHOT = ("this kernel has no dm-snapshot target (not loaded, not built in, no module under {where}): "
               "fiesnap needs it; use a kernel built with CONFIG_DM_SNAPSHOT (every major distribution's is)")


def _misc_has_dm(proc: str) -> bool:
    try:
        with open(os.path.join(proc, "misc"), encoding="ascii", errors="replace") as f:
            return any(line.split()[1:2] == [MISC_NAME] for line in f)
    except OSError:
        return False


def _poke_control(control: str) -> None:
    """Opening the control node makes the kernel load dm-mod if it is a module."""
    try:
        os.close(os.open(control, os.O_RDWR | os.O_CLOEXEC))
    except OSError:
        pass


def missing_driver(proc: str = "/proc", control: str = CONTROL,
                   ask_library: Callable[[], object] | None = None) -> str | None:
    """None when the dm driver is there; otherwise the one-line reason and remedy.
    `ask_library` (say, DeviceMapper().driver_version) is the last word when given."""
    if _misc_has_dm(proc):
        return None
    _poke_control(control)
    if _misc_has_dm(proc):
        return None
    if ask_library is not None:
        try:
            ask_library()
            return None
        except Exception:  # noqa: BLE001 - any failure of the library is "no driver" here
            pass
    why = f"no '{MISC_NAME}' in {os.path.join(proc, 'misc')}"
    if not os.path.exists(control):
        why += f", no {control}"
    return NO_DM.format(why=why)


def require_driver(proc: str = "/proc", control: str = CONTROL,
                   ask_library: Callable[[], object] | None = None) -> None:
    reason = missing_driver(proc, control, ask_library)
    if reason is not None:
        raise DeviceMapperError(reason)


def _module_names(path: str) -> set[str]:
    """Module base names (dm-snapshot, dm_snapshot) listed in modules.builtin / modules.dep."""
    names: set[str] = set()
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                mod = line.split(":", 1)[0].strip()
                base = os.path.basename(mod).split(".ko", 1)[0]
                names.add(base.replace("_", "-"))
    except OSError:
        pass
    return names


def snapshot_target_missing(loaded_targets: set[str], modules_dir: str | None = None) -> str | None:
    """None when the kernel has the snapshot targets (loaded, built in or as a module)."""
    if "snapshot" in loaded_targets:
        return None
    where = modules_dir or os.path.join("/lib/modules", os.uname().release)
    known = _module_names(os.path.join(where, "modules.builtin")) | _module_names(os.path.join(where, "modules.dep"))
    if SNAPSHOT_MODULE in known:
        return None
    if not os.path.isdir(where):
        return None  # no module tree to ask (a container, a custom layout): let the table load tell
    return NO_SNAPSHOT.format(where=where)
