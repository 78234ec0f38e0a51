"""What the OCSP responder answers for a serial, read from the journal (docs/revocation.md has the table)."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any, Literal

from appliance.va.revocation import Reason

NeverIssued = Literal["unknown", "revoked"]


@dataclass(frozen=True)
class CertStatus:
    kind: Literal["good", "revoked", "unknown"]
    why: str  # issued, revoked, burned, in-flight, never-issued, ocsp-signer
    revoked_at: float | None = None
    reason: Reason | None = None
    non_issued: bool = False  # the RFC 6960 2.2 form: certificateHold, 1970-01-01, extended-revoke extension
    cacheable: bool = True


def _row_status(state: str, reason: Any, revoked_at: Any) -> CertStatus:
    if reason is not None:
        return CertStatus("revoked", "revoked", float(revoked_at or 0.0), Reason(reason))
    if state in ("issued", "confirmed"):
        return CertStatus("good", "issued")
    if state == "intent":
        return CertStatus("unknown", "in-flight", cacheable=False)
    if state == "burned":
        return CertStatus("revoked", "burned", non_issued=True)
    # reworked / scrapped rows are revoked by the journal's triggers; never answer good for them.
    return CertStatus("revoked", str(state), 0.0, Reason.UNSPECIFIED)


def live_statuses(conn: sqlite3.Connection, ca: str, limit: int) -> list[tuple[int, CertStatus]]:
    """The `limit` newest issued or confirmed certificates of `ca` with what the responder answers for them
    (good, or revoked with its time and reason): the ones worth answering ahead of time."""
    rows = conn.execute(
        "SELECT i.cert_serial, i.state, r.reason, r.revoked_at FROM issuance i"
        " LEFT JOIN revocation r ON r.cert_serial = i.cert_serial"
        " WHERE i.ca=? AND i.state IN ('issued', 'confirmed') ORDER BY i.id DESC LIMIT ?",
        (ca, limit),
    ).fetchall()
    return [(int(serial, 16), _row_status(state, reason, at)) for serial, state, reason, at in rows]


def lookup_status(
    conn: sqlite3.Connection, ca: str, serial: int, never_issued: NeverIssued = "unknown"
) -> CertStatus:
    """What the responder answers for `serial` under issuing CA `ca` (run on the journal thread)."""
    hex_serial = format(serial, "x")
    row = conn.execute(
        "SELECT i.state, i.ca, r.reason, r.revoked_at FROM issuance i"
        " LEFT JOIN revocation r ON r.cert_serial = i.cert_serial WHERE i.cert_serial=?",
        (hex_serial,),
    ).fetchone()
    if row is not None and row[1] == ca:
        return _row_status(row[0], row[2], row[3])
    if conn.execute("SELECT 1 FROM ocsp_signer WHERE ca=? AND cert_serial=?", (ca, hex_serial)).fetchone():
        return CertStatus("good", "ocsp-signer")
    if never_issued == "revoked":
        return CertStatus("revoked", "never-issued", non_issued=True)
    return CertStatus("unknown", "never-issued")
