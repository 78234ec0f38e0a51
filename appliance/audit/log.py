"""Appending to the audit log, and signing its head in the HSM.

Fail closed: AuditLog.append raises AuditError (ReasonCode.AUDIT_UNAVAILABLE) when the entry cannot be written.
It runs inside the caller's transaction, so the caller's transaction rolls back with it: an issuance whose
audit entry cannot be written does not happen. Callers must let AuditError propagate (never catch and go on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import sqlite3
import time as _time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.audit.claims import (
    EVENT_CHECKPOINT,
    REASON_ON_DEMAND,
    CheckpointPolicy,
    claim_data,
)
from appliance.audit.encoding import (
    AUDIT_CURVE,
    GENESIS_HASH,
    canonical_json,
    checkpoint_message,
    entry_hash,
    key_fingerprint,
    spki_der,
)
from appliance.errors import IssuanceFailed, ReasonCode
from appliance.issuance.journal import Journal
from hsm.algorithms import KeyAlgorithm
from hsm.keys import HsmEcPrivateKey
from hsm.token import Token

log = logging.getLogger(__name__)

AUDIT_KEY_LABEL = "audit"
EVENT_RE = re.compile(r"[a-z][a-z0-9_.:-]{0,63}")

# Events the audit package itself writes (and EVENT_CHECKPOINT, in claims.py).
EVENT_KEY_REGISTERED = "audit.key-registered"

# The last claim, through the partial index audit_claims (schema.py): the literal must match the index's WHERE.
_LAST_CLAIM = f"SELECT max(seq) FROM audit WHERE event = '{EVENT_CHECKPOINT}'"
_CHECKPOINT_ROUNDS = 4  # a leftover unsigned claim, then our own: more means writers racing without end


class AuditError(IssuanceFailed):
    """The audit log cannot be written (or read to be extended). Fail closed: stop issuing.

    A BirthlineError (through IssuanceFailed, "the appliance could not complete the request") whose code is
    always ReasonCode.AUDIT_UNAVAILABLE.
    """

    def __init__(self, message: str, details: Mapping[str, Any] | None = None) -> None:
        super().__init__(message, ReasonCode.AUDIT_UNAVAILABLE, dict(details or {}))


@dataclass(frozen=True)
class AuditEntry:
    seq: int
    time: float
    actor: str
    event: str
    data: str  # canonical JSON text, exactly as hashed
    prev_hash: bytes
    hash: bytes

    COLUMNS = "seq, time, actor, event, data, prev_hash, hash"

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> AuditEntry:
        return cls(
            int(row[0]), float(row[1]), str(row[2]), str(row[3]), str(row[4]), bytes(row[5]), bytes(row[6])
        )

    def computed_hash(self) -> bytes:
        return entry_hash(self.seq, self.time, self.actor, self.event, self.data, self.prev_hash)


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    head_hash: bytes
    time: float
    key_label: str
    # DER ECDSA over checkpoint_message(seq, head_hash). Entry seq is the audit.checkpoint claim it signs (in
    # journals from before claims, any entry: docs/audit.md "Logs from before claims").
    signature: bytes

    COLUMNS = "seq, head_hash, time, key_label, signature"

    @classmethod
    def from_row(cls, row: tuple[Any, ...]) -> Checkpoint:
        return cls(int(row[0]), bytes(row[1]), float(row[2]), str(row[3]), bytes(row[4]))

    def message(self) -> bytes:
        return checkpoint_message(self.seq, self.head_hash)

    def verifies_with(self, public_key: ec.EllipticCurvePublicKey) -> bool:
        try:
            public_key.verify(self.signature, self.message(), ec.ECDSA(hashes.SHA256()))
        except (InvalidSignature, ValueError):
            return False
        return True


Head = tuple[int, bytes]  # (seq, hash); (0, 32 zero bytes) for an empty log


@dataclass(frozen=True)
class _ClaimStep:
    done: Checkpoint | None  # the head is already a signed claim
    seq: int = 0  # else: the claim to sign
    head_hash: bytes = b""
    new: bool = False  # appended now (False: a claim an earlier run left unsigned)


def ensure_audit_key(token: Token, label: str = AUDIT_KEY_LABEL) -> HsmEcPrivateKey:
    """The audit signing key (EC P-256) in the HSM, generated on first use. Separate from every CA key."""
    key = token.get_key(label) if token.has_key(label) else token.generate_key(label, KeyAlgorithm.EC_P256)
    if not isinstance(key, HsmEcPrivateKey) or not isinstance(key.curve, AUDIT_CURVE):
        raise AuditError(f"HSM key {label!r} is not an EC P-256 key; it cannot be the audit key")
    return key


def _key_label(key: ec.EllipticCurvePrivateKey, label: str | None) -> str:
    if label is not None:
        return label
    found = getattr(key, "label", None)
    return found if isinstance(found, str) else AUDIT_KEY_LABEL


class AuditLog:
    """The hash-chained audit log in the journal's SQLite file.

    The head is re-read from the table on every append (one B-tree descent to the last row of the rowid
    table: see docs/audit.md, "Cost"), so a rolled-back transaction or savepoint, or another process appending
    to the same file, can never leave an in-memory copy ahead of or behind the table.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        clock: Callable[[], float] = _time.time,
        policy: CheckpointPolicy | None = None,
    ) -> None:
        self.journal = journal
        self.clock = clock
        self.policy = policy or CheckpointPolicy()  # stated in the claims this object writes
        self._watch: tuple[int, Callable[[], None]] | None = None

    def watch(self, seq: int | None, callback: Callable[[], None] = lambda: None) -> None:
        """Call `callback` once, on the journal thread inside the appending transaction, when an append reaches
        `seq` (None: stop watching). The checkpointer's nudge: it must only schedule work, never block or raise.
        One integer comparison per append, so a busy log is signed when due rather than at the next poll."""
        self._watch = None if seq is None else (seq, callback)

    # -- appending (journal thread, inside the caller's transaction) ----------------------------------------------
    def append(self, conn: sqlite3.Connection, actor: str, event: str, data: Mapping[str, Any]) -> AuditEntry:
        """Append one entry inside the caller's open transaction (on the journal thread).

        The entry commits or rolls back with the caller's transaction. `actor` and every value in `data` are
        stored as data only; nothing from them is ever interpreted. Raises AuditError (fail closed).
        """
        if not conn.in_transaction:
            raise AuditError("audit append outside a transaction: the entry would not commit with its cause")
        if not isinstance(event, str) or not EVENT_RE.fullmatch(event):
            raise AuditError("invalid audit event name", {"event": repr(event)[:80]})
        if not isinstance(actor, str) or not actor:
            raise AuditError("the audit actor must be a non-empty string")
        try:
            text = canonical_json(data)
            actor.encode("utf-8")  # lone surrogates cannot be hashed as UTF-8: refuse rather than mangle
        except (TypeError, ValueError) as exc:
            raise AuditError(f"audit data for {event} cannot be encoded: {type(exc).__name__}") from exc
        now = float(self.clock())
        if not math.isfinite(now):
            raise AuditError("the clock returned a non-finite time")
        try:
            row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
            seq, prev = (1, GENESIS_HASH) if row is None else (int(row[0]) + 1, bytes(row[1]))
            digest = entry_hash(seq, now, actor, event, text, prev)
            conn.execute(
                "INSERT INTO audit (seq, time, actor, event, data, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
                (seq, now, actor, event, text, prev, digest),
            )
        except sqlite3.Error as exc:
            raise AuditError(f"audit log cannot be written: {exc}", {"event": event}) from exc
        watch = self._watch
        if watch is not None and seq >= watch[0]:
            self._watch = None
            try:
                watch[1]()
            except Exception:  # a wake-up must never cost the caller its transaction
                log.exception("audit: waking the checkpointer failed; it signs at its next poll")
        return AuditEntry(seq, now, actor, event, text, prev, digest)

    def record(self, actor: str, event: str, data: Mapping[str, Any]) -> AuditEntry:
        """Append a standalone event (login, configuration change) in its own transaction."""
        return self.journal.call(self._record, actor, event, data)

    async def arecord(self, actor: str, event: str, data: Mapping[str, Any]) -> AuditEntry:
        return await self.journal.acall(self._record, actor, event, data)

    def _record(self, actor: str, event: str, data: Mapping[str, Any]) -> AuditEntry:
        with _write_errors():
            return self.journal.transaction(
                lambda conn: self.append(conn, actor, event, data), "recording an audit event"
            )

    # -- reading ---------------------------------------------------------------------------------------------------
    def head(self) -> Head:
        return self.journal.call(self._head)

    async def ahead(self) -> Head:
        return await self.journal.acall(self._head)

    def _head(self) -> Head:
        try:
            row = self.journal.conn.execute(
                "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1"
            ).fetchone()
        except sqlite3.Error as exc:
            raise AuditError(f"audit log cannot be read: {exc}") from exc
        return (0, GENESIS_HASH) if row is None else (int(row[0]), bytes(row[1]))

    def entries(self, start: int = 1, limit: int | None = None) -> list[AuditEntry]:
        def q() -> list[AuditEntry]:
            cur = self.journal.conn.execute(
                f"SELECT {AuditEntry.COLUMNS} FROM audit WHERE seq >= ? ORDER BY seq LIMIT ?",
                (start, -1 if limit is None else limit),
            )
            return [AuditEntry.from_row(r) for r in cur.fetchall()]

        return self.journal.call(q)

    def last_checkpoint(self) -> Checkpoint | None:
        return self.journal.call(self._last_checkpoint)

    async def alast_checkpoint(self) -> Checkpoint | None:
        return await self.journal.acall(self._last_checkpoint)

    def _last_checkpoint(self) -> Checkpoint | None:
        row = self.journal.conn.execute(
            f"SELECT {Checkpoint.COLUMNS} FROM audit_checkpoint ORDER BY seq DESC LIMIT 1"
        ).fetchone()
        return None if row is None else Checkpoint.from_row(row)

    def public_keys(self) -> dict[str, bytes]:
        """label -> SubjectPublicKeyInfo DER of every audit key recorded in the journal."""
        return self.journal.call(
            lambda: {
                str(r[0]): bytes(r[1])
                for r in self.journal.conn.execute("SELECT label, public_key FROM audit_key ORDER BY label")
            }
        )

    # -- checkpoints -----------------------------------------------------------------------------------------------
    def checkpoint(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        label: str | None = None,
        actor: str = "appliance",
        reason: str = REASON_ON_DEMAND,
        policy: CheckpointPolicy | None = None,
    ) -> Checkpoint:
        """Sign the log: append an audit.checkpoint claim (as `actor`), sign that entry in the HSM, store the
        signature. Returns the stored checkpoint; when the head is already a signed claim, that one.

        On first use the key's public half is recorded (table audit_key, plus an audit entry), so `verify` needs
        no HSM. A claim an earlier run left unsigned (a crash between claim and signature) is signed first. Call
        from any thread except the journal thread (the signature is made on the PKCS#11 thread).
        """
        label = _key_label(key, label)
        spki = spki_der(key.public_key())
        self.journal.call(self._register_key, label, spki)
        claim = self._claim_txn(label, key_fingerprint(spki), actor, reason, policy or self.policy)
        for _ in range(_CHECKPOINT_ROUNDS):
            with _write_errors():
                step: _ClaimStep = self.journal.call(
                    self.journal.transaction, claim, "claiming an audit checkpoint"
                )
            if step.done is not None:
                return step.done
            message = checkpoint_message(step.seq, step.head_hash)
            signature = key.sign(message, ec.ECDSA(hashes.SHA256()))
            cp = self._signed(key, label, step.seq, step.head_hash, signature)
            with _write_errors():
                stored: Checkpoint = self.journal.call(
                    self.journal.transaction, self._store_txn(cp), "storing an audit checkpoint"
                )
            if step.new:
                return stored
        raise AuditError("no audit checkpoint: earlier claims kept appearing unsigned")

    async def acheckpoint(
        self,
        key: ec.EllipticCurvePrivateKey,
        *,
        label: str | None = None,
        actor: str = "appliance",
        reason: str = REASON_ON_DEMAND,
        policy: CheckpointPolicy | None = None,
    ) -> Checkpoint:
        """checkpoint() for the event loop: journal work on the journal thread, the signature on the HSM's."""
        label = _key_label(key, label)
        spki = spki_der(key.public_key())
        await self.journal.acall(self._register_key, label, spki)
        claim = self._claim_txn(label, key_fingerprint(spki), actor, reason, policy or self.policy)
        for _ in range(_CHECKPOINT_ROUNDS):
            with _write_errors():
                step: _ClaimStep = await self.journal.acall(
                    self.journal.transaction, claim, "claiming an audit checkpoint"
                )
            if step.done is not None:
                return step.done
            message = checkpoint_message(step.seq, step.head_hash)
            if isinstance(key, HsmEcPrivateKey):
                (signature,) = await key.asign_many([message])  # P-256: ECDSA with SHA-256, verified by hsm
            else:
                signature = await asyncio.to_thread(key.sign, message, ec.ECDSA(hashes.SHA256()))
            cp = self._signed(key, label, step.seq, step.head_hash, signature)
            with _write_errors():
                stored: Checkpoint = await self.journal.acall(
                    self.journal.transaction, self._store_txn(cp), "storing an audit checkpoint"
                )
            if step.new:
                return stored
        raise AuditError("no audit checkpoint: earlier claims kept appearing unsigned")

    def _signed(
        self, key: ec.EllipticCurvePrivateKey, label: str, seq: int, head_hash: bytes, signature: bytes
    ) -> Checkpoint:
        cp = Checkpoint(seq, head_hash, float(self.clock()), label, signature)
        if not cp.verifies_with(key.public_key()):
            raise AuditError(f"the audit key {label!r} returned a checkpoint signature that does not verify")
        return cp

    def _claim_txn(
        self, label: str, key_sha256: bytes, actor: str, reason: str, policy: CheckpointPolicy
    ) -> Callable[[sqlite3.Connection], _ClaimStep]:
        """What to sign next. Claims are appended only while every earlier claim has its signature stored (a
        leftover unsigned claim is returned to be signed first), so a claim without a signature can only be the
        last one in an untampered log: the rule verify relies on, whichever processes checkpoint concurrently."""

        def txn(conn: sqlite3.Connection) -> _ClaimStep:
            last = conn.execute(_LAST_CLAIM).fetchone()[0]
            if last is not None:
                row = conn.execute(
                    f"SELECT {Checkpoint.COLUMNS} FROM audit_checkpoint WHERE seq=?", (last,)
                ).fetchone()
                if row is None:
                    (digest,) = conn.execute("SELECT hash FROM audit WHERE seq=?", (last,)).fetchone()
                    return _ClaimStep(None, int(last), bytes(digest), new=False)
                (head,) = conn.execute("SELECT max(seq) FROM audit").fetchone()
                if head == last:
                    return _ClaimStep(Checkpoint.from_row(row))  # the head is signed: nothing to do
            entry = self.append(conn, actor, EVENT_CHECKPOINT, claim_data(label, key_sha256, policy, reason))
            return _ClaimStep(None, entry.seq, entry.hash, new=True)

        return txn

    def _store_txn(self, cp: Checkpoint) -> Callable[[sqlite3.Connection], Checkpoint]:
        def txn(conn: sqlite3.Connection) -> Checkpoint:
            existing = conn.execute(
                f"SELECT {Checkpoint.COLUMNS} FROM audit_checkpoint WHERE seq=?", (cp.seq,)
            ).fetchone()
            if existing is not None:
                return Checkpoint.from_row(
                    existing
                )  # another process signed this claim; keep the first signature
            row = conn.execute("SELECT hash, event FROM audit WHERE seq=?", (cp.seq,)).fetchone()
            if row is None or bytes(row[0]) != cp.head_hash or row[1] != EVENT_CHECKPOINT:
                raise AuditError(f"audit entry {cp.seq} changed while its checkpoint was being signed")
            conn.execute(
                f"INSERT INTO audit_checkpoint ({Checkpoint.COLUMNS}) VALUES (?,?,?,?,?)",
                (cp.seq, cp.head_hash, cp.time, cp.key_label, cp.signature),
            )
            return cp

        return txn

    def _register_key(self, label: str, spki: bytes) -> None:
        def txn(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT public_key FROM audit_key WHERE label=?", (label,)).fetchone()
            if row is not None:
                if bytes(row[0]) != spki:
                    raise AuditError(
                        f"HSM key {label!r} is not the audit key recorded in the journal"
                        f" (recorded {key_fingerprint(bytes(row[0])).hex()}, HSM {key_fingerprint(spki).hex()})"
                    )
                return
            conn.execute(
                "INSERT INTO audit_key (label, public_key, created_at) VALUES (?,?,?)",
                (label, spki, float(self.clock())),
            )
            self.append(
                conn,
                "appliance",
                EVENT_KEY_REGISTERED,
                {"label": label, "public_key_sha256": key_fingerprint(spki), "public_key": spki},
            )

        with _write_errors():
            self.journal.transaction(txn, "recording the audit key")


@contextlib.contextmanager
def _write_errors() -> Iterator[None]:
    """A journal failure (BEGIN or COMMIT: disk full, I/O error) while writing the audit log is an AuditError."""
    try:
        yield
    except AuditError:
        raise
    except IssuanceFailed as exc:
        raise AuditError(f"audit log cannot be written: {exc.message}", exc.details) from exc


def load_public_key(data: bytes) -> ec.EllipticCurvePublicKey:
    """An audit public key from PEM or DER (SubjectPublicKeyInfo); raises ValueError otherwise."""
    key = (
        serialization.load_pem_public_key(data)
        if data.lstrip().startswith(b"-----BEGIN")
        else serialization.load_der_public_key(data)
    )
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, AUDIT_CURVE):
        raise ValueError("not an EC P-256 public key")
    return key


__all__ = [
    "AUDIT_KEY_LABEL",
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "Checkpoint",
    "Head",
    "ensure_audit_key",
    "load_public_key",
]
