"""A journal written by an older Birthline opens, is migrated in place, and keeps every row."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from appliance.errors import IssuanceFailed
from appliance.issuance.journal import SCHEMA_VERSION, Journal

V1 = Path(__file__).parent / "data" / "journal-schema-1.sql"


def _v1(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(V1.read_text())
    conn.close()
    return path


def test_schema_1_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    path = _v1(tmp_path / "journal.sqlite")
    with Journal(path) as journal:

        def q(sql: str) -> list[tuple[object, ...]]:
            return journal.call(lambda: journal.conn.execute(sql).fetchall())

        assert q("SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
        assert q("SELECT name, issuance_mode FROM product") == [("sensor", "local")]
        assert q("SELECT device_serial, state FROM issuance") == [("SN-0001", "intent")]
        assert q("SELECT kind, cert_serial, ra_request_id FROM outbox") == [("rr", "0a1b", None)]
        assert q("SELECT issuance_id, ra_request_id FROM work_order_unit") == [(1, None)]
        assert q("PRAGMA integrity_check") == [("ok",)]

        # The new tables and triggers work on the migrated file: an RA request binds its unit.
        def ra(c: sqlite3.Connection) -> None:
            c.execute("UPDATE product SET issuance_mode='upstream'")
            c.execute("INSERT INTO work_order_unit (work_order, device_serial, kind, created_at)"
                      " VALUES ('WO-1', 'SN-0002', 'new', 1)")  # fmt: skip
            c.execute("INSERT INTO ra_request (request_id, station, profile, ca, device_serial, public_key_sha256,"
                      " state, created_at) VALUES ('r2', 'fixture-1', 'idevid', 'issuing', 'SN-0002', x'01',"
                      " 'pending', 1)")  # fmt: skip

        journal.call(journal.transaction, ra, "test")
        assert q("SELECT ra_request_id FROM work_order_unit WHERE device_serial='SN-0002'") == [(1,)]
        with pytest.raises(sqlite3.IntegrityError):
            q("UPDATE product SET issuance_mode='elsewhere'")
    # Opening again is a no-op.
    with Journal(path) as journal:
        assert journal.call(lambda: journal.conn.execute("SELECT COUNT(*) FROM ra_request").fetchone()) == (
            1,
        )


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = _v1(tmp_path / "journal.sqlite")
    conn = sqlite3.connect(path)
    conn.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(IssuanceFailed, match="schema 99"):
        Journal(path)
