"""EST refusals: the HTTP status and the plain-text reason RFC 7030 4.2.3 asks for (RFC 8951 3.3), with the
appliance's reason code, so a refusal on a fixture's screen matches the audit log and the dashboard."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from appliance.errors import BirthlineError, IssuancePending, ReasonCode

# What a refusal of the core is answered with. 4xx: the client's request (or who sent it) is wrong and sending it
# again will not help; 503 with Retry-After: the appliance cannot issue now (its own fault or an operator's
# pause) and the same request will do once it can; 500: a defect or a signature that did not verify.
STATUS_FOR_REASON: Final[dict[ReasonCode, int]] = {
    ReasonCode.BAD_REQUEST: 400,
    ReasonCode.BAD_CSR: 400,
    ReasonCode.BAD_POP: 400,
    ReasonCode.KEY_POLICY: 400,
    ReasonCode.BAD_DEVICE_SERIAL: 400,
    ReasonCode.UNKNOWN_PROFILE: 400,
    ReasonCode.UPSTREAM_REJECTED: 400,
    ReasonCode.NOT_AUTHORISED: 403,
    ReasonCode.QUOTA_EXHAUSTED: 403,
    ReasonCode.DEVICE_SCRAPPED: 403,
    ReasonCode.DEVICE_ALREADY_ISSUED: 409,
    ReasonCode.KEY_ALREADY_CERTIFIED: 409,
    ReasonCode.CLOCK_NOT_TRUSTED: 503,
    ReasonCode.HSM_UNAVAILABLE: 503,
    ReasonCode.JOURNAL_UNAVAILABLE: 503,
    ReasonCode.AUDIT_UNAVAILABLE: 503,
    ReasonCode.BUSY: 503,
    ReasonCode.STATION_PAUSED: 503,
    ReasonCode.SIGNATURE_INVALID: 500,
    ReasonCode.INTERNAL: 500,
}
RETRY_AFTER_S: Final = 5  # for a 503: when the same request may be sent again


@dataclass(eq=False)
class EstError(BirthlineError):
    """An EST request refused. `message` is sent to the client as the text body (never a secret in it)."""

    status: int = 400
    retry_after_s: float | None = None
    """Sent as Retry-After (whole seconds): 202 (RA mode) and 503."""
    basic_realm: str | None = None
    """A 401 that HTTP Basic can answer: sent as WWW-Authenticate: Basic realm="..."."""
    allow: str | None = None
    """A 405: the methods the resource takes (the Allow header)."""
    core: bool = False
    """The issuance core's answer (from_core): the core audits its own refusals."""

    def body(self) -> bytes:
        """The text body: the reason code's name and number, then the reason (one line)."""
        text = " ".join(self.message.split())[:500]
        return f"{self.code.name} ({int(self.code)}): {text}\n".encode()


def from_core(exc: BirthlineError) -> EstError:
    """The answer to a refusal, failure or "pending" of the issuance core."""
    if isinstance(exc, IssuancePending):
        return EstError(exc.message, exc.code, status=202, retry_after_s=exc.retry_after_s, core=True)
    status = STATUS_FOR_REASON.get(exc.code, 500)
    retry = float(RETRY_AFTER_S) if status == 503 else None
    return EstError(exc.message, exc.code, status=status, retry_after_s=retry, core=True)


def refuse(
    status: int,
    code: ReasonCode,
    message: str,
    *,
    retry_after_s: float | None = None,
    basic_realm: str | None = None,
    allow: str | None = None,
) -> EstError:
    return EstError(message, code, status=status, retry_after_s=retry_after_s, basic_realm=basic_realm,
                    allow=allow)  # fmt: skip
