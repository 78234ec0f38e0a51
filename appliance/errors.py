"""The appliance's error root and the reason codes every refusal carries.

One reason code per failure of the issuance pipeline. The station protocol, CMP failInfo and the dashboard all
show the same code, so an operator can match a refusal on a fixture's screen to the audit log.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


class ReasonCode(enum.IntEnum):
    """Why a request was refused. The numbers are on the wire (station protocol); never renumber."""

    BAD_REQUEST = 1  # malformed request, fields missing or out of range
    BAD_CSR = 2  # CSR does not parse, too large, trailing bytes
    BAD_POP = 3  # CSR signature does not verify (no proof of possession)
    KEY_POLICY = 4  # key algorithm or size not allowed by the profile
    BAD_DEVICE_SERIAL = 5  # device serial empty, too long, or outside PrintableString
    NOT_AUTHORISED = 6  # the authorisation policy refused (station, work order, allowlist)
    QUOTA_EXHAUSTED = 7  # the work order has no units left
    DEVICE_ALREADY_ISSUED = 8  # device serial already has a certificate for another key (rework needed)
    KEY_ALREADY_CERTIFIED = 9  # public key already certified for another device
    UNKNOWN_PROFILE = 10  # profile or issuing CA not configured
    CLOCK_NOT_TRUSTED = 11  # clock is behind the last issuance
    HSM_UNAVAILABLE = 12  # HSM device error: fail closed
    JOURNAL_UNAVAILABLE = 13  # journal cannot be written (disk full, I/O error): fail closed
    AUDIT_UNAVAILABLE = 14  # audit log cannot be written: fail closed
    SIGNATURE_INVALID = 15  # HSM returned a signature that does not verify: nothing is released
    BUSY = 16  # overloaded, retry later
    DEVICE_SCRAPPED = 17  # the device was scrapped: its serial is never issued again
    UPSTREAM_REJECTED = 18  # RA mode: the upstream CA refused this request for good (a new key may be tried)
    STATION_PAUSED = 19  # an operator paused the station (control API): no issuance until it is resumed
    INTERNAL = 99


@dataclass(eq=False)
class BirthlineError(Exception):
    """Root of every error the appliance raises on purpose.

    `code` and `details` are what protocol replies and the dashboard show; `message` is for humans.
    """

    message: str
    code: ReasonCode = ReasonCode.INTERNAL
    details: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__init__(self.message)

    def __str__(self) -> str:
        return f"{self.code.name.lower()}: {self.message}"


class IssuanceRefused(BirthlineError):
    """The request was refused; nothing was signed. Safe to show to the station."""


class IssuanceFailed(BirthlineError):
    """The appliance could not complete the request (HSM, journal, audit). Fail closed; retry later."""


class IssuancePending(BirthlineError):
    """RA mode: the request is authorised and recorded, and the upstream CA has not issued yet. Not a refusal:
    the station is told PENDING (a CMP client "waiting") and asks again after `retry_after_s`."""

    def __init__(self, message: str, retry_after_s: float, request: int) -> None:
        super().__init__(message, ReasonCode.BUSY, {"ra_request": request, "retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s
        self.request = request


@dataclass(frozen=True)
class Problem:
    """One configuration problem and where it is (a dotted TOML path)."""

    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ConfigError(BirthlineError):
    """Configuration is invalid; `problems` lists every problem found, not just the first."""

    def __init__(self, problems: list[Problem], source: str = "") -> None:
        self.problems = list(problems)
        self.source = source
        head = f"{source}: " if source else ""
        text = head + f"{len(problems)} configuration problem(s):\n" + "\n".join(f"  {p}" for p in problems)
        super().__init__(text, ReasonCode.BAD_REQUEST, {"problems": [str(p) for p in problems]})

    def __str__(self) -> str:
        return self.message
