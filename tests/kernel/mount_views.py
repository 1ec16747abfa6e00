"""Views of the mount table from outside fiesnap, for checking that a scratch mount stays private.

Used by tests/kernel/test_hardening.py (in the lab) and tests/unit/test_mounts_host.py
(host, root). The watchers are started *before* fiesnap makes its scratch mount, so
they are not in the mount namespace fiesnap makes for it (a process started while a
test holds the scratch mount would inherit that namespace).
"""

from __future__ import annotations

import os
import subprocess
import time


def mount_points(mountinfo: str, name: str) -> list[str]:
    """Mount points in a mountinfo text whose last component is `name`."""
    out = []
    for line in mountinfo.splitlines():
        fields = line.split()
        if len(fields) > 4 and os.path.basename(fields[4]) == name:
            out.append(fields[4])
    return out


class MountViews:
    """Three processes outside fiesnap's namespace; `look()` returns what each sees:

    - "caller": a process in the caller's mount namespace;
    - "peer": a namespace cloned earlier with propagation unchanged (`unshare -m
      --propagation unchanged`): its copies of shared mounts are peers of the caller's,
      like a container's or a systemd service's namespace;
    - "clone": a namespace cloned from the caller's at the moment of `look()`.
    """

    def __enter__(self) -> MountViews:
        self.caller = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
        self.peer = subprocess.Popen(["unshare", "-m", "--propagation", "unchanged", "sleep", "600"],
                                     stdin=subprocess.DEVNULL)
        self.cloner = subprocess.Popen(
            ["sh", "-c", "read go && exec unshare -m --propagation unchanged cat /proc/self/mountinfo"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        own = os.readlink("/proc/self/ns/mnt")
        deadline = time.monotonic() + 20
        while os.readlink(f"/proc/{self.peer.pid}/ns/mnt") == own:  # unshare has not run yet
            if time.monotonic() > deadline or self.peer.poll() is not None:
                raise AssertionError("unshare -m did not make a namespace")
            time.sleep(0.02)
        return self

    def look(self) -> dict[str, str]:
        views = {}
        for who, proc in (("caller", self.caller), ("peer", self.peer)):
            with open(f"/proc/{proc.pid}/mountinfo") as f:
                views[who] = f.read()
        views["clone"], _ = self.cloner.communicate("go\n", timeout=60)
        assert self.cloner.returncode == 0, "unshare -m in the cloner failed"
        return views

    def __exit__(self, *exc: object) -> None:
        for proc in (self.caller, self.peer, self.cloner):
            if proc.poll() is None:
                proc.kill()
            proc.wait()
