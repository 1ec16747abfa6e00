import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fiesnap.errors import UsageError
from fiesnap.model.units import MAX_SIZE, format_bytes, parse_size


@pytest.mark.parametrize(
    "text, expected",
    [
        ("4096", 4096),
        ("512B", 512),
        ("512b", 512),
        ("4k", 4096),
        ("4K", 4096),
        ("4KiB", 4096),
        ("4ki", 4096),
        ("64M", 64 * 2**20),
        ("64m", 64 * 2**20),
        ("2G", 2 * 2**30),
        ("2g", 2 * 2**30),
        ("1.5GiB", 3 * 2**29),
        ("1.5gib", 3 * 2**29),
        ("0.5K", 512),
        (".5K", 512),
        ("1T", 2**40),
        ("1P", 2**50),
        ("100MB", 100_000_000),
        ("100mb", 100_000_000),
        ("4kB", 4000),
        ("1GB", 10**9),
        ("2TB", 2 * 10**12),
        ("  64M ", 64 * 2**20),
        ("64 M", 64 * 2**20),
        ("8191P", 8191 * 2**50),
    ],
)
def test_parse_size_valid(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("", "not a number"),
        ("   ", "not a number"),
        ("M", "not a number"),
        ("abc", "not a number"),
        ("-1", "negative"),
        ("-64M", "negative"),
        (" -5", "negative"),
        ("0", "greater than zero"),
        ("0M", "greater than zero"),
        ("0.0G", "greater than zero"),
        ("1.3K", "whole number"),
        ("0.1", "whole number"),
        ("1.", "not a number"),
        ("1e6", "not a number"),
        ("64X", "unknown unit"),
        ("64MiBs", "unknown unit"),
        ("64Mi B", "not a number"),
        ("1,5G", "not a number"),
        ("1_000", "not a number"),
        ("0x10", "not a number"),
        ("\u0664\u0662", "not a number"),  # non-ASCII digits
        ("8192P", "too large"),
        ("9223372036854775808", "too large"),
        ("9" * 5000, "too large"),
        ("64M\nrm -rf", "not a number"),
    ],
)
def test_parse_size_invalid(text, fragment):
    with pytest.raises(UsageError) as ei:
        parse_size(text)
    msg = str(ei.value)
    assert fragment in msg
    assert "\n" not in msg
    assert "64M" in msg and "1.5GiB" in msg  # gives examples


def test_parse_size_max():
    assert parse_size(str(MAX_SIZE)) == MAX_SIZE
    with pytest.raises(UsageError):
        parse_size(str(MAX_SIZE + 1))


def test_parse_size_not_a_string():
    with pytest.raises(UsageError):
        parse_size(42)  # type: ignore[arg-type]


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(min_value=1, max_value=2**20),
    unit=st.sampled_from(["", "B", "K", "k", "KiB", "M", "Mi", "G", "GiB", "T", "kB", "MB", "GB"]),
)
def test_parse_size_property(n, unit):
    mult = {
        "": 1, "B": 1, "K": 2**10, "k": 2**10, "KiB": 2**10, "M": 2**20, "Mi": 2**20,
        "G": 2**30, "GiB": 2**30, "T": 2**40, "kB": 10**3, "MB": 10**6, "GB": 10**9,
    }[unit]
    assert parse_size(f"{n}{unit}") == n * mult


@pytest.mark.parametrize(
    "n, expected",
    [
        (0, "0 B"),
        (1, "1 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (64 * 2**20, "64.0 MiB"),
        (3 * 2**29, "1.5 GiB"),
        (2**20 - 1, "1.0 MiB"),  # not "1024.0 KiB"
        (2**40, "1.0 TiB"),
        (2**60, "1.0 EiB"),
        (2**70, "1024.0 EiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_format_bytes(n, expected):
    assert format_bytes(n) == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=1024, max_value=2**62))
def test_format_bytes_in_range(n):
    value, unit = format_bytes(n).split()
    assert unit.endswith("iB")
    assert 1.0 <= float(value) < 1024.0
