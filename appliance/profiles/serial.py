"""Device serial checks and the safe rendering of untrusted strings."""

from __future__ import annotations

import secrets
import unicodedata
from typing import Final

from appliance.errors import IssuanceRefused, ReasonCode
from appliance.profiles.model import DEVICE_SERIAL_MAX, Profile

# X.680 PrintableString, exactly. Many encoders also let '*', '@', '&' or '_' through; strict relying parties
# then reject the certificate, so we never emit them.
PRINTABLE: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")

# Longest rendering of an untrusted value we put in a message: the serial may be megabytes.
_SHOW_MAX: Final = 80


def safe_repr(value: str, limit: int = _SHOW_MAX) -> str:
    """A quoted, ASCII-only rendering of an untrusted string, cut to `limit` characters.

    Python's repr() keeps printable non-ASCII characters, which includes bidi overrides in some categories and
    look-alike letters; escaping everything outside printable ASCII leaves nothing for a terminal or a browser
    to interpret.
    """
    shown = value[:limit]
    out = []
    for ch in shown:
        code = ord(ch)
        if ch in "\\'":
            out.append("\\" + ch)
        elif 0x20 <= code < 0x7F:
            out.append(ch)
        elif code <= 0xFF:
            out.append(f"\\x{code:02x}")
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    suffix = f"...(+{len(value) - limit} chars)" if len(value) > limit else ""
    return "'" + "".join(out) + "'" + suffix


def is_clean_text(value: str) -> bool:
    """True when `value` has no control, format (bidi), surrogate or unassigned characters."""
    return all(unicodedata.category(ch)[0] != "C" for ch in value)


def validate_device_serial(profile: Profile, serial: str) -> None:
    """Raise IssuanceRefused(BAD_DEVICE_SERIAL) unless `serial` fits the subject serialNumber of `profile`."""
    limit = min(profile.device_serial_max, DEVICE_SERIAL_MAX)
    problem: str | None = None
    if not isinstance(serial, str):
        problem = "device serial must be a string"
        serial = repr(serial)
    elif not serial:
        problem = "device serial is empty"
    elif len(serial) > limit:
        problem = f"device serial is {len(serial)} characters long; at most {limit} allowed"
    elif any(ch not in PRINTABLE for ch in serial):
        bad = next(ch for ch in serial if ch not in PRINTABLE)
        problem = f"device serial has character {safe_repr(bad)} outside PrintableString"
    elif serial != serial.strip(" "):
        # Invisible on screens and labels, and X.520 matching folds them away: two serials that differ only
        # in outer spaces would name the same device.
        problem = "device serial has leading or trailing spaces"
    if problem is not None:
        raise IssuanceRefused(
            f"{problem}: {safe_repr(serial)}",
            ReasonCode.BAD_DEVICE_SERIAL,
            {"device_serial": safe_repr(serial), "profile": profile.name},
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
