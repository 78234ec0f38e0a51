"""Audit log fixtures: the test's journal (real SQLite), the session's SoftHSM token, and a tamper connection."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.audit import AuditLog, ensure_audit_key
from appliance.issuance.journal import Journal
from hsm.keys import HsmEcPrivateKey
from hsm.token import Token


@pytest.fixture
def audit(journal: Journal) -> AuditLog:
    return AuditLog(journal)


@pytest.fixture
def audit_key(hsm_token: Token) -> HsmEcPrivateKey:
    return ensure_audit_key(hsm_token)


def fill(audit: AuditLog, n: int, *, per_txn: int = 500) -> None:
    """Append n entries, per_txn to a transaction."""
    done = 0
    while done < n:
        k = min(per_txn, n - done)

        def txn(conn: sqlite3.Connection, start: int = done, k: int = k) -> None:
            for i in range(start, start + k):
                audit.append(conn, f"station:line-{i % 3}", "test.event", {"i": i, "serial": f"SN-{i:05d}"})

        audit.journal.call(audit.journal.transaction, txn, "test fill")
        done += k


@contextlib.contextmanager
def tamper(journal: Journal) -> Iterator[sqlite3.Connection]:
    """What an attacker with the journal file does: a separate connection, append-only triggers dropped."""
    conn = sqlite3.connect(journal.path, isolation_level=None)
    try:
        conn.execute("DROP TRIGGER IF EXISTS audit_no_update")
        conn.execute("DROP TRIGGER IF EXISTS audit_no_delete")
        yield conn
    finally:
        conn.close()


def rehash_from(db: sqlite3.Connection, start: int, edits: dict[int, str] | None = None) -> None:
    """What a forger without the audit key does: replace some entries' data and recompute every hash from
    entry `start` on, so the chain is self-consistent again."""
    from appliance.audit.encoding import GENESIS_HASH, entry_hash

    edits = edits or {}
    row = db.execute("SELECT hash FROM audit WHERE seq < ? ORDER BY seq DESC LIMIT 1", (start,)).fetchone()
    prev = GENESIS_HASH if row is None else bytes(row[0])
    rows = db.execute("SELECT seq, time, actor, event, data FROM audit WHERE seq >= ? ORDER BY seq", (start,))
    for seq, t, actor, event, stored in rows.fetchall():
        data = edits.get(seq, stored)
        digest = entry_hash(seq, t, actor, event, data, prev)
        db.execute("UPDATE audit SET data=?, prev_hash=?, hash=? WHERE seq=?", (data, prev, digest, seq))
        prev = digest


def sign_rows(db: sqlite3.Connection, key: ec.EllipticCurvePrivateKey) -> None:
    """Re-sign every checkpoint row over the hash its entry has now, with `key` (a forger's)."""
    from appliance.audit.encoding import checkpoint_message

    for (seq,) in db.execute("SELECT seq FROM audit_checkpoint").fetchall():
        (digest,) = db.execute("SELECT hash FROM audit WHERE seq=?", (seq,)).fetchone()
        sig = key.sign(checkpoint_message(seq, bytes(digest)), ec.ECDSA(hashes.SHA256()))
        db.execute(
            "UPDATE audit_checkpoint SET head_hash=?, signature=? WHERE seq=?", (bytes(digest), sig, seq)
        )
