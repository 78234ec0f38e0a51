"""Journals written before checkpoints were chained into the log: what verify says about them, and the change.

The old code signed the head (any entry) and stored only the row in audit_checkpoint: no audit.checkpoint entry,
no audit_claims index. The fixture writes that shape with the real HSM audit key.
"""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.audit import AuditLog, Checkpointer, verify
from appliance.audit.claims import EVENT_CHECKPOINT
from appliance.audit.encoding import checkpoint_message, key_fingerprint, spki_der
from appliance.audit.verify import CHECKPOINT_MISMATCH, INTACT, NOT_INTACT, TRUNCATED, UNSIGNED_TAIL
from appliance.issuance.journal import Journal
from hsm.keys import HsmEcPrivateKey
from tests.appliance.audit.conftest import fill, rehash_from, tamper


def _old_checkpoint(audit: AuditLog, key: HsmEcPrivateKey) -> int:
    """What `checkpoint` did before claims: sign the current head, store the row, append nothing."""
    seq, head = audit.head()
    signature = key.sign(checkpoint_message(seq, head), ec.ECDSA(hashes.SHA256()))

    def txn(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO audit_checkpoint (seq, head_hash, time, key_label, signature) VALUES (?,?,?,?,?)",
            (seq, head, time.time(), "audit", signature),
        )

    audit.journal.call(audit.journal.transaction, txn, "an old checkpoint")
    return seq


@pytest.fixture
def old(journal: Journal, audit_key: HsmEcPrivateKey) -> Path:
    """An old journal: the key registered (entry 1, signed by a row at 1), entries 2..20 (a row at 20), then
    entries 21..30 unsigned. Closed; the path is returned."""
    audit = AuditLog(journal)
    spki = spki_der(audit_key.public_key())

    def register(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO audit_key (label, public_key, created_at) VALUES ('audit', ?, ?)", (spki, 1.0)
        )
        audit.append(conn, "appliance", "audit.key-registered", {
            "label": "audit", "public_key_sha256": key_fingerprint(spki), "public_key": spki,
        })  # fmt: skip

    journal.call(journal.transaction, register, "the old key registration")
    assert _old_checkpoint(audit, audit_key) == 1
    fill(audit, 19)
    assert _old_checkpoint(audit, audit_key) == 20
    fill(audit, 10)
    journal.call(lambda: journal.conn.execute("DROP INDEX audit_claims"))  # the old schema had none
    journal.close()
    return journal.path


def test_an_old_log_is_judged_by_its_rows_and_never_called_intact_past_them(
    old: Path, audit_key: HsmEcPrivateKey
) -> None:
    with Journal(old) as journal:
        assert journal.call(
            lambda: journal.conn.execute("SELECT 1 FROM sqlite_master WHERE name='audit_claims'").fetchone()
        )  # opening it with this code added the index
        report = verify(journal, public_key=audit_key.public_key())
        assert report.status == UNSIGNED_TAIL, report.text()
        assert (report.signed_through, report.unsigned, report.claims, report.policy) == (
            20,
            (21, 30),
            0,
            None,
        )
        assert any("no checkpoint is chained" in w for w in report.warnings)
        _old_checkpoint(AuditLog(journal), audit_key)  # an old log whose last row signs its head
        assert verify(journal, public_key=audit_key.public_key()).status == INTACT


def test_an_old_log_rewritten_with_its_rows_deleted_is_an_unsigned_tail(
    old: Path, audit_key: HsmEcPrivateKey
) -> None:
    """The limit of old logs (docs/audit.md, "Logs from before claims"): nothing asks for a deleted row."""
    with Journal(old) as journal:
        kept = AuditLog(journal).head()
        with tamper(journal) as db:
            rehash_from(db, 10, {12: '{"i":0,"serial":"SN-FORGED"}'})
            db.execute("DELETE FROM audit_checkpoint WHERE seq >= 10")
        report = verify(journal, public_key=audit_key.public_key())
        assert report.status == UNSIGNED_TAIL and report.unsigned == (2, 30)
        assert verify(journal, public_key=audit_key.public_key(), expected_head=kept).status == NOT_INTACT


def test_the_first_claim_chains_the_old_part(old: Path, audit_key: HsmEcPrivateKey) -> None:
    with Journal(old) as journal:
        audit = AuditLog(journal)
        cp = audit.checkpoint(audit_key)
        assert cp.seq == 31 and audit.entries(start=31)[0].event == EVENT_CHECKPOINT
        report = verify(journal, public_key=audit_key.public_key())
        assert report.intact and report.chained_since == 31 and report.signed_through == 31
        # the old rows no longer matter: the claim's signature covers entries 1..31 through the chain
        with tamper(journal) as db:
            db.execute("DELETE FROM audit_checkpoint WHERE seq < 31")
        assert verify(journal, public_key=audit_key.public_key()).intact
        # and a rewrite of the old part is caught by it
        with tamper(journal) as db:
            rehash_from(db, 10, {12: '{"i":0,"serial":"SN-FORGED"}'})
        problems = verify(journal, public_key=audit_key.public_key()).problems
        assert [(p.seq, p.kind) for p in problems] == [(31, CHECKPOINT_MISMATCH)]


def test_cutting_the_claims_off_again_needs_the_kept_head(old: Path, audit_key: HsmEcPrivateKey) -> None:
    with Journal(old) as journal:
        audit = AuditLog(journal)
        audit.checkpoint(audit_key)
        kept = audit.head()
        with tamper(journal) as db:
            db.execute("DELETE FROM audit WHERE seq >= 31")
            db.execute("DELETE FROM audit_checkpoint WHERE seq >= 31")
        assert verify(journal, public_key=audit_key.public_key()).status == UNSIGNED_TAIL
        problems = verify(journal, public_key=audit_key.public_key(), expected_head=kept).problems
        assert [(p.seq, p.kind) for p in problems] == [(31, TRUNCATED)]


async def test_the_daemons_checkpointer_chains_an_old_log_when_it_starts(
    old: Path, audit_key: HsmEcPrivateKey
) -> None:
    with Journal(old) as journal:
        audit = AuditLog(journal)
        async with Checkpointer(audit, audit_key, poll_seconds=3600, final=False) as cp:
            assert cp.made == 1 and cp.last is not None and cp.last.seq == 31
        assert verify(journal, public_key=audit_key.public_key()).intact
