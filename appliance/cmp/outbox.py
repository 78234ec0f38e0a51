"""The upstream outbox as the forwarder reads and writes it (the `outbox` table, appliance/issuance/schema.py):
which records are due, what an exchange decided for each (Outcome), recording those decisions in one transaction.
(`birthline upstream status` reads the queue through appliance/outbox.py, which needs no CMP code).

Record states: queued (never sent), sent (request_der stored, maybe posted), waiting (the upstream said
"waiting"; polled after checkAfter), done, failed (the upstream refused the request for good), parked (the request
could not be built, or the upstream refused it as a message: malformed, wrong key identifier, bad protection: it
can never be sent as it is, so it is set aside with its reason and the other records go on).
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.cmp.model import PKIMessage
from appliance.issuance.policy import AuditSink

OPEN_STATES = ("queued", "sent", "waiting")
_DER = serialization.Encoding.DER
COLUMNS = ("id, kind, issuance_id, cert_serial, transaction_id, csr_der, public_key_der, subject_der, request_der,"
           " state, attempts, last_response_der, created_at, ra_request_id")  # fmt: skip

# Open rows that are due, oldest first. An rr waits for its device's p10cr/cr/kur row, a kur for the row of the
# certificate it updates (the upstream's certificate of each is what they name). Served by the partial index
# outbox_open_by_id, so the done rows (kept for ever) are never scanned.
DUE_SQL = (
    f"SELECT {COLUMNS} FROM outbox o WHERE o.state IN ('queued', 'sent', 'waiting')"
    " AND o.next_attempt_at <= ? AND (o.kind != 'rr' OR NOT EXISTS (SELECT 1 FROM outbox p"
    " WHERE p.cert_serial = o.cert_serial AND p.kind != 'rr'"
    " AND p.state IN ('queued', 'sent', 'waiting')))"
    " AND (o.kind != 'kur' OR NOT EXISTS (SELECT 1 FROM issuance n JOIN outbox p ON p.issuance_id = n.updates"
    " WHERE n.id = o.issuance_id AND p.kind != 'rr' AND p.state IN ('queued', 'sent', 'waiting')))"
    " ORDER BY o.id LIMIT ?"
)


@dataclass
class Row:
    id: int
    kind: str
    issuance_id: int | None
    cert_serial: str
    transaction_id: bytes
    csr_der: bytes | None
    public_key_der: bytes | None
    subject_der: bytes | None
    request_der: bytes | None
    state: str
    attempts: int
    last_response_der: bytes | None
    created_at: float
    ra_request_id: int | None = None  # RA mode: the upstream's certificate IS the device's certificate

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> Row:
        return cls(*r)


@dataclass
class Outcome:
    """What one exchange decided for a row."""

    action: str  # done | confirm | wait | retry | fail | park
    text: str = ""
    cert: x509.Certificate | None = None
    response: PKIMessage | None = None
    check_after: float = 0.0
    cert_req_id: int = 0
    # RA mode: the certificate's issuers, nearest first, up to a CA of [upstream] ca_certs
    chain: tuple[x509.Certificate, ...] = ()


@dataclass
class PassResult:
    done: int = 0
    retried: int = 0
    failed: int = 0
    waiting: int = 0
    parked: int = 0
    sent_messages: int = 0
    errors: list[str] = field(default_factory=list)

    def merge(self, other: PassResult) -> None:
        self.done += other.done
        self.retried += other.retried
        self.failed += other.failed
        self.waiting += other.waiting
        self.parked += other.parked
        self.sent_messages += other.sent_messages
        self.errors.extend(other.errors)


@dataclass(frozen=True)
class QueueLoad:
    open_rows: int
    oldest_created_at: float | None


def record_outcomes(
    conn: sqlite3.Connection,
    rows: Sequence[Row],
    outcomes: dict[int, Outcome],
    result: PassResult,
    *,
    now: float,
    backoff: Callable[[int], float],
    audit: AuditSink | None,
) -> None:
    """Write what a pass decided, in the caller's transaction: each row's new state, the upstream's certificate
    (RA mode: into ra_request, audited as issuance.upstream-issued / -refused), the last success and error."""
    by_id = {r.id: r for r in rows}
    upstream_issued: list[dict[str, object]] = []
    upstream_refused: list[dict[str, object]] = []
    last_ok = last_err = None
    for row_id, decided in outcomes.items():
        r = by_id[row_id]
        o = decided
        if o.action == "done" and r.ra_request_id is not None and o.cert is None:
            # RA mode needs the certificate itself: a "duplicate, no-op" answer leaves the device without.
            o = Outcome("fail", o.text or "the upstream answered without a certificate")
        if o.action == "done":
            der = o.cert.public_bytes(_DER) if o.cert is not None else None
            conn.execute(
                "UPDATE outbox SET state='done', done_at=?, upstream_cert_der=COALESCE(?, upstream_cert_der),"
                " last_error=?, last_response_der=NULL, attempts=attempts+1 WHERE id=?",
                (now, der, o.text or None, row_id),
            )
            if r.kind == "rr":
                conn.execute("UPDATE revocation SET forwarded_at=? WHERE cert_serial=? AND forwarded_at IS NULL",
                             (now, r.cert_serial))  # fmt: skip
            if r.ra_request_id is not None and o.cert is not None and der is not None:
                serial = f"{o.cert.serial_number:x}"
                chain = b"".join(c.public_bytes(_DER) for c in o.chain)
                cur = conn.execute(
                    "UPDATE ra_request SET state='issued', cert_der=?, chain_der=?, cert_serial=?, issued_at=?"
                    " WHERE id=? AND state='pending'",
                    (der, chain, serial, now, r.ra_request_id),
                )
                if cur.rowcount:
                    upstream_issued.append({"ra_request": r.ra_request_id, "cert_serial": serial,
                                            "issuer": o.cert.issuer.rfc4514_string(),
                                            "cert_sha256": hashlib.sha256(der).hexdigest()})  # fmt: skip
            result.done += 1
            last_ok = now
        elif o.action == "wait":
            assert o.response is not None
            conn.execute(
                "UPDATE outbox SET state='waiting', next_attempt_at=?, last_response_der=?, last_error=?"
                " WHERE id=?",
                (now + max(o.check_after, 0.0), o.response.der, o.text, row_id),
            )
            result.waiting += 1
        elif o.action in ("fail", "park"):
            state = "failed" if o.action == "fail" else "parked"
            conn.execute(
                "UPDATE outbox SET state=?, done_at=?, last_error=?, attempts=attempts+1 WHERE id=?",
                (state, now, o.text, row_id),
            )
            if r.ra_request_id is not None:
                # The device waits for nothing any more: its request is failed and its unit given back (trigger).
                conn.execute("UPDATE ra_request SET state='failed', failure=? WHERE id=? AND state='pending'",
                             (o.text, r.ra_request_id))  # fmt: skip
                upstream_refused.append({"ra_request": r.ra_request_id, "reason": o.text})
            if o.action == "fail":
                result.failed += 1
            else:
                result.parked += 1
            last_err = (now, f"outbox {row_id} ({r.kind} {r.cert_serial}) {state}: {o.text}")
        else:
            attempts = r.attempts + 1
            # a row that was waiting goes back to re-sending its request
            conn.execute(
                "UPDATE outbox SET state=CASE WHEN request_der IS NULL THEN 'queued' ELSE 'sent' END,"
                " attempts=?, next_attempt_at=?, last_error=?, last_response_der=NULL WHERE id=?",
                (attempts, now + backoff(attempts), o.text, row_id),
            )
            result.retried += 1
            result.errors.append(o.text)
            last_err = (now, f"outbox {row_id} ({r.kind} {r.cert_serial}): {o.text}")
    if last_ok is not None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('upstream_last_success', ?)",
                     (repr(last_ok),))  # fmt: skip
    if last_err is not None:
        conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('upstream_last_error', ?)",
                     (json.dumps({"at": last_err[0], "error": last_err[1]}),))  # fmt: skip
    # RA mode: the device's certificate (or its final refusal) is an issuance event like any other.
    if audit is not None and upstream_issued:
        audit.append(conn, "appliance", "issuance.upstream-issued", {"items": upstream_issued})
    if audit is not None and upstream_refused:
        audit.append(conn, "appliance", "issuance.upstream-refused", {"items": upstream_refused})
