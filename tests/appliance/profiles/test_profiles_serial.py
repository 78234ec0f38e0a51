"""Device serial validation, safe rendering of untrusted text, certificate serial numbers."""

from __future__ import annotations

import dataclasses

import pytest

from appliance.errors import IssuanceRefused, ReasonCode
from appliance.profiles import builtin_profiles, new_serial_number, safe_repr, validate_device_serial

IDEVID = builtin_profiles()["idevid"]


@pytest.mark.parametrize(
    "serial",
    ["SN0001", "abc-123", "a", "X" * 64, "A B", "it's (1+1)=2, ok? a/b:c.d", "lowercase-ok"],
)
def test_good_serials(serial: str) -> None:
    validate_device_serial(IDEVID, serial)


@pytest.mark.parametrize(
    ("serial", "needle"),
    [
        ("", "empty"),
        ("X" * 65, "65 characters"),
        ("SN\x00001", "\\x00"),
        ("SN\x1b[2J\x1b]0;pwned\x07", "\\x1b"),
        ("SN\u202e1000", "\\u202e"),
        ("SN_0001", "'_'"),
        ("SN*", "'*'"),
        ("SN@x", "'@'"),
        ("ＳＮ１", "\\uff33"),
        (" SN1", "leading or trailing"),
        ("SN1 ", "leading or trailing"),
        ("%s%n%x", "'%'"),
        ("SN\U0001f600", "\\U0001f600"),
    ],
)
def test_bad_serials(serial: str, needle: str) -> None:
    with pytest.raises(IssuanceRefused) as info:
        validate_device_serial(IDEVID, serial)
    err = info.value
    assert err.code == ReasonCode.BAD_DEVICE_SERIAL
    assert needle in err.message
    # Safe to print on a terminal or a dashboard: printable ASCII only.
    assert err.message.isascii() and err.message.isprintable()
    assert str(err.details["device_serial"]).isascii()


def test_profile_limit_is_respected() -> None:
    short = dataclasses.replace(IDEVID, device_serial_max=8)
    validate_device_serial(short, "12345678")
    with pytest.raises(IssuanceRefused):
        validate_device_serial(short, "123456789")


def test_huge_serial_message_is_bounded() -> None:
    with pytest.raises(IssuanceRefused) as info:
        validate_device_serial(IDEVID, "\u202e" * 1_000_000)
    assert len(info.value.message) < 2000


def test_safe_repr() -> None:
    assert safe_repr("ok") == "'ok'"
    assert safe_repr("a'b\\c") == "'a\\'b\\\\c'"
    assert safe_repr("\x00\x7f\u200f") == "'\\x00\\x7f\\u200f'"
    assert safe_repr("x" * 100, limit=10) == "'xxxxxxxxxx'...(+90 chars)"


def test_new_serial_number() -> None:
    seen = set()
    for _ in range(2000):
        n = new_serial_number()
        assert 2**126 <= n < 2**127  # 16 DER octets, no sign padding; far above the 2**64 floor
        assert len(f"{n:x}") == 32
        seen.add(n)
    assert len(seen) == 2000
    # The low 83 bits are the CSPRNG's: within one millisecond they still differ, and every one of them varies.
    same_ms = [new_serial_number(now_ms=1_765_000_000_000) for _ in range(2000)]
    assert len(set(same_ms)) == 2000
    assert {n >> 83 for n in same_ms} == {(1 << 43) | 1_765_000_000_000}
    varied = 0
    for n in same_ms:
        varied |= n ^ same_ms[0]
    assert varied == (1 << 83) - 1


def test_later_serials_sort_after_earlier_ones_as_numbers_and_as_stored_text() -> None:
    """The journal stores serials as hex text and indexes them: a later serial must sort after an earlier one both
    ways, so that each new certificate's index entries go at the end of the index (docs/performance.md)."""
    earlier = [new_serial_number(now_ms=1_765_000_000_000 + i) for i in range(0, 5000, 7)]
    later = [new_serial_number(now_ms=1_765_000_000_000 + 5000 + i) for i in range(0, 5000, 7)]
    assert max(earlier) < min(later)
    assert max(f"{n:x}" for n in earlier) < min(f"{n:x}" for n in later)
    # Year 2245 still fits the 43 bits of milliseconds and keeps the same layout.
    far = new_serial_number(now_ms=8_700_000_000_000)
    assert 2**126 <= far < 2**127 and far >> 83 == (1 << 43) | 8_700_000_000_000
