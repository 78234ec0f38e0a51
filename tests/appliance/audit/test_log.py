"""Appending: transactions, rollback, savepoints, fail-closed errors, untrusted strings."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TypeVar

import pytest

from appliance.audit import GENESIS_HASH, AuditError, AuditLog, verify
from appliance.audit.encoding import entry_hash
from appliance.errors import BirthlineError, IssuanceFailed, ReasonCode
from appliance.issuance.journal import Journal
from tests.appliance.audit.conftest import fill

T = TypeVar("T")


def _txn(journal: Journal, fn: Callable[[sqlite3.Connection], T]) -> T:
    return journal.call(lambda: journal.transaction(fn, "test"))


def test_first_entry_links_to_genesis_and_chain_continues(audit: AuditLog) -> None:
    e1 = audit.record("operator:alice", "auth.login", {"station": "console"})
    e2 = audit.record("operator:alice", "auth.logout", {})
    assert (e1.seq, e1.prev_hash) == (1, GENESIS_HASH)
    assert (e2.seq, e2.prev_hash) == (2, e1.hash)
    assert e1.hash == entry_hash(
        1, e1.time, "operator:alice", "auth.login", '{"station":"console"}', GENESIS_HASH
    )
    assert audit.head() == (2, e2.hash)
    assert audit.entries() == [e1, e2]


def test_rolled_back_transaction_leaves_no_entry_and_next_append_continues(
    audit: AuditLog, journal: Journal
) -> None:
    first = audit.record("appliance", "test.before", {})

    class Boom(Exception):
        pass

    def txn(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO meta (key, value) VALUES ('audit-test', 'x')"
        )  # the caller's own row, same transaction
        entry = audit.append(conn, "station:line-1", "issuance.intent", {"device_serial": "SN-1"})
        assert entry.seq == 2
        raise Boom

    with pytest.raises(Boom):
        _txn(journal, txn)
    assert audit.head() == (1, first.hash)
    assert (
        journal.call(lambda: journal.conn.execute("SELECT 1 FROM meta WHERE key='audit-test'").fetchone())
        is None
    )
    nxt = audit.record("appliance", "test.after", {})
    assert (nxt.seq, nxt.prev_hash) == (2, first.hash)
    assert verify(journal).ok


def test_savepoint_rollback_inside_a_batch_keeps_the_chain(audit: AuditLog, journal: Journal) -> None:
    """IssueService refuses one request of a batch with ROLLBACK TO a savepoint: its entry must vanish cleanly."""

    def txn(conn: sqlite3.Connection) -> list[int]:
        seqs = []
        for i in range(4):
            conn.execute("SAVEPOINT item")
            e = audit.append(conn, "station:line-1", "issuance.intent", {"n": i})
            if i == 1:
                conn.execute("ROLLBACK TO item")
            else:
                seqs.append(e.seq)
            conn.execute("RELEASE item")
        return seqs

    assert _txn(journal, txn) == [1, 2, 3]
    report = verify(journal)
    assert report.ok, report.text()
    assert [e.data for e in audit.entries()] == ['{"n":0}', '{"n":2}', '{"n":3}']


def test_append_outside_a_transaction_is_refused(audit: AuditLog, journal: Journal) -> None:
    with pytest.raises(AuditError, match="outside a transaction"):
        journal.call(audit.append, journal.conn, "appliance", "test.event", {})


def test_write_failure_is_audit_unavailable_and_rolls_back_the_callers_rows(
    audit: AuditLog, journal: Journal
) -> None:
    """Inject a real SQLite failure on the audit table (a trigger): the whole transaction fails closed."""
    audit.record("appliance", "test.before", {})
    journal.call(
        lambda: journal.conn.execute(
            "CREATE TRIGGER audit_broken BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END"
        )
    )

    def txn(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO meta (key, value) VALUES ('intent', 'x')")
        audit.append(conn, "station:line-1", "issuance.intent", {"device_serial": "SN-1"})

    with pytest.raises(AuditError) as info:
        _txn(journal, txn)
    err = info.value
    assert isinstance(err, BirthlineError) and isinstance(err, IssuanceFailed)
    assert err.code is ReasonCode.AUDIT_UNAVAILABLE
    assert "disk I/O error" in err.message
    assert (
        journal.call(lambda: journal.conn.execute("SELECT 1 FROM meta WHERE key='intent'").fetchone()) is None
    )
    with pytest.raises(AuditError):
        audit.record("operator:alice", "auth.login", {})
    assert audit.head()[0] == 1
    journal.call(lambda: journal.conn.execute("DROP TRIGGER audit_broken"))
    assert audit.record("operator:alice", "auth.login", {}).seq == 2


def test_journal_failure_of_a_standalone_record_is_audit_unavailable(
    audit: AuditLog, journal: Journal
) -> None:
    """BEGIN IMMEDIATE cannot get the write lock (another writer holds it): record() reports AUDIT_UNAVAILABLE."""
    other = sqlite3.connect(journal.path, isolation_level=None, timeout=0)
    try:
        other.execute("BEGIN IMMEDIATE")
        journal.call(lambda: journal.conn.execute("PRAGMA busy_timeout=0"))
        with pytest.raises(AuditError) as info:
            audit.record("operator:alice", "auth.login", {})
        assert info.value.code is ReasonCode.AUDIT_UNAVAILABLE
    finally:
        other.close()
    assert audit.head()[0] == 0


@pytest.mark.parametrize(
    ("actor", "event", "data"),
    [
        ("appliance", "Bad Event", {}),
        ("appliance", "x" * 65, {}),
        ("", "test.event", {}),
        ("appliance", "test.event", {"f": float("nan")}),
        ("appliance", "test.event", {"o": object()}),
        ("\udcff", "test.event", {}),
    ],
)
def test_unencodable_entries_are_refused_not_mangled(
    audit: AuditLog, actor: str, event: str, data: dict[str, object]
) -> None:
    with pytest.raises(AuditError) as info:
        audit.record(actor, event, data)
    assert info.value.code is ReasonCode.AUDIT_UNAVAILABLE
    assert audit.head()[0] == 0


def test_strings_from_outside_are_stored_as_data_only(audit: AuditLog, journal: Journal) -> None:
    hostile = "SN-%s%n{0}'); DROP TABLE audit;--\n\x00\u202e\U0001f600"
    e = audit.record(
        f"station:{hostile}", "issuance.intent", {"device_serial": hostile, hostile: b"\x00\xff"}
    )
    (stored,) = audit.entries()
    assert stored == e and stored.actor == f"station:{hostile}"
    assert stored.data.isascii()
    import json

    assert json.loads(stored.data) == {"device_serial": hostile, hostile: "00ff"}
    assert verify(journal).ok


def test_many_entries_in_one_transaction(audit: AuditLog, journal: Journal) -> None:
    fill(audit, 1200, per_txn=400)
    assert audit.head()[0] == 1200
    assert [e.seq for e in audit.entries(start=1199)] == [1199, 1200]
    report = verify(journal)
    assert report.ok and report.entries == 1200


def test_append_only_triggers_refuse_update_and_delete(audit: AuditLog, journal: Journal) -> None:
    audit.record("appliance", "test.event", {})
    for sql in ("UPDATE audit SET actor='x'", "DELETE FROM audit"):
        with pytest.raises(sqlite3.IntegrityError, match="append-only"):
            journal.call(lambda sql=sql: journal.conn.execute(sql))


def test_the_last_claim_is_found_through_the_partial_index(audit: AuditLog, journal: Journal) -> None:
    """Checkpoints look up the last audit.checkpoint entry: an index search, not a scan of the whole log."""
    from appliance.audit.log import _LAST_CLAIM

    plan = journal.call(lambda: journal.conn.execute("EXPLAIN QUERY PLAN " + _LAST_CLAIM).fetchall())
    text = " ".join(str(row[-1]) for row in plan)
    assert "SEARCH audit USING INDEX audit_claims" in text and "SCAN" not in text, plan
