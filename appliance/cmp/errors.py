"""CMP failure information and the package's one error root.

Every refusal the CMP layer raises is a CmpError carrying the PKIFailureInfo bit that goes on the wire.
Refusals from the rest of the appliance (BirthlineError with a ReasonCode) are mapped by `fail_info_for`,
the ONE table from reason codes to failInfo; docs/cmp.md shows it to integrators.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from appliance.errors import BirthlineError, ReasonCode


class FailInfo(enum.IntEnum):
    """PKIFailureInfo bit numbers (RFC 9810 section 5.2.3)."""

    BAD_ALG = 0
    BAD_MESSAGE_CHECK = 1
    BAD_REQUEST = 2
    BAD_TIME = 3
    BAD_CERT_ID = 4
    BAD_DATA_FORMAT = 5
    WRONG_AUTHORITY = 6
    INCORRECT_DATA = 7
    MISSING_TIME_STAMP = 8
    BAD_POP = 9
    CERT_REVOKED = 10
    CERT_CONFIRMED = 11
    WRONG_INTEGRITY = 12
    BAD_RECIPIENT_NONCE = 13
    TIME_NOT_AVAILABLE = 14
    UNACCEPTED_POLICY = 15
    UNACCEPTED_EXTENSION = 16
    ADD_INFO_NOT_AVAILABLE = 17
    BAD_SENDER_NONCE = 18
    BAD_CERT_TEMPLATE = 19
    SIGNER_NOT_TRUSTED = 20
    TRANSACTION_ID_IN_USE = 21
    UNSUPPORTED_VERSION = 22
    NOT_AUTHORIZED = 23
    SYSTEM_UNAVAIL = 24
    SYSTEM_FAILURE = 25
    DUPLICATE_CERT_REQ = 26

    @property
    def asn1_name(self) -> str:
        """The ASN.1 name, e.g. badMessageCheck."""
        head, *rest = self.name.lower().split("_")
        return head + "".join(part.upper() if part == "pop" else part.title() for part in rest)


_FAIL_INFO_FOR_REASON: dict[ReasonCode, FailInfo] = {
    ReasonCode.BAD_REQUEST: FailInfo.BAD_REQUEST,
    ReasonCode.BAD_CSR: FailInfo.BAD_DATA_FORMAT,
    ReasonCode.BAD_POP: FailInfo.BAD_POP,
    ReasonCode.KEY_POLICY: FailInfo.BAD_CERT_TEMPLATE,
    ReasonCode.BAD_DEVICE_SERIAL: FailInfo.BAD_CERT_TEMPLATE,
    ReasonCode.NOT_AUTHORISED: FailInfo.NOT_AUTHORIZED,
    ReasonCode.QUOTA_EXHAUSTED: FailInfo.NOT_AUTHORIZED,
    ReasonCode.DEVICE_ALREADY_ISSUED: FailInfo.DUPLICATE_CERT_REQ,
    ReasonCode.KEY_ALREADY_CERTIFIED: FailInfo.DUPLICATE_CERT_REQ,
    ReasonCode.UNKNOWN_PROFILE: FailInfo.BAD_CERT_TEMPLATE,
    ReasonCode.CLOCK_NOT_TRUSTED: FailInfo.SYSTEM_UNAVAIL,
    ReasonCode.HSM_UNAVAILABLE: FailInfo.SYSTEM_UNAVAIL,
    ReasonCode.JOURNAL_UNAVAILABLE: FailInfo.SYSTEM_UNAVAIL,
    ReasonCode.AUDIT_UNAVAILABLE: FailInfo.SYSTEM_UNAVAIL,
    ReasonCode.SIGNATURE_INVALID: FailInfo.SYSTEM_FAILURE,
    ReasonCode.BUSY: FailInfo.SYSTEM_UNAVAIL,
    ReasonCode.DEVICE_SCRAPPED: FailInfo.NOT_AUTHORIZED,
    ReasonCode.UPSTREAM_REJECTED: FailInfo.BAD_REQUEST,
    ReasonCode.STATION_PAUSED: FailInfo.SYSTEM_UNAVAIL,
    ReasonCode.INTERNAL: FailInfo.SYSTEM_FAILURE,
}

FAIL_INFO_FOR_REASON: Mapping[ReasonCode, FailInfo] = MappingProxyType(_FAIL_INFO_FOR_REASON)
"""ReasonCode -> the failInfo bit sent in a CMP error or rejection. Covers every ReasonCode."""

RETRYABLE_FAIL_INFO: frozenset[FailInfo] = frozenset({FailInfo.SYSTEM_UNAVAIL})
"""A refusal with one of these bits may succeed later unchanged (the forwarder retries; devices may too)."""

# The reverse direction, for CmpErrors raised inside this package (so the audit log shows a reason code).
_REASON_FOR_FAIL_INFO: dict[FailInfo, ReasonCode] = {
    FailInfo.BAD_POP: ReasonCode.BAD_POP,
    FailInfo.NOT_AUTHORIZED: ReasonCode.NOT_AUTHORISED,
    FailInfo.SYSTEM_UNAVAIL: ReasonCode.BUSY,
    FailInfo.SYSTEM_FAILURE: ReasonCode.INTERNAL,
    FailInfo.BAD_CERT_TEMPLATE: ReasonCode.KEY_POLICY,
}


def fail_info_for(reason: ReasonCode) -> FailInfo:
    return _FAIL_INFO_FOR_REASON.get(reason, FailInfo.SYSTEM_FAILURE)


def fail_info_for_error(error: BaseException) -> FailInfo:
    """The failInfo to answer an exception with: a CmpError's own bit, a BirthlineError's mapped reason,
    systemFailure for anything else (an unexpected exception is our fault, not the peer's)."""
    if isinstance(error, CmpError):
        return error.fail_info
    if isinstance(error, BirthlineError):
        return fail_info_for(error.code)
    return FailInfo.SYSTEM_FAILURE


@dataclass(eq=False)
class CmpError(BirthlineError):
    """A CMP message or exchange was refused. `fail_info` is the bit to answer with; `message` the text
    (sent as statusString, so never put secrets in it)."""

    fail_info: FailInfo = FailInfo.BAD_REQUEST

    def __post_init__(self) -> None:
        if self.code is ReasonCode.INTERNAL:
            self.code = _REASON_FOR_FAIL_INFO.get(self.fail_info, ReasonCode.BAD_REQUEST)
        super().__post_init__()

    def __str__(self) -> str:
        return f"{self.fail_info.asn1_name}: {self.message}"


def cmp_error(fail_info: FailInfo, message: str) -> CmpError:
    return CmpError(message, fail_info=fail_info)
