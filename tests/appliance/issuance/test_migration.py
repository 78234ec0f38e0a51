"""A journal written by an older Birthline opens, is migrated in place, and keeps every row."""

from __future__ import annotations

import shutil
import socket
import sqlite3
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

from appliance.errors import IssuanceFailed
from appliance.issuance import schema
from appliance.issuance.journal import MIGRATION_TIMEOUT_S, SCHEMA_VERSION, START_TIMEOUT_S, Journal
from appliance.issuance.schema import OUTBOX_TABLE, SCHEMA, migrate, statements

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


V2 = Path(__file__).parent / "data" / "journal-schema-2.sql"


def test_schema_2_is_migrated_and_keeps_its_rows(tmp_path: Path) -> None:
    """Schema 3 adds key update (issuance.updates / updated_by, product.revoke_on_update) and the outbox's kur
    kind and parked state; the outbox is rebuilt for them, with every row and the rr trigger kept."""
    path = tmp_path / "journal.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(V2.read_text())
    conn.close()
    with Journal(path) as journal:

        def q(sql: str) -> list[tuple[object, ...]]:
            return journal.call(lambda: journal.conn.execute(sql).fetchall())

        assert q("SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
        # Schema 4's depth counters start from the rows the journal already held.
        assert q("SELECT kind, state, n FROM outbox_count ORDER BY kind") == [
            ("p10cr", "done", 1),
            ("rr", "sent", 1),
        ]
        assert q(
            "SELECT id, kind, state, attempts, last_error, upstream_cert_der, transaction_id FROM outbox"
        ) == [
            (1, "p10cr", "done", 0, None, b"\x30\x01", bytes.fromhex("00112233445566778899aabbccddeeff")),
            (
                2,
                "rr",
                "sent",
                2,
                "upstream unreachable",
                None,
                bytes.fromhex("ffeeddccbbaa99887766554433221100"),
            ),
        ]
        assert q("SELECT name, revoke_on_update FROM product") == [("sensor", 0)]
        assert q("SELECT cert_serial, state, updates, updated_by FROM issuance") == [
            ("0a1b", "issued", None, None)
        ]
        assert q("PRAGMA integrity_check") == [("ok",)]
        assert q("PRAGMA foreign_key_check") == []

        def key_update(c: sqlite3.Connection) -> None:
            # What the core does for a kur: the old row leaves the live-device index, the new one takes its place.
            c.execute("UPDATE issuance SET updated_by = 0 WHERE id = 1")
            c.execute(
                "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256,"
                " csr_sha256, cert_serial, tbs_sha256, state, created_at, updates) VALUES ('r2', 'fixture-1',"
                " 'idevid', 'issuing', 'SN-0001', x'05', x'06', '0c1d', x'07', 'intent', 2, 1)"
            )
            c.execute("UPDATE issuance SET updated_by = 2 WHERE id = 1")
            c.execute("INSERT INTO outbox (kind, issuance_id, cert_serial, transaction_id, next_attempt_at,"
                      " created_at, state) VALUES ('kur', 2, '0c1d', x'01', 2, 2, 'parked')")  # fmt: skip

        journal.call(journal.transaction, key_update, "test")
        with pytest.raises(IssuanceFailed, match="UNIQUE"):  # still one live row per device
            journal.call(journal.transaction, lambda c: c.execute(
                "UPDATE issuance SET updated_by = NULL WHERE id = 1"), "t")  # fmt: skip
        # A burned key-update intent gives the device its old certificate back (the trigger).
        journal.call(
            journal.transaction, lambda c: c.execute("UPDATE issuance SET state='burned' WHERE id = 2"), "t"
        )
        assert q("SELECT id, updated_by FROM issuance ORDER BY id") == [(1, None), (2, None)]
        # The rr trigger was recreated on the rebuilt outbox: a revocation still writes its rr row.
        journal.call(journal.transaction, lambda c: c.execute(
            "INSERT INTO revocation (cert_serial, ca, reason, revoked_at, actor, source)"
            " VALUES ('0c1d', 'issuing', 'superseded', 3, 'alice', 'cli')"), "t")  # fmt: skip
        assert q("SELECT kind FROM outbox WHERE cert_serial='0c1d' ORDER BY id") == [("kur",), ("rr",)]
        assert q("SELECT kind, state, n FROM outbox_count WHERE n > 0 ORDER BY kind, state") == q(
            "SELECT kind, state, COUNT(*) FROM outbox GROUP BY kind, state ORDER BY kind, state"
        )


def _as_schema_4(path: Path) -> None:
    """A journal as schema 4 left it: the public-key uniqueness as a UNIQUE index partial on state."""
    Journal(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    conn.executescript(
        "DROP TRIGGER issuance_key_once; DROP TRIGGER issuance_burned_stays; DROP TRIGGER issuance_key_fixed;"
        " DROP INDEX issuance_key;"
        " CREATE UNIQUE INDEX issuance_live_key ON issuance (public_key_sha256) WHERE state != 'burned';"
        " UPDATE meta SET value='4' WHERE key='schema_version';"
    )
    conn.close()


def _row(key: bytes, serial: str, state: str) -> str:
    return (
        "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256, csr_sha256,"
        f" cert_serial, tbs_sha256, state, created_at) VALUES ('r{serial}', 'st', 'idevid', 'issuing',"
        f" 'SN-{serial}', x'{key.hex()}', x'00', '{serial}', x'00', '{state}', 1)"
    )


def test_schema_4_moves_key_uniqueness_to_a_plain_index_and_triggers(tmp_path: Path) -> None:
    """Schema 5: a device key is still certified once (a live duplicate is refused by the database itself, a
    burned row's key may come back), but the index on the key no longer names `state`, so changing a row's state
    leaves that index alone."""
    path = tmp_path / "journal.sqlite"
    _as_schema_4(path)
    with Journal(path) as journal:

        def q(sql: str) -> list[tuple[object, ...]]:
            return journal.call(lambda: journal.conn.execute(sql).fetchall())

        assert q("SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
        names = {n for (n,) in q("SELECT name FROM sqlite_master WHERE tbl_name='issuance'")}
        assert "issuance_live_key" not in names
        assert {"issuance_key", "issuance_key_once", "issuance_key_fixed", "issuance_burned_stays"} <= names
        key = bytes(range(32))
        q(_row(key, "01", "burned"))
        q(_row(key, "02", "intent"))  # a burned row's key comes back
        with pytest.raises(sqlite3.IntegrityError, match="UNIQUE constraint failed"):
            q(_row(key, "03", "intent"))  # ... but only once
        q(_row(key, "04", "burned"))  # a burned duplicate is no conflict
        with pytest.raises(sqlite3.IntegrityError, match="stays burned"):
            q("UPDATE issuance SET state='intent' WHERE cert_serial='04'")
        other = bytes(range(1, 33))
        q(_row(other, "06", "intent"))
        with pytest.raises(sqlite3.IntegrityError, match="never changes"):  # not even to a free key
            q(f"UPDATE issuance SET public_key_sha256=x'{bytes(range(2, 34)).hex()}' WHERE cert_serial='06'")
        q("UPDATE issuance SET state='burned' WHERE cert_serial='02'")
        q(_row(key, "05", "intent"))  # burned again: the key is free again
        assert q("SELECT cert_serial, state FROM issuance ORDER BY cert_serial") == [
            ("01", "burned"), ("02", "burned"), ("04", "burned"), ("05", "intent"), ("06", "intent"),
        ]  # fmt: skip
        plan = q(
            f"EXPLAIN QUERY PLAN SELECT id FROM issuance WHERE public_key_sha256=x'{key.hex()}' AND state != 'burned'"
        )
        assert "USING INDEX issuance_key" in " ".join(str(r[-1]) for r in plan)


def _as_schema_5(path: Path) -> None:
    """A journal as schema 5 left it: the outbox's transaction_id UNIQUE (an index SQLite keeps for it)."""
    Journal(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    v5 = OUTBOX_TABLE.replace("transaction_id    BLOB NOT NULL,", "transaction_id    BLOB NOT NULL UNIQUE,")
    assert v5 != OUTBOX_TABLE
    conn.executescript(f"DROP TRIGGER outbox_on_revocation; DROP TABLE outbox; {v5};")
    conn.executescript(SCHEMA)  # the outbox's triggers and indexes again
    conn.execute("UPDATE meta SET value='5' WHERE key='schema_version'")
    conn.execute(_row(bytes([1]) * 32, "0a", "intent"))
    conn.execute(_row(bytes([2]) * 32, "0b", "intent"))
    conn.executescript(
        "INSERT INTO outbox (kind, cert_serial, transaction_id, csr_der, state, attempts, next_attempt_at,"
        " created_at) VALUES ('p10cr', '0a', x'00112233445566778899aabbccddeeff', x'3003', 'queued', 0, 5, 1);"
        "INSERT INTO outbox (kind, cert_serial, transaction_id, request_der, state, attempts, last_error,"
        " next_attempt_at, created_at) VALUES ('p10cr', '0b', x'ffeeddccbbaa99887766554433221100', x'3001',"
        " 'sent', 3, 'upstream unreachable', 9, 2);"
        "INSERT INTO revocation (cert_serial, ca, reason, revoked_at, actor, source)"
        " VALUES ('0a', 'issuing', 'keyCompromise', 3, 'alice', 'cli');"
    )
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name='sqlite_autoindex_outbox_1'").fetchone()
    conn.close()


def test_schema_5_drops_the_index_on_the_outbox_transaction_id(tmp_path: Path) -> None:
    """Schema 6: the outbox is rebuilt without the UNIQUE constraint on transaction_id (and so without the index
    on 16 random bytes that every certificate wrote); every row, its counters, indexes and triggers are kept."""
    path = tmp_path / "journal.sqlite"
    _as_schema_5(path)
    conn = sqlite3.connect(path)
    before = conn.execute("SELECT * FROM outbox ORDER BY id").fetchall()
    counts = conn.execute(
        "SELECT kind, state, n FROM outbox_count WHERE n > 0 ORDER BY kind, state"
    ).fetchall()
    conn.close()
    assert [r[1] for r in before] == ["p10cr", "p10cr", "rr"] and len(counts) == 3
    with Journal(path) as journal:

        def q(sql: str) -> list[tuple[object, ...]]:
            return journal.call(lambda: journal.conn.execute(sql).fetchall())

        assert q("SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
        assert q("SELECT * FROM outbox ORDER BY id") == before
        assert q("SELECT kind, state, n FROM outbox_count WHERE n > 0 ORDER BY kind, state") == counts
        names = {n for (n,) in q("SELECT name FROM sqlite_master WHERE tbl_name='outbox'")}
        assert "sqlite_autoindex_outbox_1" not in names
        assert {"outbox_open", "outbox_open_created", "outbox_one_rr", "outbox_by_issuance", "outbox_count_insert",
                "outbox_count_update", "outbox_count_delete"} <= names  # fmt: skip
        assert q("PRAGMA integrity_check") == [("ok",)]
        assert q("PRAGMA foreign_key_check(outbox)") == []
        # The rr trigger is back: a revocation writes its rr row, and still only one per certificate.
        journal.call(journal.transaction, lambda c: c.execute(
            "INSERT INTO revocation (cert_serial, ca, reason, revoked_at, actor, source)"
            " VALUES ('0b', 'issuing', 'superseded', 4, 'alice', 'cli')"), "t")  # fmt: skip
        assert q("SELECT cert_serial FROM outbox WHERE kind='rr' ORDER BY id") == [("0a",), ("0b",)]
        with pytest.raises(sqlite3.IntegrityError, match=r"outbox\.cert_serial"):
            q("INSERT INTO outbox (kind, cert_serial, transaction_id, next_attempt_at, created_at)"
              " VALUES ('rr', '0b', randomblob(16), 5, 5)")  # fmt: skip
        # The counters follow the rebuilt table.
        journal.call(
            journal.transaction, lambda c: c.execute("UPDATE outbox SET state='done' WHERE id=1"), "t"
        )
        assert q("SELECT kind, state, n FROM outbox_count WHERE n > 0 ORDER BY kind, state") == q(
            "SELECT kind, state, COUNT(*) FROM outbox GROUP BY kind, state ORDER BY kind, state"
        )


def test_the_schema_splits_into_the_statements_executescript_runs() -> None:
    script_run = sqlite3.connect(":memory:")
    script_run.executescript(SCHEMA)
    one_by_one = sqlite3.connect(":memory:", isolation_level=None)
    one_by_one.execute("BEGIN")
    for statement in statements(SCHEMA):
        one_by_one.execute(statement)
    one_by_one.execute("COMMIT")
    master = "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    assert one_by_one.execute(master).fetchall() == script_run.execute(master).fetchall()
    assert any("CREATE TRIGGER" in s and s.count(";") > 1 for s in statements(SCHEMA))  # bodies stay whole
    with pytest.raises(ValueError, match="incomplete"):
        statements("CREATE TABLE a (x);\nCREATE TABLE b (y)")


def test_the_last_migration_leaves_every_trigger_and_index_in_its_own_transaction(tmp_path: Path) -> None:
    """migrate() alone (without the SCHEMA the journal runs after it): a writer that came in right after the
    migration's COMMIT already finds the outbox's triggers and indexes, which the rebuild had dropped."""
    path = tmp_path / "journal.sqlite"
    _as_schema_5(path)
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn) == 1
    names = {
        n
        for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name IN ('outbox', 'revocation')")
    }
    assert {"outbox_open", "outbox_one_rr", "outbox_count_insert", "outbox_on_revocation"} <= names
    assert migrate(conn) == 0  # nothing left to do
    conn.close()


def test_a_journal_migrated_meanwhile_by_another_process_is_not_migrated_again(
    tmp_path: Path, mocker: MockerFixture
) -> None:
    """Two processes open a schema-5 journal together (the daemon starting, a CLI command beside it): both read
    version 5 before either holds the write lock. The one that gets the lock second reads the version again
    under it and finds 6. (The interleaving is injected: the first, unlocked read returns the stale 5.)"""
    path = tmp_path / "journal.sqlite"
    _as_schema_5(path)
    Journal(path).close()  # the other process: migrated, triggers and indexes in place
    real = schema._version
    reads = iter([5])
    mocker.patch.object(schema, "_version", side_effect=lambda c: next(reads, None) or real(c))
    conn = sqlite3.connect(path, isolation_level=None)
    assert migrate(conn) == 0
    names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE tbl_name = 'outbox'")}
    assert {"outbox_open", "outbox_one_rr", "outbox_count_insert"} <= names  # not dropped by a second rebuild
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    conn.close()


def test_a_migration_says_so_to_systemd_and_leaves_no_large_wal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's start is extended while a migration runs (EXTEND_TIMEOUT_USEC on $NOTIFY_SOCKET), and the WAL
    that the copied table passed through is truncated afterwards."""
    path = tmp_path / "journal.sqlite"
    _as_schema_5(path)
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany(
            "INSERT INTO outbox (kind, cert_serial, transaction_id, csr_der, next_attempt_at, created_at)"
            " VALUES ('p10cr', ?, randomblob(16), randomblob(1000), 1, 1)",
            ((f"{i:04x}",) for i in range(2000)),
        )
    conn.close()
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", str(sock_path))
    with Journal(path) as journal:
        assert journal.call(lambda: journal.conn.execute("SELECT COUNT(*) FROM outbox").fetchone()) == (2003,)
        wal = path.with_name(path.name + "-wal")
        assert wal.stat().st_size < 100_000  # the copy was over 2 MB
    during, after = sock.recv(4096).decode().splitlines(), sock.recv(4096).decode().splitlines()
    sock.close()
    assert "STATUS=migrating the journal from schema 5 to 6" in during
    assert f"EXTEND_TIMEOUT_USEC={MIGRATION_TIMEOUT_S * 1_000_000}" in during
    # Then the rest of the start has the unit's own timeout again, not what is left of the hour.
    assert f"EXTEND_TIMEOUT_USEC={START_TIMEOUT_S * 1_000_000}" in after
    assert any(line.startswith("STATUS=") and "migrated" in line for line in after)


def test_a_rebuild_the_disk_has_no_room_for_is_refused_before_it_starts(
    tmp_path: Path, mocker: MockerFixture
) -> None:
    """The 5 -> 6 rebuild needs about three times the outbox's size free (the copy, and the WAL with the old pages
    zeroed): with less, the journal is not touched and the error says how much is needed. (The full disk is
    injected: the free space is what shutil.disk_usage says.)"""
    path = tmp_path / "journal.sqlite"
    _as_schema_5(path)
    conn = sqlite3.connect(path)
    outbox = schema._table_bytes(conn, "outbox")
    conn.close()
    assert outbox > 0
    usage = shutil.disk_usage(tmp_path)
    mocker.patch.object(schema.shutil, "disk_usage", return_value=usage._replace(free=int(outbox * 2.5)))
    with pytest.raises(IssuanceFailed, match=r"needs about .* GB free on .*make room, then start again"):
        Journal(path)
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("5",)
    assert conn.execute("SELECT 1 FROM sqlite_master WHERE name='sqlite_autoindex_outbox_1'").fetchone()
    conn.close()
    mocker.patch.object(schema.shutil, "disk_usage", return_value=usage._replace(free=int(outbox * 3.5)))
    Journal(path).close()  # with room, it goes ahead
