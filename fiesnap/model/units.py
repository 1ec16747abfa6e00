"""Size arguments: parse what users type, print what users read (pure).

Binary suffixes follow LVM's -L (K/M/G/T/P are powers of 1024, any case), so
a size that works for lvcreate works here. Only the explicit decimal forms
(kB, MB, GB, TB, PB) mean powers of 1000. Arithmetic is exact (Fraction):
a float would silently round "1.1G" to a byte count nobody asked for.
"""

from __future__ import annotations

import re
from fractions import Fraction

from fiesnap.errors import UsageError

MAX_SIZE = 2**63 - 1  # fits in a signed 64-bit off_t
#: The unit of every device-mapper table and status figure.
SECTOR_BYTES = 512

_EXAMPLES = "e.g. 4096, 512B, 64M, 2G, 1.5GiB or 100MB"

_PREFIXES = "kmgtp"

_SIZE_RE = re.compile(
    r"\s*(?P<num>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(?P<unit>[A-Za-z]*)\s*",
    re.ASCII,
)


def _multiplier(unit: str) -> int | None:
    """Bytes per unit, or None if the suffix is not one we accept."""
    u = unit.lower()
    if u in ("", "b"):
        return 1
    if len(u) == 2 and u[0] in _PREFIXES and u[1] == "b":
        return 1000 ** (1 + _PREFIXES.index(u[0]))  # kB, MB, ...: SI
    if u[0] in _PREFIXES and u[1:] in ("", "i", "ib"):
        return 1024 ** (1 + _PREFIXES.index(u[0]))  # K, Ki, KiB: binary
    return None


def parse_size(text: str) -> int:
    """Parse a user-supplied size into a positive number of bytes.

    Raises UsageError (one line, with examples) for anything that is not a
    whole, positive byte count below 2**63.
    """

    def bad(why: str) -> UsageError:
        return UsageError(f"invalid size {text!r}: {why}; use {_EXAMPLES}")

    if not isinstance(text, str):
        raise bad("not a string")
    if text.strip().startswith("-"):
        raise bad("sizes cannot be negative")
    m = _SIZE_RE.fullmatch(text)
    if m is None:
        raise bad("not a number with an optional unit")
    num, unit = m.group("num"), m.group("unit")
    if len(num) > 32:  # also keeps Fraction() clear of int-parsing limits
        raise bad("too large (maximum is 8 EiB - 1)")
    mult = _multiplier(unit)
    if mult is None:
        raise bad(f"unknown unit {unit!r}")
    value = Fraction(num) * mult
    if value.denominator != 1:
        raise bad("not a whole number of bytes")
    n = int(value)
    if n == 0:
        raise bad("size must be greater than zero")
    if n > MAX_SIZE:
        raise bad("too large (maximum is 8 EiB - 1)")
    return n


_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int) -> str:
    """Human-friendly binary size: "512 B", "64.0 MiB", "1.5 GiB"."""
    if n < 0:
        return "-" + format_bytes(-n)
    if n < 1024:
        return f"{n} B"
    k = 0
    while k + 1 < len(_UNITS) and n >= 1024 ** (k + 1):
        k += 1
    value = n / 1024**k
    # 1048575 bytes would print as "1024.0 KiB": move to the next unit.
    if round(value, 1) >= 1024 and k + 1 < len(_UNITS):
        k += 1
        value = n / 1024**k
    return f"{value:.1f} {_UNITS[k]}"


def is_int(v: object) -> bool:
    """An integer from parsed JSON or a caller, and not a bool (True is an int in Python)."""
    return isinstance(v, int) and not isinstance(v, bool)
