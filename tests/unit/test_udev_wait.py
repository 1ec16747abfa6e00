"""Waiting for udev after a resume made while frozen (dmnodes.wait_cookie), against a fake
that keeps libdm's rules: a cookie of 0 means libdm is not synchronising with udev (it is
not running); dm_udev_wait(0) returns at once, dm_udev_wait_immediate never says "ready"
for it (libdm's _udev_wait returns early without setting the flag)."""

from __future__ import annotations

import time

from fiesnap.kernel import dmnodes


class LibdmLike:
    def __init__(self, confirm_after_polls: int = 2) -> None:
        self.calls: list[tuple[str, int]] = []
        self.left = confirm_after_polls

    def dm_udev_wait(self, cookie):
        self.calls.append(("wait", cookie))
        return 1

    def dm_udev_wait_immediate(self, cookie, ready_ref):
        self.calls.append(("immediate", cookie))
        if cookie:  # a real semaphore: udev releases it after some polls
            self.left -= 1
            if self.left <= 0:
                ready_ref._obj.value = 1
        return 1


def test_no_cookie_means_no_wait():
    lib = LibdmLike()
    t0 = time.monotonic()
    assert dmnodes.wait_cookie(lib, 0, timeout=5.0) is True
    assert time.monotonic() - t0 < 1.0, "waited for a confirmation that cannot come"
    assert lib.calls == [("wait", 0)]  # libdm's node operations still run


def test_a_cookie_is_polled_until_udev_confirms():
    lib = LibdmLike(confirm_after_polls=3)
    assert dmnodes.wait_cookie(lib, 0x0D4D1234, timeout=5.0) is True
    assert lib.calls == [("immediate", 0x0D4D1234)] * 3


def test_a_silent_udev_is_waited_for_a_bounded_time():
    lib = LibdmLike(confirm_after_polls=10**9)
    t0 = time.monotonic()
    assert dmnodes.wait_cookie(lib, 0x0D4D1234, timeout=0.2) is False
    assert 0.2 <= time.monotonic() - t0 < 2.0
