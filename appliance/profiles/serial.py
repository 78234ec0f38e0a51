"""Device serial checks against a profile, and certificate serial numbers."""

from __future__ import annotations

import secrets

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


def new_serial_number() -> int:
    """A positive certificate serial with 127 bits from the CSPRNG (CA/B BR 7.1 asks for at least 64).

    16 bytes with the top bit cleared keep the DER INTEGER at 16 octets with no sign padding, well within
    RFC 5280's 20-octet limit. Values below 2**64 (odds 2**-63) are drawn again, so a serial is never short.
    """
    while True:
        value = int.from_bytes(secrets.token_bytes(16), "big") & ((1 << 127) - 1)
        if value >= 1 << 64:
            return value
