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
        assert 2**64 <= n < 2**127
        seen.add(n)
    assert len(seen) == 2000
    # Top bit is random: over 2000 draws both halves of the range must show up.
    assert any(n >= 2**126 for n in seen) and any(n < 2**126 for n in seen)
