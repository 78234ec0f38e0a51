"""SCEP challenge passwords: made by a supervisor, audited, kept only as their SHA-256 (journal table
scep_challenge).

A challenge belongs to one SCEP label (so to that label's station, its line and work orders) and is one of:
- a device challenge (`device_serial`): good for that device only, and one-time: its first use binds it to the
  public key of that request, and from then on it serves only that key (a client repeating its request gets
  the same answer; another key is refused). Optionally limited to one work order as well;
- a work-order challenge (`work_order`): good for any device of that work order (its allowlist and quota
  decide which and how many), the device serial taken from the request's subject; for a fixture that enrols
  a run.
Both expire (`valid_s`, at most a year) and can be revoked. The password is 128 random bits as 32 hex digits,
shown once when it is made: hex survives every client's encoding of challengePassword (PrintableString).

Functions named `*_txn` run on the journal thread inside a transaction (`Journal.atransaction`).
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance import names
from appliance.errors import ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.production.users import Permission, User
from appliance.scep.errors import FailInfo, ScepError

SECRET_BYTES = 16
DEFAULT_VALID_S = 7 * 86400.0
MAX_VALID_S = 365 * 86400.0
MAX_SECRET_CHARS = 255  # RFC 2985 ub-challengePassword

_COLUMNS = (
    "id, label, device_serial, work_order, created_by, created_at, expires_at, revoked_by, revoked_at,"
    " used_key_sha256, first_used_at, last_used_at, uses"
)


class ChallengeError(ScepError):
    """A challenge cannot be made, revoked or used as asked."""

    def __init__(self, message: str, code: ReasonCode = ReasonCode.NOT_AUTHORISED) -> None:
        super().__init__(message, FailInfo.BAD_REQUEST, code)


@dataclass(frozen=True)
class Challenge:
    id: int
    label: str
    device_serial: str | None
    work_order: str | None
    created_by: str
    created_at: float
    expires_at: float
    revoked_by: str | None
    revoked_at: float | None
    used_key_sha256: bytes | None
    first_used_at: float | None
    last_used_at: float | None
    uses: int

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Challenge:
        return cls(*row)

    @property
    def kind(self) -> str:
        return "device" if self.device_serial is not None else "work-order"

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if now >= self.expires_at:
            return "expired"
        if self.device_serial is not None and self.used_key_sha256 is not None:
            return "used"
        return "active"


@dataclass(frozen=True)
class Claim:
    """A challenge a request may use: whom it is for, and where from."""

    challenge: int
    device_serial: str
    work_order: str | None
    bound: bool = False  # this request bound the device challenge to its key (release() undoes it)


def secret_sha256(secret: bytes) -> bytes:
    return hashlib.sha256(secret.strip()).digest()


# -- a supervisor's changes ---------------------------------------------------------------------------------------
def add(
    journal: Journal, audit: AuditSink, actor: User, label: str, *, device_serial: str | None = None,
    work_order: str | None = None, valid_s: float = DEFAULT_VALID_S, clock: Callable[[], float] = time.time,
) -> tuple[Challenge, str]:  # fmt: skip
    """Make a challenge; returns it and its password (shown once: only its hash is kept)."""
    actor.require(Permission.WORK_ORDER)
    names.SCEP_LABEL.check(label)
    if device_serial is None and work_order is None:
        raise ChallengeError("a challenge is for a device (--device) or a work order (--work-order), or both")
    if device_serial is not None:
        names.DEVICE_SERIAL.check(device_serial)
    if work_order is not None:
        names.WORK_ORDER_ID.check(work_order)
    if not 60 <= valid_s <= MAX_VALID_S:
        raise ChallengeError(f"a challenge is valid for 60 s to {MAX_VALID_S / 86400:g} days")
    secret = secrets.token_hex(SECRET_BYTES)
    now = clock()

    def txn(conn: sqlite3.Connection) -> Challenge:
        if work_order is not None:
            row = conn.execute("SELECT state FROM work_order WHERE id=?", (work_order,)).fetchone()
            if row is None:
                raise ChallengeError(f"no work order {work_order!r}")
            if row[0] == "closed":
                raise ChallengeError(f"work order {work_order!r} is closed")
        cur = conn.execute(
            "INSERT INTO scep_challenge (label, secret_sha256, device_serial, work_order, created_by, created_at,"
            " expires_at) VALUES (?,?,?,?,?,?,?)",
            (
                label,
                secret_sha256(secret.encode()),
                device_serial,
                work_order,
                actor.name,
                now,
                now + valid_s,
            ),
        )
        challenge_id = int(cur.lastrowid or 0)
        audit.append(conn, actor.name, "scep.challenge-added", {
            "challenge": challenge_id, "label": label, "device_serial": device_serial, "work_order": work_order,
            "expires_at": now + valid_s,
        })  # fmt: skip
        return _get(conn, challenge_id)

    return journal.call(lambda: journal.transaction(txn, "adding a SCEP challenge")), secret


def revoke(
    journal: Journal,
    audit: AuditSink,
    actor: User,
    challenge_id: int,
    *,
    clock: Callable[[], float] = time.time,
) -> Challenge:
    actor.require(Permission.WORK_ORDER)

    def txn(conn: sqlite3.Connection) -> Challenge:
        found = _get(conn, challenge_id)
        if found.revoked_at is not None:
            raise ChallengeError(f"challenge {challenge_id} was revoked already")
        conn.execute(
            "UPDATE scep_challenge SET revoked_by=?, revoked_at=? WHERE id=?",
            (actor.name, clock(), challenge_id),
        )
        audit.append(
            conn, actor.name, "scep.challenge-revoked", {"challenge": challenge_id, "label": found.label}
        )
        return _get(conn, challenge_id)

    return journal.call(lambda: journal.transaction(txn, "revoking a SCEP challenge"))


def _get(conn: sqlite3.Connection, challenge_id: int) -> Challenge:
    row = conn.execute(f"SELECT {_COLUMNS} FROM scep_challenge WHERE id=?", (challenge_id,)).fetchone()
    if row is None:
        raise ChallengeError(f"no SCEP challenge {challenge_id}")
    return Challenge.from_row(tuple(row))


def list_challenges(journal: Journal) -> list[Challenge]:
    def q() -> list[Challenge]:
        try:
            rows = journal.conn.execute(f"SELECT {_COLUMNS} FROM scep_challenge ORDER BY id").fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []  # a journal no SCEP-aware version has written: no challenge was ever made
            raise
        return [Challenge.from_row(tuple(r)) for r in rows]

    return journal.call(q)


# -- a request using one ------------------------------------------------------------------------------------------
def claim_txn(
    conn: sqlite3.Connection, audit: AuditSink, label: str, secret: bytes, key_sha256: bytes, named: str | None,
    now: float,
) -> Claim:  # fmt: skip
    """Use the challenge `secret` on `label` for a request with public key `key_sha256` whose subject names device
    `named` (None: names none). ChallengeError says why not; binding a device challenge is audited in the same
    transaction."""
    if not secret or len(secret) > MAX_SECRET_CHARS:
        raise ChallengeError("the request carries no usable challenge password")
    row = conn.execute(
        f"SELECT {_COLUMNS} FROM scep_challenge WHERE secret_sha256=? AND label=?",
        (secret_sha256(secret), label),
    ).fetchone()
    if row is None:
        raise ChallengeError("the challenge password is not one of this SCEP label's")
    found = Challenge.from_row(tuple(row))
    state = found.state(now)
    if state == "revoked":
        raise ChallengeError(f"challenge {found.id} was revoked")
    if state == "expired":
        raise ChallengeError(f"challenge {found.id} has expired")
    device = found.device_serial
    if device is not None:
        if found.used_key_sha256 is not None and found.used_key_sha256 != key_sha256:
            raise ChallengeError(f"challenge {found.id} was used already, by another key (it is one-time)")
        if named is not None and named != device:
            raise ChallengeError(f"challenge {found.id} is for device {device!r}, the request names another")
    elif named is None:
        raise ChallengeError(
            f"challenge {found.id} is for work order {found.work_order!r}: the request's subject must name the"
            " device", ReasonCode.BAD_DEVICE_SERIAL,
        )  # fmt: skip
    else:
        device = named
    conn.execute(
        "UPDATE scep_challenge SET used_key_sha256 = CASE WHEN device_serial IS NULL THEN NULL"
        " ELSE COALESCE(used_key_sha256, ?) END, first_used_at = COALESCE(first_used_at, ?), last_used_at = ?,"
        " uses = uses + 1 WHERE id = ?",
        (key_sha256, now, now, found.id),
    )
    if found.device_serial is not None and found.used_key_sha256 is None:
        # Audited when a device challenge is bound to its key, once: a client repeating its request (or a peer
        # replaying it) changes nothing, so it adds nothing to the append-only log. A work-order challenge is
        # counted (uses, last_used_at); the core audits each issuance under the label's station.
        audit.append(conn, f"scep:{label}", "scep.challenge-used", {
            "challenge": found.id, "device_serial": device, "public_key_sha256": key_sha256.hex(),
        })  # fmt: skip
    return Claim(found.id, device, found.work_order,
                 bound=found.device_serial is not None and found.used_key_sha256 is None)  # fmt: skip


def release_txn(
    conn: sqlite3.Connection, audit: AuditSink, label: str, claim: Claim, key_sha256: bytes, reason: str
) -> None:
    """Undo the binding `claim` made (the core refused the request: nothing was issued for that key), so that the
    device's next request, with a key the core takes, can use the challenge. Only while still bound to that key;
    audited."""
    cur = conn.execute(
        "UPDATE scep_challenge SET used_key_sha256 = NULL WHERE id = ? AND used_key_sha256 = ?",
        (claim.challenge, key_sha256),
    )
    if cur.rowcount:
        audit.append(conn, f"scep:{label}", "scep.challenge-released", {
            "challenge": claim.challenge, "device_serial": claim.device_serial,
            "public_key_sha256": key_sha256.hex(), "reason": reason,
        })  # fmt: skip
