"""Device serial checks against a profile, and certificate serial numbers."""

from __future__ import annotations

import secrets
import time

from appliance import names
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.profiles.model import DEVICE_SERIAL_MAX, Profile
from appliance.text import PRINTABLE, is_clean_text, safe_repr

__all__ = ["PRINTABLE", "is_clean_text", "new_serial_number", "safe_repr", "validate_device_serial"]


def validate_device_serial(profile: Profile, serial: str) -> None:
    """Raise IssuanceRefused(BAD_DEVICE_SERIAL) unless `serial` fits the subject serialNumber of `profile`: the
    device-serial rule of appliance.names, within the profile's own length limit."""
    limit = min(profile.device_serial_max, DEVICE_SERIAL_MAX)
    problem = names.DEVICE_SERIAL.problem(serial, limit)
    if problem is not None:
        shown = safe_repr(serial) if isinstance(serial, str) else safe_repr(repr(serial))
        raise IssuanceRefused(
            problem, ReasonCode.BAD_DEVICE_SERIAL, {"device_serial": shown, "profile": profile.name}
        )


def new_serial_number(now_ms: int | None = None) -> int:
    """A positive certificate serial: bit 126 set, then the time in milliseconds (43 bits: `now_ms`, default the
    wall clock), then 83 bits from the CSPRNG (CA/B BR 7.1 asks for at least 64).

    Serials made later sort after earlier ones, in number and in their hex text (always 32 digits, bit 126
    set), so the journal's serial indexes grow at their end: random serials put every new certificate on a random
    page of indexes that hold ten years of serials, which the disk must read and write back (docs/performance.md
    "Ten years of journal"). The time says no more than the certificate's notBefore; the 83 random bits make the
    serial unpredictable and unique. Below 2**127: a 16-octet DER INTEGER with no sign padding, within RFC 5280's
    20-octet limit."""
    ms = (time.time_ns() // 1_000_000 if now_ms is None else now_ms) & ((1 << 43) - 1)
    return (1 << 126) | (ms << 83) | (int.from_bytes(secrets.token_bytes(11), "big") >> 5)
