"""The journal's public-key index read into the page cache after a start (appliance/issuance/prewarm.py)."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from appliance.issuance import prewarm as prewarm_mod
from appliance.issuance.journal import Journal
from appliance.issuance.prewarm import SCAN_SQL, JournalPrewarm

GUARD_S = 60.0


def _journal_with_keys(path: Path, n: int) -> None:
    with Journal(path) as journal:

        def txn(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256,"
                " csr_sha256, cert_serial, tbs_sha256, state, created_at) VALUES"
                " (?, 'st', 'idevid', 'issuing', ?, ?, x'00', ?, x'00', ?, 1)",
                [(f"r{i}", f"SN-{i}", i.to_bytes(32, "big"), f"{i:x}", "burned" if i % 10 == 0 else "intent")
                 for i in range(1, n + 1)],
            )  # fmt: skip

        journal.call(journal.transaction, txn, "test rows")


def test_the_scan_reads_the_whole_key_index_and_nothing_else(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    _journal_with_keys(path, 500)
    result = JournalPrewarm(path, available=lambda: 1 << 40).read()
    assert result.skipped is None and result.keys == 500  # burned rows' keys are in the index too
    with sqlite3.connect(path) as conn:
        plan = " ".join(str(r[-1]) for r in conn.execute(f"EXPLAIN QUERY PLAN {SCAN_SQL}"))
    assert plan == "SCAN issuance USING COVERING INDEX issuance_key"  # the index pages alone, in key order


def test_an_index_larger_than_half_the_memory_available_is_not_read(tmp_path: Path) -> None:
    path = tmp_path / "journal.sqlite"
    _journal_with_keys(path, 100)
    result = JournalPrewarm(path, available=lambda: 100 * prewarm_mod.ENTRY_BYTES * 2 - 2).read()
    assert result.keys == 0 and result.skipped is not None and "more than half" in result.skipped
    assert JournalPrewarm(path, available=lambda: 100 * prewarm_mod.ENTRY_BYTES * 2).read().keys == 100


async def test_stopping_ends_a_scan_under_way(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "journal.sqlite"
    _journal_with_keys(path, 10)
    # A scan that would run for hours: what a slow disk under a ten-year journal looks like from here.
    monkeypatch.setattr(
        prewarm_mod,
        "SCAN_SQL",
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 10000000000) SELECT COUNT(*) FROM c",
    )
    warm = JournalPrewarm(path, available=lambda: None)
    reading = asyncio.ensure_future(asyncio.to_thread(warm.read))
    deadline = asyncio.get_running_loop().time() + GUARD_S
    while warm._conn is None:
        assert asyncio.get_running_loop().time() < deadline, "the scan never started"
        await asyncio.sleep(0.01)
    warm.stop()
    result = await asyncio.wait_for(reading, GUARD_S)
    assert result.keys == 0 and result.skipped == "the daemon is stopping"
    with Journal(path) as journal:
        assert journal.call(lambda: journal.conn.execute("SELECT COUNT(*) FROM issuance").fetchone()) == (10,)
