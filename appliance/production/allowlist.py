"""Device-serial allowlists: explicit serials, numeric ranges and a safe regular expression.

Python's `re` backtracks and has no timeout, and the policy runs on the journal thread (every station waits on
it), so a work order's pattern is restricted to a subset whose worst case is small: at most 128 characters, no
backreferences, lookarounds or conditionals, no quantifier inside a quantified part (nested quantifiers are
the exponential case), at most 3 variable-width repeats, each bounded by the device-serial length, and the
subject is at most 64 characters. Sequences of alternations are exponential too, without any quantifier
(`(.|a)(.|a)...` tries 2^n ways before it fails), so the number of ways the pattern can split a serial is
bounded as well: at most PATHS_MAX, counted as a branch's ways added up, a sequence's multiplied and a repeat's
choices of length. Matching is always whole-string (fullmatch).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from appliance import names
from appliance.profiles.model import DEVICE_SERIAL_MAX

PATTERN_MAX: Final = 128
VARIABLE_REPEATS_MAX: Final = 3
PATHS_MAX: Final = 50_000  # ways to split a serial; each costs the matcher at most 64 steps
RANGE_WIDTH_MAX: Final = 18  # fits an SQLite INTEGER
# PrintableString (X.520 serialNumber), as profiles/serial.py enforces at issuance.
_SERIAL = re.compile(r"[A-Za-z0-9 '()+,\-./:=?]{1,64}")
_RANGE = re.compile(r"(?P<prefix>[A-Za-z0-9 '()+,\-./:=?]*)\[(?P<first>[0-9]{1,18})-(?P<last>[0-9]{1,18})\]")

_parser: Any = importlib.import_module("re._parser")
_c: Any = importlib.import_module("re._constants")
_FORBIDDEN = {"GROUPREF", "GROUPREF_EXISTS", "ASSERT", "ASSERT_NOT", "ATOMIC_GROUP", "POSSESSIVE_REPEAT"}
_REPEATS = {"MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"}


class AllowlistError(ValueError):
    """A serial, range or pattern that cannot be used; the message says why."""


def check_serial(serial: str) -> str:
    problem = names.DEVICE_SERIAL.problem(serial)
    if problem is not None:
        raise AllowlistError(problem)
    return serial


@dataclass(frozen=True)
class SerialRange:
    """prefix + a zero-padded decimal number of exactly `width` digits, first..last inclusive."""

    prefix: str
    first: int
    last: int
    width: int

    @classmethod
    def parse(cls, text: str) -> SerialRange:
        """'ACME-[000001-000500]': the width is the digit count, which both bounds must share."""
        m = _RANGE.fullmatch(text.strip())
        if m is None:
            raise AllowlistError(f"range {text[:70]!r} is not PREFIX[FIRST-LAST], e.g. ACME-[000001-000500]")
        first, last = m["first"], m["last"]
        if len(first) != len(last):
            raise AllowlistError(f"range {text[:70]!r}: FIRST and LAST must have the same number of digits")
        return cls.make(m["prefix"], int(first), int(last), len(first))

    @classmethod
    def make(cls, prefix: str, first: int, last: int, width: int) -> SerialRange:
        if not 1 <= width <= RANGE_WIDTH_MAX:
            raise AllowlistError(f"range width must be 1..{RANGE_WIDTH_MAX} digits")
        if len(prefix) + width > DEVICE_SERIAL_MAX:
            raise AllowlistError(f"range serials would be longer than {DEVICE_SERIAL_MAX} characters")
        if prefix and not _SERIAL.fullmatch(prefix):
            raise AllowlistError(f"range prefix {prefix[:70]!r} is outside PrintableString")
        if not 0 <= first <= last < 10**width:
            raise AllowlistError(f"range {first}..{last} is empty or does not fit {width} digits")
        return cls(prefix, first, last, width)

    def __str__(self) -> str:
        return f"{self.prefix}[{self.first:0{self.width}d}-{self.last:0{self.width}d}]"

    @property
    def size(self) -> int:
        return self.last - self.first + 1

    def contains(self, serial: str) -> bool:
        if len(serial) != len(self.prefix) + self.width or not serial.startswith(self.prefix):
            return False
        digits = serial[len(self.prefix) :]
        return digits.isascii() and digits.isdigit() and self.first <= int(digits) <= self.last


def _paths(items: Any) -> int:
    """An upper bound on the ways the (already checked) pattern can split a subject: what backtracking tries."""
    total = 1
    for op, av in items:
        name = str(op)
        if name in _REPEATS:
            lo, hi, body = av
            hi = min(DEVICE_SERIAL_MAX, hi if hi is not _c.MAXREPEAT else DEVICE_SERIAL_MAX)
            total *= max(1, hi - max(lo, 0) + 1) * _paths(body)
        elif name == "SUBPATTERN":
            total *= _paths(av[-1])
        elif name == "BRANCH":
            total *= sum(_paths(branch) for branch in av[1])
        if total > PATHS_MAX:
            return total
    return total


def _walk(items: Any, inside_repeat: bool, counts: list[int]) -> None:
    for op, av in items:
        name = str(op)
        if name in _FORBIDDEN:
            raise AllowlistError(
                "pattern uses a backreference, lookaround, atomic group or possessive repeat; not allowed"
            )
        if name in _REPEATS:
            lo, hi, body = av
            if inside_repeat:
                raise AllowlistError(
                    "pattern has a nested quantifier (a repeat inside a repeat); not allowed"
                )
            if hi is _c.MAXREPEAT or hi > DEVICE_SERIAL_MAX:
                hi = DEVICE_SERIAL_MAX
            if lo != hi:
                counts[0] += 1
            _walk(body, True, counts)
        elif name == "SUBPATTERN":
            _walk(av[-1], inside_repeat, counts)
        elif name == "BRANCH":
            if inside_repeat:
                raise AllowlistError("pattern repeats an alternation; not allowed")
            for branch in av[1]:
                _walk(branch, inside_repeat, counts)


@lru_cache(maxsize=256)
def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Check and compile a work order's pattern; raises AllowlistError with the reason."""
    if not pattern:
        raise AllowlistError("pattern is empty")
    if len(pattern) > PATTERN_MAX:
        raise AllowlistError(f"pattern is {len(pattern)} characters; at most {PATTERN_MAX}")
    if not pattern.isascii() or not pattern.isprintable():
        raise AllowlistError("pattern must be printable ASCII")
    try:
        compiled = re.compile(pattern, re.ASCII)
        tree = _parser.parse(pattern, re.ASCII)
    except re.error as exc:
        raise AllowlistError(f"pattern does not compile: {exc}") from None
    counts = [0]
    _walk(tree, False, counts)
    if counts[0] > VARIABLE_REPEATS_MAX:
        raise AllowlistError(f"pattern has more than {VARIABLE_REPEATS_MAX} variable-length repeats")
    if _paths(tree) > PATHS_MAX:
        raise AllowlistError(
            f"pattern can split a serial in more than {PATHS_MAX:,} ways (alternations and variable repeats"
            " multiply); write it with fewer, or use ranges"
        )
    return compiled


def pattern_matches(pattern: str, serial: str) -> bool:
    return len(serial) <= DEVICE_SERIAL_MAX and compile_pattern(pattern).fullmatch(serial) is not None
