import pytest

from fiesnap.model.snapstatus import parse_snapshot_status


def test_usage_line():
    u = parse_snapshot_status("24/16384 16")
    assert (u.state, u.used_bytes, u.total_bytes, u.metadata_bytes) == ("active", 24 * 512, 16384 * 512, 16 * 512)
    assert u.percent_used == pytest.approx(100 * 24 / 16384, abs=0.01)


@pytest.mark.parametrize("text,state", [("Invalid", "invalid"), ("Overflow", "overflowed"), ("Merge failed", "merge-failed")])
def test_terminal_states(text, state):
    u = parse_snapshot_status(text)
    assert u.state == state and u.used_bytes is None and u.percent_used is None


def test_garbage_is_rejected():
    with pytest.raises(ValueError, match="unrecognised"):
        parse_snapshot_status("12 of 40")
