"""Audit log fixtures: the test's journal (real SQLite), the session's SoftHSM token, and a tamper connection."""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator

import pytest

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
