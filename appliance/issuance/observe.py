"""What the issuance core tells an observer (the control API's event stream and the metrics) about its work.

The core calls these on the event loop, after the answer is decided, once per request or batch; an observer must
return at once (count, enqueue) and never raise: it runs on the issuance hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from appliance.errors import BirthlineError


@dataclass(frozen=True, slots=True)
class Outcome:
    """One request's answer: a certificate (`cert_serial` set), a refusal or failure (`error` set)."""

    station: str
    device_serial: str
    request_id: str
    profile: str | None
    work_order: str | None  # the work order that granted it (None: refused before one was chosen)
    product: str | None
    cert_serial: str | None
    reused: bool  # answered with the certificate stored for an earlier request (same device and key)
    error: BirthlineError | None
    pending: bool  # RA mode: authorised, the upstream CA issues it
    front_end: str = "station"  # the IssueRequest's: station, cmp, scep, est, cli


@dataclass(frozen=True, slots=True)
class Confirmation:
    station: str
    device_serial: str
    cert_serial: str
    lag_s: float  # from issued to confirmed


class IssuanceObserver(Protocol):
    def answered(self, outcome: Outcome) -> None: ...

    def signed(self, certificates: int, seconds: float) -> None:
        """One HSM signing call for a batch (success or failure), and how long it took."""

    def confirmed(self, confirmations: list[Confirmation]) -> None: ...
