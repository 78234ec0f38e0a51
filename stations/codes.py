"""The code table carried by ERROR and BYE frames.

Codes 1-19 and 99 mirror ``appliance.errors.ReasonCode`` number for number, so a refusal shown on a
fixture's screen matches the appliance's audit log and dashboard. They are copied rather than imported because
the fixture side must not depend on the appliance package; ``tests/stations/test_codes.py`` fails if the two
tables drift.
Codes 100 and up belong to the protocol itself and have no ReasonCode counterpart.
"""

from __future__ import annotations

import enum


class Code(enum.IntEnum):
    """Numbers are on the wire (u16): never renumber, only append."""

    OK = 0  # BYE: normal close

    # Mirrors appliance.errors.ReasonCode.
    BAD_REQUEST = 1
    BAD_CSR = 2
    BAD_POP = 3
    KEY_POLICY = 4
    BAD_DEVICE_SERIAL = 5
    NOT_AUTHORISED = 6
    QUOTA_EXHAUSTED = 7
    DEVICE_ALREADY_ISSUED = 8
    KEY_ALREADY_CERTIFIED = 9
    UNKNOWN_PROFILE = 10
    CLOCK_NOT_TRUSTED = 11
    HSM_UNAVAILABLE = 12
    JOURNAL_UNAVAILABLE = 13
    AUDIT_UNAVAILABLE = 14
    SIGNATURE_INVALID = 15
    BUSY = 16
    DEVICE_SCRAPPED = 17
    UPSTREAM_REJECTED = 18
    STATION_PAUSED = 19
    INTERNAL = 99

    # Protocol-level codes.
    BAD_FRAME = 100
    AUTH_FAILED = 101
    REPLAY = 102
    UNSUPPORTED_VERSION = 103
    UNKNOWN_STATION = 104
    STATION_DISABLED = 105
    UNEXPECTED_MESSAGE = 106
    TIMEOUT = 107
    BAD_TAG = 108
    NO_SESSION = 109
    UNKNOWN_REQUEST = 110
    CONFIRM_MISMATCH = 111


# Codes after which the station may send the same request (same request id) again later. Everything else is
# final for that request id: the device needs a new CSR, a supervisor's action, or a fix on the fixture.
RETRYABLE: frozenset[Code] = frozenset(
    {
        Code.CLOCK_NOT_TRUSTED,
        Code.HSM_UNAVAILABLE,
        Code.JOURNAL_UNAVAILABLE,
        Code.AUDIT_UNAVAILABLE,
        Code.SIGNATURE_INVALID,
        Code.BUSY,
        Code.INTERNAL,
        Code.BAD_FRAME,
        Code.REPLAY,
        Code.TIMEOUT,
        Code.BAD_TAG,
        Code.NO_SESSION,
    }
)


def code_from_wire(value: int) -> Code | int:
    """Map a received u16 to a Code; unknown numbers (a newer appliance) are kept as plain ints."""
    try:
        return Code(value)
    except ValueError:
        return value
