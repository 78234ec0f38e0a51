"""SCEP failure information and the package's one error root.

A refusal is answered as RFC 8894 says: a CertRep with pkiStatus FAILURE, a failInfo (one of five values) and,
since RFC 8894, a failInfoText saying why. Refusals from the rest of the appliance (BirthlineError with a
ReasonCode) are mapped by `fail_info_for`, the ONE table from reason codes to failInfo; docs/scep.md shows it.
A refusal a client should simply retry later (the HSM, the journal, a paused station) has no SCEP status that
says so: it is answered HTTP 503 with Retry-After instead (`RETRY_LATER`), and the client sends the same
message again.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from types import MappingProxyType

from appliance.errors import BirthlineError, ReasonCode


class FailInfo(enum.IntEnum):
    """RFC 8894 3.2.1.4.5: on the wire as the PrintableString of the number."""

    BAD_ALG = 0
    BAD_MESSAGE_CHECK = 1
    BAD_REQUEST = 2
    BAD_TIME = 3
    BAD_CERT_ID = 4

    @property
    def asn1_name(self) -> str:
        head, *rest = self.name.lower().split("_")
        return head + "".join(part.title() for part in rest)


class ScepError(BirthlineError):
    """A refusal this layer answers with a CertRep FAILURE (`fail_info`, and the message as failInfoText).

    `transaction_id` and `sender_nonce` are set once the request's signed attributes were read: without them there
    is nobody to address a CertRep to, and the answer is HTTP 400 instead."""

    def __init__(
        self,
        message: str,
        fail_info: FailInfo = FailInfo.BAD_REQUEST,
        code: ReasonCode = ReasonCode.BAD_REQUEST,
        *,
        transaction_id: str | None = None,
        sender_nonce: bytes | None = None,
    ) -> None:
        super().__init__(message, code, {"fail_info": fail_info.asn1_name})
        self.fail_info = fail_info
        self.transaction_id = transaction_id
        self.sender_nonce = sender_nonce

    def addressed(self, transaction_id: str, sender_nonce: bytes) -> ScepError:
        """The same refusal, now that we know whom to answer."""
        if self.transaction_id is None:
            self.transaction_id, self.sender_nonce = transaction_id, sender_nonce
        return self


_FAIL_INFO_FOR_REASON: dict[ReasonCode, FailInfo] = {
    ReasonCode.BAD_REQUEST: FailInfo.BAD_REQUEST,
    ReasonCode.BAD_CSR: FailInfo.BAD_REQUEST,
    ReasonCode.BAD_POP: FailInfo.BAD_MESSAGE_CHECK,
    ReasonCode.KEY_POLICY: FailInfo.BAD_ALG,
    ReasonCode.BAD_DEVICE_SERIAL: FailInfo.BAD_REQUEST,
    ReasonCode.NOT_AUTHORISED: FailInfo.BAD_REQUEST,
    ReasonCode.QUOTA_EXHAUSTED: FailInfo.BAD_REQUEST,
    ReasonCode.DEVICE_ALREADY_ISSUED: FailInfo.BAD_REQUEST,
    ReasonCode.KEY_ALREADY_CERTIFIED: FailInfo.BAD_REQUEST,
    ReasonCode.UNKNOWN_PROFILE: FailInfo.BAD_REQUEST,
    ReasonCode.DEVICE_SCRAPPED: FailInfo.BAD_REQUEST,
    ReasonCode.UPSTREAM_REJECTED: FailInfo.BAD_REQUEST,
    ReasonCode.SIGNATURE_INVALID: FailInfo.BAD_REQUEST,
    ReasonCode.INTERNAL: FailInfo.BAD_REQUEST,
}
FAIL_INFO_FOR_REASON: Mapping[ReasonCode, FailInfo] = MappingProxyType(_FAIL_INFO_FOR_REASON)

RETRY_LATER: frozenset[ReasonCode] = frozenset({
    ReasonCode.CLOCK_NOT_TRUSTED, ReasonCode.HSM_UNAVAILABLE, ReasonCode.JOURNAL_UNAVAILABLE,
    ReasonCode.AUDIT_UNAVAILABLE, ReasonCode.BUSY, ReasonCode.STATION_PAUSED,
})  # fmt: skip
"""Reason codes answered HTTP 503 with Retry-After: the appliance's state, not the request, is the problem."""


def fail_info_for(exc: BirthlineError) -> FailInfo:
    if isinstance(exc, ScepError):
        return exc.fail_info
    return FAIL_INFO_FOR_REASON.get(exc.code, FailInfo.BAD_REQUEST)
