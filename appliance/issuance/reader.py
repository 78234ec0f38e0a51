"""A second, read-only connection to the journal on a thread of its own, for lookups on a request's hot path.

The journal thread runs every transaction, and a transaction waits for its fsync there; a lookup queued on
that thread (a station's ENROLL first looks its request id up) waits behind every commit queued before it:
the stage bench (bench/station_stages.py) saw such a lookup take 149 ms at the 99th percentile under load
while the query itself takes a tenth of a millisecond. In WAL mode a reader does not wait for the writer, so
the lookup runs here instead. It reads what is committed when it runs, as a lookup on the journal thread
between two transactions would: never a half-done transaction; a write whose caller has been answered is seen.

The connection is opened on first use, on the reader's thread (a SQLite connection stays on one thread), with
`query_only` so that nothing here can ever write.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


class JournalReader:
    def __init__(self, path: Path) -> None:
        self.path = path
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="journal-read"
        )
        self._conn: sqlite3.Connection | None = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=30.0)
            conn.execute("PRAGMA query_only=ON")
            self._conn = conn
        return self._conn

    def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        return fn(self._connection())

    async def read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(conn)` on the reader thread; sqlite3 errors are raised as they are."""
        return await asyncio.wrap_future(self._executor.submit(self._run, fn))

    def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        self._executor.submit(_close).result()
        self._executor.shutdown(wait=True)
