"""Reconciliation: what a work order planned against what the journal shows, and the certificate export
manufacturers hand to their customers. Every number is counted from the issuance rows, not from counters."""

from __future__ import annotations

import csv
import hashlib
import io
import sqlite3
from dataclasses import asdict, dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.issuance.journal import Journal
from appliance.production.model import ProductionError, iso

EXPORT_COLUMNS = (
    "certificate_serial", "device_serial", "sha256_fingerprint", "station", "issued_at", "confirmed_at", "state",
)  # fmt: skip


@dataclass(frozen=True)
class WorkOrderReport:
    work_order: str
    product: str
    state: str
    planned: int  # the quantity
    issued: int  # devices certified under the order (each counts once, reworked or not); = quota used
    confirmed: int  # current certificates the station confirmed it stored
    pending_confirmation: int  # current certificates issued but not yet confirmed
    in_progress: int  # intents: reserved, not yet signed or stored
    scrapped: int  # devices scrapped (their certificates are to be revoked)
    reworked: int  # certificates superseded by a rework (to be revoked)
    remaining: int  # planned - quota used
    quota_used: int  # work_order.consumed
    consistent: bool  # quota_used equals the count of live 'new' units

    def public(self) -> dict[str, Any]:
        return asdict(self)


def report(journal: Journal, wo_id: str) -> WorkOrderReport:
    def q() -> WorkOrderReport:
        conn = journal.conn
        row = conn.execute(
            "SELECT product, state, quantity, consumed FROM work_order WHERE id=?", (wo_id,)
        ).fetchone()
        if row is None:
            raise ProductionError(f"no work order {wo_id!r}")
        product, state, quantity, consumed = row
        counts: dict[tuple[str, str], int] = {
            (str(k), str(s)): int(n)
            for k, s, n in conn.execute(
                "SELECT u.kind, i.state, COUNT(*) FROM work_order_unit u JOIN issuance i ON i.id = u.issuance_id"
                " WHERE u.work_order = ? AND u.released = 0 GROUP BY u.kind, i.state",
                (wo_id,),
            )
        }

        def n(state_: str, kind: str | None = None) -> int:
            return sum(v for (k, s), v in counts.items() if s == state_ and (kind is None or k == kind))

        new_units = sum(v for (k, _), v in counts.items() if k == "new")
        return WorkOrderReport(
            wo_id, str(product), str(state), int(quantity),
            issued=new_units - n("intent", "new"),
            confirmed=n("confirmed"),
            pending_confirmation=n("issued"),
            in_progress=n("intent"),
            scrapped=n("scrapped"),
            reworked=n("reworked"),
            remaining=int(quantity) - int(consumed),
            quota_used=int(consumed),
            consistent=int(consumed) == new_units,
        )  # fmt: skip

    return journal.call(q)


@dataclass(frozen=True)
class ExportedCertificate:
    cert_serial: str
    device_serial: str
    sha256: str
    station: str
    issued_at: float | None
    confirmed_at: float | None
    state: str
    cert_der: bytes


def certificates(journal: Journal, wo_id: str) -> list[ExportedCertificate]:
    """Every certificate issued under the work order, in issuance order (reworked and scrapped ones included)."""

    def q() -> list[ExportedCertificate]:
        conn = journal.conn
        if conn.execute("SELECT 1 FROM work_order WHERE id=?", (wo_id,)).fetchone() is None:
            raise ProductionError(f"no work order {wo_id!r}")
        rows = conn.execute(
            "SELECT i.cert_serial, i.device_serial, i.station, i.issued_at, i.confirmed_at, i.state, i.cert_der"
            " FROM work_order_unit u JOIN issuance i ON i.id = u.issuance_id"
            " WHERE u.work_order = ? AND u.released = 0 AND i.cert_der IS NOT NULL ORDER BY i.id",
            (wo_id,),
        ).fetchall()
        return [
            ExportedCertificate(s, d, hashlib.sha256(der).hexdigest(), st, ia, ca, state, bytes(der))
            for s, d, st, ia, ca, state, der in rows
        ]

    return journal.call(q)


def export_csv(certs: list[ExportedCertificate]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(EXPORT_COLUMNS)
    for c in certs:
        w.writerow([c.cert_serial, c.device_serial, c.sha256, c.station, iso(c.issued_at) or "",
                    iso(c.confirmed_at) or "", c.state])  # fmt: skip
    return out.getvalue()


def export_pem(certs: list[ExportedCertificate]) -> bytes:
    return b"".join(
        x509.load_der_x509_certificate(c.cert_der).public_bytes(serialization.Encoding.PEM) for c in certs
    )


def quota_problems(journal: Journal) -> list[str]:
    """Cross-check the quota counters against the rows (after a crash, for instance); [] when exact."""

    def q() -> list[str]:
        return check_quota(journal.conn)

    return journal.call(q)


def check_quota(conn: sqlite3.Connection) -> list[str]:
    problems = []
    for wo, consumed, live in conn.execute(
        "SELECT w.id, w.consumed, (SELECT COUNT(*) FROM work_order_unit u WHERE u.work_order = w.id"
        " AND u.kind = 'new' AND u.released = 0) FROM work_order w ORDER BY w.id"
    ):
        if consumed != live:
            problems.append(f"work order {wo}: consumed {consumed} but {live} live unit(s)")
    for uid, state in conn.execute(
        "SELECT u.id, i.state FROM work_order_unit u LEFT JOIN issuance i ON i.id = u.issuance_id"
        " WHERE (u.released = 0 AND (i.id IS NULL OR i.state = 'burned'))"
        " OR (u.released = 1 AND i.state IS NOT 'burned')"
    ):
        problems.append(f"unit {uid}: released flag disagrees with issuance state {state}")
    return problems
