"""The revocation store: which certificates are revoked, when, why and by whom (docs/revocation.md).

One `revocation` row per revoked certificate, never deleted. Revocation is separate from the issuance state
machine: a revoked certificate keeps its issuance row and state. Rows come from

    revoke()            - a supervisor (CLI), audited here, in the same transaction;
    scrap / rework      - SQLite triggers on the `scrap` and `rework` tables (issuance/schema.py) revoke the
                          certificate in the scrap's or rework's own transaction, with reason
                          cessationOfOperation (scrap) or superseded (rework); their audit entries
                          (device.scrap, device.rework) name the supervisor and the certificate serial;
    revoke_in_transaction() - the seam for CMP rr (source 'cmp' or 'upstream'), inside the caller's transaction.

A revocation is final: there is no certificateHold and no removeFromCRL. The only change allowed afterwards is
raising the reason to keyCompromise (with an invalidity date), as RFC 5280 5.3.1 and the CA/B Forum baseline
requirements allow; any other change of reason is refused.

`forwarded_at` stays NULL until the CMP forwarder sends the revocation upstream as rr: `unforwarded()` and
`mark_forwarded()` are its interface.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509

from appliance.errors import BirthlineError, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.production.users import Permission, User

# Who may revoke: a supervisor, as for scrap and rework (docs/revocation.md).


class Reason(enum.StrEnum):
    """RFC 5280 5.3.1 CRLReason, as stored (the RFC's own names). certificateHold, removeFromCRL and
    aACompromise are not offered: revocation here is final, and there are no attribute certificates."""

    UNSPECIFIED = "unspecified"
    KEY_COMPROMISE = "keyCompromise"
    CA_COMPROMISE = "cACompromise"
    AFFILIATION_CHANGED = "affiliationChanged"
    SUPERSEDED = "superseded"
    CESSATION_OF_OPERATION = "cessationOfOperation"
    PRIVILEGE_WITHDRAWN = "privilegeWithdrawn"

    @property
    def flag(self) -> x509.ReasonFlags:
        return _FLAGS[self]

    @classmethod
    def parse(cls, text: str) -> Reason:
        """Accept the RFC name in any case, or with - or _ between words (key-compromise, key_compromise)."""
        wanted = re.sub(r"[-_\s]", "", text).lower()
        for reason in cls:
            if reason.value.lower() == wanted:
                return reason
        names = ", ".join(r.value for r in cls)
        raise RevocationError(f"unknown revocation reason {text!r}; one of: {names}")


_FLAGS = {
    Reason.UNSPECIFIED: x509.ReasonFlags.unspecified,
    Reason.KEY_COMPROMISE: x509.ReasonFlags.key_compromise,
    Reason.CA_COMPROMISE: x509.ReasonFlags.ca_compromise,
    Reason.AFFILIATION_CHANGED: x509.ReasonFlags.affiliation_changed,
    Reason.SUPERSEDED: x509.ReasonFlags.superseded,
    Reason.CESSATION_OF_OPERATION: x509.ReasonFlags.cessation_of_operation,
    Reason.PRIVILEGE_WITHDRAWN: x509.ReasonFlags.privilege_withdrawn,
}


class Source(enum.StrEnum):
    CLI = "cli"
    SCRAP = "scrap"
    REWORK = "rework"
    CMP = "cmp"
    UPSTREAM = "upstream"


class RevocationError(BirthlineError):
    """A revocation was refused: bad selector, unknown certificate, a certificate never released."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.BAD_REQUEST)


@dataclass(frozen=True)
class Revocation:
    cert_serial: str  # lowercase hex, as issuance.cert_serial
    ca: str
    device_serial: str
    reason: Reason
    revoked_at: float
    invalidity_date: float | None
    actor: str
    source: Source
    forwarded_at: float | None
    change_seq: int

    COLUMNS = (
        "r.cert_serial, r.ca, i.device_serial, r.reason, r.revoked_at, r.invalidity_date, r.actor, r.source,"
        " r.forwarded_at, r.change_seq"
    )
    FROM = "revocation r JOIN issuance i ON i.cert_serial = r.cert_serial"

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Revocation:
        serial, ca, device, reason, at, inval, actor, source, fwd, seq = row
        return cls(
            str(serial), str(ca), str(device), Reason(reason), float(at),
            None if inval is None else float(inval), str(actor), Source(source),
            None if fwd is None else float(fwd), int(seq),
        )  # fmt: skip

    @property
    def serial_number(self) -> int:
        return int(self.cert_serial, 16)

    def as_dict(self) -> dict[str, Any]:
        return {
            "cert_serial": self.cert_serial, "ca": self.ca, "device_serial": self.device_serial,
            "reason": self.reason.value, "revoked_at": iso(self.revoked_at),
            "invalidity_date": iso(self.invalidity_date), "actor": self.actor, "source": self.source.value,
        }  # fmt: skip


@dataclass(frozen=True)
class RevokeResult:
    """What one revoke() did. `revoked`: newly revoked; `raised`: reason raised to keyCompromise;
    `already`: revoked before, left as they were; `in_flight`: certificate serials of the selection that were
    being issued at that moment (intent rows) and so could not be revoked: run the command again."""

    revoked: tuple[Revocation, ...] = ()
    raised: tuple[Revocation, ...] = ()
    already: tuple[Revocation, ...] = ()
    in_flight: tuple[str, ...] = field(default=())

    @property
    def changed(self) -> tuple[Revocation, ...]:
        return self.revoked + self.raised

    @property
    def cas(self) -> frozenset[str]:
        """The CAs whose CRL must be regenerated."""
        return frozenset(r.ca for r in self.changed)


def iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def normalise_serial(text: str) -> str:
    """A certificate serial as hex in any usual spelling (0x, colons, spaces, upper case) -> issuance form."""
    cleaned = re.sub(r"[\s:]", "", text.strip()).lower()
    cleaned = cleaned.removeprefix("0x")
    if not cleaned or not re.fullmatch(r"[0-9a-f]{1,64}", cleaned):
        raise RevocationError(f"not a hexadecimal certificate serial: {text[:80]!r}")
    return format(int(cleaned, 16), "x")


def require_revoker(actor: User) -> None:
    actor.require(Permission.REVOKE)


# -- changing ------------------------------------------------------------------------------------------------------
_CERT_STATES = ("issued", "confirmed", "reworked", "scrapped")  # the states with a released certificate


def _targets(
    conn: sqlite3.Connection, device_serial: str | None, cert_serial: str | None, work_order: str | None
) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(cert_serial, ca, device_serial) of released certificates, and the in-flight serials, of the selector."""
    if cert_serial is not None:
        row = conn.execute(
            "SELECT cert_serial, ca, device_serial, state FROM issuance WHERE cert_serial=?", (cert_serial,)
        ).fetchone()
        if row is None:
            raise RevocationError(f"no certificate with serial {cert_serial} was issued here")
        if row[3] == "intent":
            raise RevocationError(f"certificate {cert_serial} is being issued right now; try again")
        if row[3] == "burned":
            raise RevocationError(
                f"serial {cert_serial} was burned: its certificate was never released, so there is nothing"
                " to revoke (OCSP already answers it revoked)"
            )
        return [(str(row[0]), str(row[1]), str(row[2]))], []
    if device_serial is not None:
        rows = conn.execute(
            "SELECT cert_serial, ca, device_serial, state FROM issuance WHERE device_serial=? ORDER BY id",
            (device_serial,),
        ).fetchall()
        what = f"device {device_serial!r}"
    else:
        if not conn.execute("SELECT 1 FROM work_order WHERE id=?", (work_order,)).fetchone():
            raise RevocationError(f"no work order {work_order!r}")
        rows = conn.execute(
            "SELECT i.cert_serial, i.ca, i.device_serial, i.state FROM work_order_unit u"
            " JOIN issuance i ON i.id = u.issuance_id WHERE u.work_order=? ORDER BY i.id",
            (work_order,),
        ).fetchall()
        what = f"work order {work_order!r}"
    released = [(str(s), str(c), str(d)) for s, c, d, state in rows if state in _CERT_STATES]
    in_flight = [str(s) for s, _c, _d, state in rows if state == "intent"]
    if not released and not in_flight:
        raise RevocationError(f"{what} has no issued certificate")
    return released, in_flight


def _load(conn: sqlite3.Connection, cert_serial: str) -> Revocation | None:
    row = conn.execute(
        f"SELECT {Revocation.COLUMNS} FROM {Revocation.FROM} WHERE r.cert_serial=?", (cert_serial,)
    ).fetchone()
    return None if row is None else Revocation.from_row(row)


def revoke_in_transaction(
    conn: sqlite3.Connection,
    audit: AuditSink,
    actor: str,
    targets: Sequence[tuple[str, str, str]],
    reason: Reason,
    source: Source,
    *,
    invalidity_date: float | None = None,
    now: float,
    selector: dict[str, str] | None = None,
    refuse_change: bool = True,
) -> RevokeResult:
    """Revoke (cert_serial, ca, device_serial) targets inside the caller's open transaction, one audit entry
    per change. Authorisation is the caller's (revoke() checks the role; the CMP server checks the rr
    sender). Idempotent: an already revoked certificate gets no second entry. Asking for another reason than
    the recorded one (other than raising it to keyCompromise) is refused when `refuse_change`, else the
    certificate is left as it is and reported in `already` (bulk selectors: a reworked device of a work order
    stays 'superseded')."""
    revoked: list[Revocation] = []
    raised: list[Revocation] = []
    already: list[Revocation] = []
    for serial, ca, device in targets:
        existing = _load(conn, serial)
        data: dict[str, Any] = {
            "cert_serial": serial, "ca": ca, "device_serial": device, "reason": reason.value,
            "invalidity_date": iso(invalidity_date), "source": source.value, **(selector or {}),
        }  # fmt: skip
        if existing is None:
            conn.execute(
                "INSERT INTO revocation (cert_serial, ca, reason, revoked_at, invalidity_date, actor, source)"
                " VALUES (?,?,?,?,?,?,?)",
                (serial, ca, reason.value, now, invalidity_date, actor, source.value),
            )
            audit.append(conn, actor, "cert.revoke", data)
            new = _load(conn, serial)
            assert new is not None
            revoked.append(new)
        elif existing.reason == reason or reason != Reason.KEY_COMPROMISE:
            if existing.reason != reason and refuse_change:
                raise RevocationError(
                    f"certificate {serial} is already revoked ({existing.reason.value}, {iso(existing.revoked_at)});"
                    f" a revocation reason can only be raised to keyCompromise, not changed to {reason.value}"
                )
            already.append(existing)
        else:
            conn.execute(
                "UPDATE revocation SET reason=?, invalidity_date=COALESCE(?, invalidity_date),"
                " reason_changed_at=? WHERE cert_serial=?",
                (reason.value, invalidity_date, now, serial),
            )
            audit.append(
                conn, actor, "cert.revoke-reason", {**data, "previous_reason": existing.reason.value}
            )
            new = _load(conn, serial)
            assert new is not None
            raised.append(new)
    return RevokeResult(tuple(revoked), tuple(raised), tuple(already))


def revoke(
    journal: Journal,
    audit: AuditSink,
    actor: User,
    *,
    device_serial: str | None = None,
    cert_serial: str | None = None,
    work_order: str | None = None,
    reason: Reason | str,
    invalidity_date: float | None = None,
    clock: Callable[[], float] = time.time,
) -> RevokeResult:
    """Revoke the certificate with `cert_serial`, every certificate of `device_serial`, or every certificate
    issued under `work_order` (exactly one of them). Needs a supervisor; audited in the same transaction."""
    require_revoker(actor)
    chosen = [
        (k, v)
        for k, v in (
            ("device_serial", device_serial),
            ("cert_serial", cert_serial),
            ("work_order", work_order),
        )
        if v is not None
    ]
    if len(chosen) != 1:
        raise RevocationError("give exactly one of a device serial, a certificate serial or a work order")
    why = (
        Reason.parse(reason) if isinstance(reason, str) and not isinstance(reason, Reason) else Reason(reason)
    )
    serial = normalise_serial(cert_serial) if cert_serial is not None else None
    now = clock()
    if invalidity_date is not None and invalidity_date > now + 1:
        raise RevocationError("the invalidity date is in the future")
    selector = {f"selected_by_{chosen[0][0]}": str(chosen[0][1])}

    def txn(conn: sqlite3.Connection) -> RevokeResult:
        targets, in_flight = _targets(conn, device_serial, serial, work_order)
        result = revoke_in_transaction(
            conn, audit, actor.name, targets, why, Source.CLI,
            invalidity_date=invalidity_date, now=now, selector=selector, refuse_change=serial is not None,
        )  # fmt: skip
        return RevokeResult(result.revoked, result.raised, result.already, tuple(in_flight))

    result: RevokeResult = journal.call(journal.transaction, txn, f"revoking ({chosen[0][0]} {chosen[0][1]})")
    return result


# -- reading -------------------------------------------------------------------------------------------------------
def get_revocation(journal: Journal, cert_serial: str) -> Revocation | None:
    serial = normalise_serial(cert_serial)
    return journal.call(lambda: _load(journal.conn, serial))


def list_revocations(journal: Journal, ca: str | None = None) -> list[Revocation]:
    def q() -> list[Revocation]:
        rows = journal.conn.execute(
            f"SELECT {Revocation.COLUMNS} FROM {Revocation.FROM} WHERE ?1 IS NULL OR r.ca=?1"
            " ORDER BY r.revoked_at, r.cert_serial",
            (ca,),
        ).fetchall()
        return [Revocation.from_row(r) for r in rows]

    return journal.call(q)


def unforwarded(journal: Journal, limit: int = 100) -> list[Revocation]:
    """Revocations not yet sent upstream as CMP rr, oldest first (the forwarder's outbox)."""

    def q() -> list[Revocation]:
        rows = journal.conn.execute(
            f"SELECT {Revocation.COLUMNS} FROM {Revocation.FROM} WHERE r.forwarded_at IS NULL"
            " AND r.source != 'upstream' ORDER BY r.revoked_at LIMIT ?",
            (limit,),
        ).fetchall()
        return [Revocation.from_row(r) for r in rows]

    return journal.call(q)


def mark_forwarded(journal: Journal, cert_serials: Sequence[str], at: float | None = None) -> None:
    when = time.time() if at is None else at

    def txn(conn: sqlite3.Connection) -> None:
        conn.executemany(
            "UPDATE revocation SET forwarded_at=? WHERE cert_serial=? AND forwarded_at IS NULL",
            [(when, s) for s in cert_serials],
        )

    journal.call(journal.transaction, txn, "marking revocations forwarded")
