"""The VM lab: boot a stock Debian kernel with virtme-ng + qemu (TCG) and run tests in it.

The host kernel has no device-mapper, so every test that touches dm runs in a guest.
Entry points: ``python -m tests.lab kernel-tests``, ``python -m tests.lab script SCRIPT`` and
``python -m tests.lab boots SCRIPT --boots N`` (same disks over N boots, power cuts); option
``--udev`` runs systemd-udevd in the guests. See tests/lab/README.md.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAB_DIR = REPO / ".lab"
