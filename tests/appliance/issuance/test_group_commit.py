"""Group commit: async journal transactions queued together share one COMMIT, each in its own SAVEPOINT.

A real SQLite journal (WAL, synchronous=FULL). The journal thread is held busy by a job waiting on an event, so
that the transactions under test are all queued before it is free again: a condition, not a timing."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from appliance.errors import IssuanceFailed, ReasonCode
from appliance.issuance.journal import Journal

Txn = Callable[[sqlite3.Connection], Any]


@pytest.fixture
def journal(tmp_path: Path) -> Any:
    with Journal(tmp_path / "journal.sqlite") as j:
        j.call(lambda: j.conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY)"))
        yield j


async def _queued_together(journal: Journal, txns: list[Txn]) -> list[Any]:
    """Run `txns` as async transactions that are all queued before the journal thread is free; the results or
    exceptions, in order, and how many COMMITs there were."""
    gate = threading.Event()
    blocker = asyncio.ensure_future(journal.acall(gate.wait))
    tasks = [asyncio.ensure_future(journal.atransaction(fn, f"txn {i}")) for i, fn in enumerate(txns)]
    while len(journal.group._pending) < len(txns):  # each task queues itself at its first step
        await asyncio.sleep(0)
    gate.set()
    await blocker
    return list(await asyncio.gather(*tasks, return_exceptions=True))


def _insert(key: str, then: Callable[[], None] | None = None) -> Txn:
    def fn(conn: sqlite3.Connection) -> str:
        conn.execute("INSERT INTO t (k) VALUES (?)", (key,))
        if then is not None:
            then()
        return key

    return fn


def _keys(journal: Journal) -> set[str]:
    return {r[0] for r in journal.call(lambda: journal.conn.execute("SELECT k FROM t").fetchall())}


def _count_commits(journal: Journal) -> list[float]:
    commits: list[float] = []
    journal.commit_observer = commits.append
    return commits


async def test_transactions_queued_together_share_one_commit(journal: Journal) -> None:
    commits = _count_commits(journal)
    results = await _queued_together(journal, [_insert(f"k{i}") for i in range(5)])
    assert results == [f"k{i}" for i in range(5)]
    assert len(commits) == 1
    assert _keys(journal) == {f"k{i}" for i in range(5)}
    assert (journal.group.groups, journal.group.grouped) == (1, 5)


async def test_a_lone_transaction_commits_on_its_own(journal: Journal) -> None:
    commits = _count_commits(journal)
    assert await journal.atransaction(_insert("alone"), "alone") == "alone"
    assert len(commits) == 1 and journal.group.groups == 0
    assert _keys(journal) == {"alone"}


def _fail() -> None:
    raise ValueError("refused by its own logic")


async def test_a_failing_transaction_rolls_back_only_its_own_writes(journal: Journal) -> None:
    results = await _queued_together(
        journal,
        [
            _insert("first"),
            _insert("refused", then=_fail),
            _insert("first"),  # a constraint violation: a journal error for this one only
            _insert("last"),
        ],
    )
    assert results[0] == "first" and results[3] == "last"
    assert isinstance(results[1], ValueError)
    assert isinstance(results[2], IssuanceFailed) and results[2].code is ReasonCode.JOURNAL_UNAVAILABLE
    assert results[2].details == {"doing": "txn 2"}
    assert _keys(journal) == {"first", "last"}


async def test_a_commit_that_fails_fails_every_transaction_of_its_group(journal: Journal) -> None:
    # A deferred foreign key is checked at COMMIT: a real COMMIT failure, no fault injection needed.
    journal.call(
        lambda: journal.conn.executescript(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
            "CREATE TABLE child (p INTEGER REFERENCES parent (id) DEFERRABLE INITIALLY DEFERRED);"
        )
    )

    def dangling(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO child (p) VALUES (42)")

    commits = _count_commits(journal)
    results = await _queued_together(journal, [_insert("a"), dangling, _insert("b")])
    assert all(isinstance(r, IssuanceFailed) for r in results), results
    assert [r.details for r in results] == [{"doing": f"txn {i}"} for i in range(3)]
    assert commits == [] and _keys(journal) == set()
    # The journal is usable afterwards, alone and in a group.
    assert await journal.atransaction(_insert("after"), "after") == "after"
    assert await _queued_together(journal, [_insert("x"), _insert("y")]) == ["x", "y"]
    assert _keys(journal) == {"after", "x", "y"}


async def test_a_read_queued_after_a_write_sees_it(journal: Journal) -> None:
    def read() -> set[str]:
        return {r[0] for r in journal.conn.execute("SELECT k FROM t")}

    write: Awaitable[Any] = journal.atransaction(_insert("w"), "write")
    task = asyncio.ensure_future(write)
    while not journal.group._pending:
        await asyncio.sleep(0)
    seen = await journal.acall(read)
    assert await task == "w" and seen == {"w"}


async def test_a_lookup_on_the_reader_never_waits_behind_a_commit_and_sees_only_committed_rows(
    journal: Journal,
) -> None:
    """Journal.aread (the ENROLL's request-id lookup) runs on its own read-only connection: it answers while
    the journal thread is inside a transaction, and does not see that transaction's rows until it commits."""
    inside, release = threading.Event(), threading.Event()

    def slow(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (k) VALUES ('pending')")
        inside.set()
        release.wait()

    def keys(conn: sqlite3.Connection) -> set[str]:
        return {r[0] for r in conn.execute("SELECT k FROM t")}

    await journal.atransaction(_insert("committed"), "before")
    writer = asyncio.ensure_future(journal.atransaction(slow, "slow"))
    await asyncio.to_thread(inside.wait)
    assert await journal.aread(keys) == {"committed"}  # answered while the journal thread is busy
    release.set()
    await writer
    assert await journal.aread(keys) == {"committed", "pending"}

    def write(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO t (k) VALUES ('nope')")

    with pytest.raises(sqlite3.OperationalError):  # query_only: the reader can never write
        await journal.aread(write)


async def test_aread_on_a_read_only_journal_reads_on_its_own_thread(journal: Journal) -> None:
    await journal.atransaction(_insert("kept"), "write")
    with Journal(journal.path, read_only=True) as ro:
        assert await ro.aread(lambda conn: [r[0] for r in conn.execute("SELECT k FROM t")]) == ["kept"]
        assert ro._reader is None  # no second connection for a journal that only reads
