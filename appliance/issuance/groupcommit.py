"""Group commit for the journal: the async transactions queued while one commits share the next COMMIT.

Every durable step of a device (its intent, its certificate, its confirmation, a station's request record) is
its own `Journal.atransaction`, from its own task. Run one by one, each pays a whole fsync (synchronous=FULL)
and waits behind every fsync queued before it on the one journal thread: under load the waits, not the work,
make a device's latency. Here the transactions that are waiting when the journal thread becomes free run in ONE
BEGIN IMMEDIATE .. COMMIT, each inside its own SAVEPOINT, so:

- each transaction's writes still commit or roll back as a whole: an exception from one rolls back to its
  savepoint (its own writes only) and is raised to its caller, as its own transaction's ROLLBACK would;
- no caller is answered before the COMMIT that makes its writes durable has returned (a certificate is still
  released only after its row is on disk); if the COMMIT fails, every transaction of the group fails with it;
- a lone transaction runs exactly as `Journal.transaction` runs it, so an idle appliance pays nothing extra.

Nothing waits to fill a group: the group is whatever queued during the previous commit (adaptive batching),
so a group commit never adds latency, it only removes fsyncs.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.issuance.journal import Journal

# Transactions in one group at most: bounds how long one COMMIT holds the write lock and how much work one
# failing COMMIT fails. The issuance core already puts up to batch_max requests into each of its transactions.
GROUP_MAX = 64


@dataclass(eq=False)
class _Pending:
    fn: Callable[[sqlite3.Connection], Any]
    doing: str
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    ok: bool = False
    result: Any = None
    error: BaseException | None = None


def _deliver(p: _Pending) -> None:
    """Set the caller's future on its event loop (called there)."""
    if p.future.done():  # cancelled meanwhile: the transaction ran (or not) all the same, as with a thread
        return
    if p.error is not None:
        p.future.set_exception(p.error)
    else:
        p.future.set_result(p.result)


class GroupCommitter:
    """The queue of a journal's async transactions and the job that commits them together on its thread."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._lock = threading.Lock()
        self._pending: list[_Pending] = []
        self._scheduled = False  # a _run job is queued on the journal thread and has not taken the queue yet
        self.groups = 0  # COMMITs that served more than one transaction (for the benches)
        self.grouped = 0  # transactions committed in those

    async def run(self, fn: Callable[[sqlite3.Connection], Any], doing: str) -> Any:
        loop = asyncio.get_running_loop()
        p = _Pending(fn, doing, loop.create_future(), loop)
        with self._lock:
            self._pending.append(p)
            if not self._scheduled:
                # Submitted while the lock is held: a transaction queued after this one is either in this
                # job's group or in a job submitted after it, so every async transaction still commits before
                # the work submitted to the journal thread after it (a read sees what was written before it).
                self.journal._executor.submit(self._run)
                self._scheduled = True
        return await p.future

    def _run(self) -> None:
        """On the journal thread: take what is queued now and commit it as one transaction."""
        with self._lock:
            group, self._pending = self._pending[:GROUP_MAX], self._pending[GROUP_MAX:]
            if self._pending:
                self.journal._executor.submit(self._run)  # the rest in the next group
            else:
                self._scheduled = False
        group = [p for p in group if not p.future.cancelled()]
        if len(group) == 1:
            self._alone(group[0])
        elif group:
            self._together(group)
        for p in group:
            with contextlib.suppress(RuntimeError):  # the caller's loop is closed: nobody waits any more
                p.loop.call_soon_threadsafe(_deliver, p)

    def _alone(self, p: _Pending) -> None:
        try:
            p.result = self.journal.transaction(p.fn, p.doing)
            p.ok = True
        except BaseException as exc:  # noqa: BLE001 - handed to the caller, as its own call would raise it
            p.error = exc

    def _together(self, group: list[_Pending]) -> None:
        from appliance.issuance.journal import journal_error

        journal = self.journal
        conn = journal.conn
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            for p in group:
                p.error = journal_error(exc, p.doing)
            return
        lost: sqlite3.Error | None = None  # set when SQLite rolled the whole transaction back by itself
        for p in group:
            if lost is not None:
                p.error = journal_error(lost, p.doing)
                continue
            try:
                conn.execute("SAVEPOINT grouped")
            except sqlite3.Error as exc:
                lost = exc
                p.error = journal_error(exc, p.doing)
                continue
            try:
                p.result = p.fn(conn)
                conn.execute("RELEASE grouped")
                p.ok = True
            except BaseException as exc:  # noqa: BLE001 - rolled back alone and handed to its caller
                p.error = journal_error(exc, p.doing) if isinstance(exc, sqlite3.Error) else exc
                if not conn.in_transaction:
                    # e.g. disk full: SQLite already rolled back everything, the others' writes included.
                    lost = exc if isinstance(exc, sqlite3.Error) else sqlite3.OperationalError(str(exc))
                    continue
                try:
                    conn.execute("ROLLBACK TO grouped")
                    conn.execute("RELEASE grouped")
                except sqlite3.Error as exc2:
                    lost = exc2
        if lost is None:
            try:
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                lost = exc
            else:
                self.groups += 1
                self.grouped += len(group)
                if journal.commit_observer is not None:
                    journal.commit_observer(time.perf_counter() - started)
                return
        # Nothing of this group is durable: every transaction that had succeeded fails with the journal's error.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        for p in group:
            if p.ok:
                p.ok, p.result = False, None
                p.error = journal_error(lost, p.doing)
