import pytest

from fiesnap.model.dmtable import DmTarget, format_table, linear, snapshot, snapshot_origin


def test_linear():
    assert linear(0, 8, "7:0", 2048) == DmTarget(0, 8, "linear", "7:0 2048")


def test_snapshot_origin():
    assert snapshot_origin(1000, "7:0") == DmTarget(0, 1000, "snapshot-origin", "7:0")


@pytest.mark.parametrize("store_type", ["P", "PO"])
def test_snapshot(store_type):
    t = snapshot(1000, "7:0", "253:1", store_type, 8)
    assert t == DmTarget(0, 1000, "snapshot", f"7:0 253:1 {store_type} 8")


@pytest.mark.parametrize(
    "call",
    [
        lambda: snapshot(1000, "7:0", "253:1", "N", 8),
        lambda: snapshot(1000, "7:0", "253:1", "p", 8),
        lambda: snapshot(1000, "7:0", "253:1", "P", 12),
        lambda: snapshot(1000, "7:0", "253:1", "P", 0),
        lambda: snapshot(0, "7:0", "253:1", "P", 8),
        lambda: snapshot_origin(100, "7:0 extra"),
        lambda: snapshot_origin(100, ""),
        lambda: linear(-1, 8, "7:0", 0),
        lambda: linear(0, 0, "7:0", 0),
        lambda: linear(0, 8, "7:0", -8),
    ],
)
def test_builders_reject_bad_arguments(call):
    with pytest.raises(ValueError):
        call()


def test_format_table():
    targets = [linear(0, 8, "7:0", 16), DmTarget(8, 8, "error", ""), linear(16, 8, "7:0", 0)]
    assert format_table(targets) == "0 8 linear 7:0 16\n8 8 error\n16 8 linear 7:0 0"
    assert format_table([]) == ""
