"""The authorisation seam: who may get a certificate for which device.

A policy runs INSIDE the intent transaction, so a later policy can consume a work order's quota atomically
with the serial reservation (no race can exceed it, and a crash rolls both back together).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from appliance.profiles import Profile


@dataclass(frozen=True)
class IssueRequest:
    """One device's request, as any front end (station protocol, CMP, CLI) hands it to the core."""

    device_serial: str
    csr: bytes
    station: str = "cli"
    request_id: str = ""
    profile: str | None = None
    public_key_der: bytes | None = None
    """SubjectPublicKeyInfo DER, used INSTEAD of `csr` when the front end has verified proof of possession
    itself (CMP ir/cr: the CRMF POP signature). `csr` is then empty; the same key policy applies."""
    replaces: str | None = None
    """Key update (CMP kur, EST simplereenroll, SCEP RenewalReq): the serial (hex) of the device's current
    certificate, which the front end has authenticated the request with. The new certificate takes its place; the
    old row is kept and linked."""
    work_order: str | None = None
    """The front end's credential is good for this work order only (a SCEP challenge password made for it): the
    policy grants the request from that work order or refuses it, whatever else is active on the line."""
    front_end: str = "station"
    """Which front end the request came through (station, cmp, scep, est, cli): told to the observer (the control
    API's events), so a console shows how each device enrolled. Never used to authorise: the station does that."""
    local_only: bool = False
    """The front end cannot wait for an upstream CA (EST serverkeygen: the appliance made the key and keeps it
    nowhere): a product in upstream (RA) issuance mode is refused instead of being forwarded."""


@dataclass(frozen=True)
class Grant:
    """What an authorisation decided besides "yes": how the certificate is made. `upstream` is RA mode: the
    upstream CA issues it (the product's issuance_mode), and the station is told PENDING until it has."""

    mode: str = "local"  # local | upstream
    work_order: str | None = None
    remaining: int | None = None  # units the work order has left after this one (None: no quota taken)
    quantity: int | None = None  # the work order's quantity
    product: str | None = None  # the work order's product (for metrics and the control API's events)


LOCAL = Grant()


class AuthorisationPolicy(Protocol):
    def begin(self, conn: sqlite3.Connection) -> None:
        """A new intent transaction starts: anything the policy cached from an earlier one is stale. Within
        one transaction (BEGIN IMMEDIATE: no other writer) only the policy's own writes change what it reads."""

    def authorise(self, conn: sqlite3.Connection, request: IssueRequest, profile: Profile) -> Grant:
        """Raise IssuanceRefused (NOT_AUTHORISED, QUOTA_EXHAUSTED, ...) to refuse; may write rows in `conn`."""

    def authorise_update(
        self, conn: sqlite3.Connection, request: IssueRequest, profile: Profile, updates: int
    ) -> Grant:
        """A key update of the certificate in issuance row `updates` (the device's current one, which signed the
        request): the device was counted when that certificate was issued, so no unit is taken; the product's
        key policy still applies. Raise IssuanceRefused to refuse."""

    def authorise_retry(
        self, conn: sqlite3.Connection, request: IssueRequest, unit: str, row_id: int
    ) -> None:
        """Another station asks again for a certificate already issued (same device, same key) to a station: it is
        answered from the journal only if this station could have asked for it (it takes nothing). `unit` is
        "issuance_id" or "ra_request_id", the work_order_unit column that binds `row_id` to its work order.
        Raise IssuanceRefused to refuse."""


class AllowAll:
    """Every well-formed request is authorised: for unit tests of the core. The appliance's runtime always uses
    the work-order policy (appliance.production.policy)."""

    def begin(self, conn: sqlite3.Connection) -> None:
        return None

    def authorise(self, conn: sqlite3.Connection, request: IssueRequest, profile: Profile) -> Grant:
        return LOCAL

    def authorise_update(
        self, conn: sqlite3.Connection, request: IssueRequest, profile: Profile, updates: int
    ) -> Grant:
        return LOCAL

    def authorise_retry(
        self, conn: sqlite3.Connection, request: IssueRequest, unit: str, row_id: int
    ) -> None:
        return None


class AuditSink(Protocol):
    """What the core and production control need from the audit log (appliance.audit.AuditLog has this shape);
    a Protocol so tests can pass a recorder and the core does not depend on the log's storage."""

    def append(self, conn: sqlite3.Connection, actor: str, event: str, data: Mapping[str, Any]) -> Any:
        """Append inside the caller's open transaction (journal thread); raise to roll the change back."""

    def record(self, actor: str, event: str, data: Mapping[str, Any]) -> Any:
        """Append a standalone event in its own transaction."""
