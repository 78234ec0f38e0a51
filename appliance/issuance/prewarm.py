"""After a start, read the journal's public-key index into the page cache, in the background.

Every certificate checks and inserts its device key's hash in `issuance_key`, and a hash lands on a random page of
an index that holds every key ever certified (about 450 MB for ten million). After a reboot none of it is cached,
so each certificate waited for one random read from disk: on a ten-million journal issuance ran at 55 to 74% of
its rate on a small journal, and at 73 to 95% once the index had been read through once, in order, which
took 7 to 12 s (docs/performance.md "Ten years of journal", the prewarm and run 7). The other indexes
issuance writes grow at their end (serials and request ids are time-ordered, device serials mostly
sequential), so their pages in use are few and soon cached. (The outbox's transactionID, random by RFC 9483,
was indexed too until schema 6, which dropped that index: schema.py.)

The read is one covering scan of the index on a read-only connection of its own, on a thread: the daemon starts
and issues meanwhile (a certificate then pays the random read as before), nothing is locked (WAL readers block
no writer), and it costs page cache, which the kernel takes back under memory pressure, not the daemon's memory.
It is skipped when the index is estimated at more than half the memory available (it would only push itself out
again), and stopped at once when the daemon stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final

log = logging.getLogger(__name__)

INDEX: Final = "issuance_key"
SCAN_SQL: Final = f"SELECT COUNT(public_key_sha256) FROM issuance INDEXED BY {INDEX}"
# Bytes of index per issuance row: a 32-byte hash, the row id, the cell's header and pointer, pages ~90% full.
ENTRY_BYTES: Final = 52


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo, in bytes; None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


@dataclass(frozen=True)
class Prewarmed:
    keys: int  # index entries read; 0 when skipped or stopped
    seconds: float
    skipped: str | None = None  # why it was not read


class JournalPrewarm:
    """`async with JournalPrewarm(journal_path):` reads INDEX through once in the named task "journal-prewarm";
    leaving stops the read. `result` says what was done once the task ends."""

    TASK_NAME = "journal-prewarm"

    def __init__(self, path: Path, *, available: Callable[[], int | None] = mem_available) -> None:
        self.path = path
        self.available = available
        self.result: Prewarmed | None = None
        self._conn: sqlite3.Connection | None = (
            None  # while the scan's connection is open (tests wait for it)
        )
        self._stopped = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> JournalPrewarm:
        self._task = asyncio.create_task(self._run(), name=self.TASK_NAME)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def stop(self) -> None:
        """End the scan now, from any thread: its statement ends with OperationalError "interrupted" at the
        progress handler's next check (a few thousand VM steps), whichever statement is running or starts next."""
        self._stopped = True

    async def _run(self) -> None:
        # The thread ends by itself once stopped (the progress handler); the task only waits for it.
        self.result = await asyncio.to_thread(self.read)
        r = self.result
        if r.skipped is not None:
            log.info("journal prewarm skipped: %s", r.skipped)
        elif r.keys:
            log.info(
                "journal prewarm: %d public-key hashes read into the page cache in %.1f s", r.keys, r.seconds
            )

    def read(self) -> Prewarmed:
        """The scan, on the calling thread. Never raises: a journal it cannot read is the daemon's to report."""
        started = time.monotonic()
        try:
            conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            return Prewarmed(0, 0.0, f"the journal does not open read-only ({exc})")
        try:
            # Checked while any statement runs (sqlite3_interrupt would miss a stop that falls between two).
            conn.set_progress_handler(lambda: int(self._stopped), 1000)
            self._conn = conn
            conn.execute("PRAGMA cache_size=-1024")  # the pages are wanted in the kernel's cache, not in ours
            rows = int(conn.execute("SELECT COALESCE(MAX(id), 0) FROM issuance").fetchone()[0])
            estimate = rows * ENTRY_BYTES
            available = self.available()
            if available is not None and estimate > available // 2:
                return Prewarmed(
                    0, 0.0, f"the index ({estimate >> 20} MB estimated) is more than half the memory available"
                    f" ({available >> 20} MB): each certificate reads its page from disk instead",
                )  # fmt: skip
            keys = int(conn.execute(SCAN_SQL).fetchone()[0])
            return Prewarmed(keys, time.monotonic() - started)
        except sqlite3.Error as exc:
            stopped = "the daemon is stopping" if self._stopped else f"the index was not read ({exc})"
            return Prewarmed(0, time.monotonic() - started, stopped)
        finally:
            self._conn = None
            conn.close()
