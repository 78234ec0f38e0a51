"""Reconciliation: what a work order planned against what the journal shows, and the certificate export
manufacturers hand to their customers. Every number is counted from the rows a unit is bound to (`issuance`,
or `ra_request` for a product in RA mode), not from counters.

Revocation is part of every figure: the report counts revoked certificates by reason, the CSV gives each one's
reason and time and never a good state (`issued`, `confirmed`) to a revoked certificate, and the PEM list a brand
owner loads into an allowlist holds only certificates that are not revoked."""

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
    "issued_by", "revocation_reason", "revoked_at",
)  # fmt: skip
# The states of a certificate in service; a revoked one is exported as `revoked` instead (reworked and scrapped
# ones keep those names: they are revoked by definition, and the CSV says with which reason and when).
GOOD_STATES = ("issued", "confirmed")


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
    upstream_pending: int  # RA mode: authorised and counted, the upstream CA has not issued yet
    scrapped: int  # devices scrapped (their certificates are to be revoked)
    reworked: int  # certificates superseded by a rework (to be revoked)
    revoked: (
        int  # certificates of the order revoked now, whatever their state (scrapped and reworked included)
    )
    revoked_by_reason: dict[str, int]  # those, by RFC 5280 reason
    last_revoked_at: str | None  # ISO 8601 UTC: the latest of their revocations
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
                # A revoked certificate is neither confirmed nor pending confirmation: it is counted as revoked
                # (as the CSV export shows it), whatever its station did.
                "SELECT u.kind, CASE WHEN i.state IN ('issued', 'confirmed') AND EXISTS (SELECT 1 FROM revocation r"
                " WHERE r.cert_serial = i.cert_serial) THEN 'revoked' ELSE i.state END AS shown, COUNT(*)"
                " FROM work_order_unit u JOIN issuance i ON i.id = u.issuance_id"
                " WHERE u.work_order = ? AND u.released = 0 GROUP BY u.kind, shown",
                (wo_id,),
            )
        }
        # RA mode: the upstream's certificates count like local ones; 'pending' is its own column.
        for k, s, c in conn.execute(
            "SELECT u.kind, a.state, COUNT(*) FROM work_order_unit u JOIN ra_request a ON a.id = u.ra_request_id"
            " WHERE u.work_order = ? AND u.released = 0 GROUP BY u.kind, a.state",
            (wo_id,),
        ):
            key = (str(k), "ra-pending" if s == "pending" else str(s))
            counts[key] = counts.get(key, 0) + int(c)

        def n(state_: str, kind: str | None = None) -> int:
            return sum(v for (k, s), v in counts.items() if s == state_ and (kind is None or k == kind))

        new_units = sum(v for (k, _), v in counts.items() if k == "new")
        by_reason: dict[str, int] = {}
        last: float | None = None
        for reason, c, at in conn.execute(
            "SELECT r.reason, COUNT(*), MAX(r.revoked_at) FROM work_order_unit u"
            " JOIN issuance i ON i.id = u.issuance_id JOIN revocation r ON r.cert_serial = i.cert_serial"
            " WHERE u.work_order = ? AND u.released = 0 GROUP BY r.reason ORDER BY r.reason",
            (wo_id,),
        ):
            by_reason[str(reason)] = int(c)
            last = float(at) if last is None else max(last, float(at))
        return WorkOrderReport(
            wo_id, str(product), str(state), int(quantity),
            issued=new_units - n("intent", "new") - n("ra-pending", "new"),
            confirmed=n("confirmed"),
            pending_confirmation=n("issued"),
            in_progress=n("intent"),
            upstream_pending=n("ra-pending"),
            scrapped=n("scrapped"),
            reworked=n("reworked"),
            revoked=sum(by_reason.values()),
            revoked_by_reason=by_reason,
            last_revoked_at=iso(last),
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
    issued_by: str = "local"  # local: this appliance's issuing CA; upstream: the upstream CA (RA mode)
    revocation_reason: str | None = None  # RFC 5280 reason when revoked
    revoked_at: float | None = None

    @property
    def revoked(self) -> bool:
        return self.revocation_reason is not None

    @property
    def shown_state(self) -> str:
        """The state a customer reads: never a good one for a revoked certificate."""
        return "revoked" if self.revoked and self.state in GOOD_STATES else self.state


def certificates(journal: Journal, wo_id: str) -> list[ExportedCertificate]:
    """Every certificate issued under the work order, in issuance order (reworked, scrapped and revoked ones
    included), each with its revocation if it has one."""

    def q() -> list[ExportedCertificate]:
        conn = journal.conn
        if conn.execute("SELECT 1 FROM work_order WHERE id=?", (wo_id,)).fetchone() is None:
            raise ProductionError(f"no work order {wo_id!r}")
        # A key update takes no unit: it counts under the work order of the certificate it replaced, so each
        # unit's certificate is followed along issuance.updates (work_order_of, the other way round).
        rows = conn.execute(
            "WITH RECURSIVE chain(id, unit, depth) AS (SELECT u.issuance_id, u.id, 0 FROM work_order_unit u"
            " WHERE u.work_order = ?1 AND u.released = 0 AND u.issuance_id IS NOT NULL"
            " UNION ALL SELECT i.id, c.unit, c.depth + 1 FROM issuance i JOIN chain c ON i.updates = c.id"
            " WHERE c.depth < 10000)"
            " SELECT i.cert_serial, i.device_serial, i.station, i.issued_at, i.confirmed_at, i.state, i.cert_der,"
            " 'local', c.unit, r.reason, r.revoked_at, c.depth FROM chain c JOIN issuance i ON i.id = c.id"
            " LEFT JOIN revocation r ON r.cert_serial = i.cert_serial WHERE i.cert_der IS NOT NULL"
            " UNION ALL SELECT a.cert_serial, a.device_serial, a.station, a.issued_at, a.confirmed_at, a.state,"
            " a.cert_der, 'upstream', u.id, NULL, NULL, 0 FROM work_order_unit u JOIN ra_request a"
            " ON a.id = u.ra_request_id WHERE u.work_order = ?1 AND u.released = 0 AND a.cert_der IS NOT NULL"
            " ORDER BY 9, 12",
            (wo_id,),
        ).fetchall()
        return [
            ExportedCertificate(
                s,
                d,
                hashlib.sha256(der).hexdigest(),
                st,
                ia,
                ca,
                state,
                bytes(der),
                by,
                reason,
                None if at is None else float(at),
            )
            for s, d, st, ia, ca, state, der, by, _, reason, at, _ in rows
        ]

    return journal.call(q)


# A spreadsheet evaluates a cell that starts with one of these as a formula (OWASP "CSV Injection"; ASVS 5.0
# 1.2.10 adds NUL). Device serials are PrintableString, which allows '=', '+' and '-' first.
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "\n", "\0")
# ... and the quote itself, so that a value that really starts with one (PrintableString allows it) reads back
# unambiguously: strip one leading quote from every cell that has one.
_NEUTRALISED = (*FORMULA_STARTS, "'")


def spreadsheet_safe(value: str) -> str:
    """The OWASP neutralisation: a cell that a spreadsheet would read as a formula gets a leading single quote,
    which spreadsheets take as "this is text" (the csv module's RFC 4180 quoting then escapes quotes and
    separators). A value that starts with a quote gets one more, so every cell reads back by removing one leading
    quote when it has one."""
    return "'" + value if value.startswith(_NEUTRALISED) else value


def whole_bytes(serial_hex: str) -> str:
    """A serial as `openssl x509 -serial` prints it: upper-case hex in whole bytes, so a leading zero is kept (the
    journal's form, lower-case without leading zeros, reads one digit shorter for one certificate in 16)."""
    digits = serial_hex.upper()
    return "0" * (len(digits) % 2) + digits


def export_csv(certs: list[ExportedCertificate]) -> str:
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(EXPORT_COLUMNS)
    for c in certs:
        row = [whole_bytes(c.cert_serial), c.device_serial, c.sha256, c.station, iso(c.issued_at) or "",
               iso(c.confirmed_at) or "", c.shown_state, c.issued_by, c.revocation_reason or "",
               iso(c.revoked_at) or ""]  # fmt: skip
        w.writerow([spreadsheet_safe(cell) for cell in row])
    return out.getvalue()


def export_pem(certs: list[ExportedCertificate]) -> bytes:
    """The certificates in service, for a brand owner's allowlist: revoked, reworked and scrapped ones are left
    out (the CSV lists them with their reason)."""
    return b"".join(
        x509.load_der_x509_certificate(c.cert_der).public_bytes(serialization.Encoding.PEM)
        for c in certs
        if c.state in GOOD_STATES and not c.revoked
    )


def revocation_summary(journal: Journal) -> dict[str, Any]:
    """Every revocation in the journal: how many, by reason and by source, and the latest (`journal stats`)."""

    def q() -> dict[str, Any]:
        conn = journal.conn
        by_reason = dict(conn.execute(
            "SELECT reason, COUNT(*) FROM revocation GROUP BY reason ORDER BY reason").fetchall())  # fmt: skip
        by_source = dict(conn.execute(
            "SELECT source, COUNT(*) FROM revocation GROUP BY source ORDER BY source").fetchall())  # fmt: skip
        last = conn.execute("SELECT MAX(revoked_at) FROM revocation").fetchone()[0]
        return {"total": sum(by_reason.values()), "by_reason": by_reason, "by_source": by_source,
                "last_revoked_at": iso(last)}  # fmt: skip

    return journal.call(q)


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
    # A unit is live while its issuance (or RA-mode request) is; released exactly when that was burned (failed).
    for uid, state in conn.execute(
        "SELECT u.id, COALESCE(i.state, a.state) FROM work_order_unit u"
        " LEFT JOIN issuance i ON i.id = u.issuance_id LEFT JOIN ra_request a ON a.id = u.ra_request_id"
        " WHERE (u.released = 0 AND (COALESCE(i.state, a.state) IS NULL OR i.state = 'burned' OR a.state = 'failed'))"
        " OR (u.released = 1 AND NOT (i.state IS 'burned' OR a.state IS 'failed'))"
    ):
        problems.append(f"unit {uid}: released flag disagrees with issuance state {state}")
    return problems
