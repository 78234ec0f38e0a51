"""The durable issuance journal (SQLite, WAL, synchronous=FULL).

Rows follow the saved state machine of reliability.md section 1:
    intent  - serial reserved, exact TBS hash recorded; committed BEFORE the HSM signs
    issued  - certificate stored; committed BEFORE the station is answered
    confirmed - the station confirmed it stored the certificate
    burned  - an intent whose signature was never released (crash, HSM or journal fault); its serial stays
              reserved forever so it can never be reused.
    reworked - a supervisor authorised a new key for this device (appliance/production): the row keeps its
              certificate, leaves the one-live-row-per-device index, and the device may be issued once more.
    scrapped - the device was destroyed (appliance/production); its certificate is to be revoked, and the
              serial stays taken: it is never issued again.

All SQLite work runs on one thread owned by the journal: the connection never crosses threads, and a slow
fsync never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from appliance.errors import IssuanceFailed, ReasonCode
from appliance.issuance.groupcommit import GroupCommitter
from appliance.issuance.reader import JournalReader
from appliance.issuance.schema import SCHEMA, SCHEMA_VERSION, migrate

T = TypeVar("T")
log = logging.getLogger(__name__)
# How long systemd is asked to wait for one version's migration (EXTEND_TIMEOUT_USEC, counted from its start),
# beyond the unit's own start timeout: 5 -> 6 took about 23 s a GB of outbox (docs/operations.md "Upgrading").
MIGRATION_TIMEOUT_S = 3600
# What the rest of the start gets after a migration: systemd/birthline.service's TimeoutStartSec.
START_TIMEOUT_S = 600
# How long a connection waits for another process's write lock before it gives up (sqlite3's timeout).
BUSY_TIMEOUT_S = 30.0
# The WAL file's size once a checkpoint has emptied it (journal_size_limit); in normal running it stays far below.
WAL_SIZE_LIMIT = 64 * 1024 * 1024

ORIGIN_SQL = """WITH RECURSIVE origin(id, updates, depth) AS (
    SELECT id, updates, 0 FROM issuance WHERE id = ?
    UNION ALL SELECT i.id, i.updates, o.depth + 1 FROM issuance i JOIN origin o ON i.id = o.updates
        WHERE o.depth < 10000)
"""
"""A WITH clause: `origin` is the issuance row given and, back along key updates (issuance.updates), every
certificate it replaced, nearest first (`depth`). A key update takes no work-order unit: its work order and
product are those of the first certificate of the device (see work_order_of)."""


def work_order_of(conn: sqlite3.Connection, issuance_id: int) -> str | None:
    """The work order the certificate in `issuance_id` counts under: its unit's, or for a key update the unit of
    the certificate it updated, back to the device's first one."""
    row = conn.execute(
        ORIGIN_SQL + "SELECT u.work_order FROM origin JOIN work_order_unit u ON u.issuance_id = origin.id"
        " ORDER BY origin.depth LIMIT 1",
        (issuance_id,),
    ).fetchone()
    return None if row is None else str(row[0])


@dataclass(frozen=True)
class IssuanceRow:
    id: int
    request_id: str
    station: str
    profile: str
    ca: str
    device_serial: str
    public_key_sha256: bytes
    cert_serial: str
    tbs_sha256: bytes
    state: str
    cert_der: bytes | None
    created_at: float
    issued_at: float | None
    confirmed_at: float | None
    burn_reason: str | None
    updates: int | None = None  # key update: the row of the certificate this one replaced
    updated_by: int | None = None  # the row of the key update that replaced this one

    COLUMNS = (
        "id, request_id, station, profile, ca, device_serial, public_key_sha256, cert_serial, tbs_sha256,"
        " state, cert_der, created_at, issued_at, confirmed_at, burn_reason, updates, updated_by"
    )

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> IssuanceRow:
        return cls(*row)  # type: ignore[arg-type]


def burn_interrupted(conn: sqlite3.Connection) -> list[str]:
    """Burn every intent left by a crash (inside the caller's transaction): its signature, if the HSM made
    one, was never released, and its serial stays reserved. Returns the burned certificate serials."""
    serials = [str(r[0]) for r in conn.execute("SELECT cert_serial FROM issuance WHERE state='intent'")]
    if serials:
        conn.execute("UPDATE issuance SET state='burned', burn_reason='crash-recovery' WHERE state='intent'")
    return serials


def _notify(**fields: object) -> None:
    from appliance.sdnotify import Notifier  # only here: nothing else of the journal speaks to systemd

    notifier = Notifier.from_environment()
    try:
        notifier.send(**fields)
    finally:
        notifier.close()


def _migrating(version: int) -> None:
    """Said before each version's migration: in the log, and to systemd when the daemon runs under it (a
    migration that copies a table of millions of rows takes minutes; the unit's start timeout is ten)."""
    log.warning(
        "migrating the journal from schema %d to %d: this can take minutes on a large journal",
        version,
        version + 1,
    )
    _notify(
        STATUS=f"migrating the journal from schema {version} to {version + 1}",
        EXTEND_TIMEOUT_USEC=MIGRATION_TIMEOUT_S * 1_000_000,
    )


def _migrated(conn: sqlite3.Connection) -> None:
    """After the migrations: the WAL emptied and cut back (a reader holding a snapshot is waited for a second at
    most; journal_size_limit cuts it at a later checkpoint otherwise), and systemd's start timeout back to the
    unit's (the rest of the start, HSM and listeners, has its usual ten minutes again)."""
    conn.execute("PRAGMA busy_timeout=1000")
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    finally:
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
    if busy:
        log.warning("the journal's WAL could not be emptied after the migration (a reader held it): later")
    log.warning("the journal is migrated to schema %d", SCHEMA_VERSION)
    _notify(
        STATUS="starting: journal migrated; HSM login, listeners",
        EXTEND_TIMEOUT_USEC=START_TIMEOUT_S * 1_000_000,
    )


def journal_files(path: Path) -> list[Path]:
    """The database file and the two files SQLite keeps beside it in WAL mode."""
    return [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]


def _create_private(path: Path) -> None:
    """Create the database file 0600 before SQLite opens it. SQLite would create it 0644 less the umask, and it
    gives the -wal and -shm files the database file's mode (os_unix.c findCreateFileMode), so all three are
    private from their first byte. (A umask around the open would do the same, but the umask is per process
    and would race with files other threads create meanwhile.)"""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _connect_read_only(path: Path, params: str) -> sqlite3.Connection:
    conn = sqlite3.connect(
        f"{path.resolve().as_uri()}?{params}", uri=True, isolation_level=None, timeout=BUSY_TIMEOUT_S
    )
    try:
        conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()  # open the file and its WAL index now
    except BaseException:
        conn.close()
        raise
    return conn


def journal_error(exc: BaseException, doing: str) -> IssuanceFailed:
    """Map a SQLite failure once, so every caller fails closed the same way."""
    text = str(exc)
    if "full" in text:
        text = "disk full"
    return IssuanceFailed(
        f"journal unavailable while {doing}: {text}", ReasonCode.JOURNAL_UNAVAILABLE, {"doing": doing}
    )


class Journal:
    """Owns the SQLite file and the one thread that touches it."""

    def __init__(self, path: Path, *, read_only: bool = False) -> None:
        """`read_only`: for commands that only read (see _open_read_only); nothing is created or migrated."""
        self.path = path
        self.read_only = read_only
        self._snapshot: Path | None = None
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="journal")
        self._conn: sqlite3.Connection | None = None
        self._thread_id = self._executor.submit(threading.get_ident).result()
        self.commit_observer: Callable[[float], None] | None = None
        """Called on the journal thread with the seconds each committed transaction took (metrics)."""
        self.group = GroupCommitter(self)
        """Async transactions queued together share one COMMIT (appliance/issuance/groupcommit.py)."""
        self._reader: JournalReader | None = None  # opened by the first aread
        try:
            self.call(self._open_read_only if read_only else self._open)
        except BaseException:
            self._executor.shutdown(wait=False)
            raise

    # -- threading --------------------------------------------------------------------------------------------
    def call(self, fn: Callable[..., T], *args: object) -> T:
        if threading.get_ident() == self._thread_id:
            return fn(*args)  # already on the journal thread: waiting on ourselves would deadlock
        return self._executor.submit(fn, *args).result()

    async def acall(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.wrap_future(self._executor.submit(fn, *args))

    async def aread(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """`fn(conn)` for a read that must not wait behind commits (a request's lookup): on a read-only second
        connection with a thread of its own (appliance/issuance/reader.py). It sees what is committed."""
        if self.read_only:
            return await self.acall(lambda: fn(self.conn))
        if self._reader is None:
            self._reader = JournalReader(self.path)
        return await self._reader.read(fn)

    @property
    def conn(self) -> sqlite3.Connection:
        assert self._conn is not None, "journal is closed"
        return self._conn

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()
        if self._conn is not None:
            self.call(self._close)
        self._executor.shutdown(wait=True)

    def _close(self) -> None:
        assert self._conn is not None
        self._conn.close()
        self._conn = None
        if self._snapshot is not None:
            shutil.rmtree(self._snapshot, ignore_errors=True)
            self._snapshot = None

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- setup ---------------------------------------------------------------------------------------------------
    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            _create_private(self.path)
            # isolation_level=None: we issue BEGIN/COMMIT ourselves, so a transaction is exactly what we say.
            conn = sqlite3.connect(self.path, isolation_level=None, timeout=BUSY_TIMEOUT_S)
            conn.execute("PRAGMA journal_mode=WAL")
            # NORMAL can lose committed transactions on power loss in WAL mode; an issued certificate must not.
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            # After a large transaction (a migration's rebuilt table) the WAL file would keep its size for good:
            # with this limit SQLite cuts it back once a checkpoint has emptied it.
            conn.execute(f"PRAGMA journal_size_limit={WAL_SIZE_LIMIT}")
            if migrate(conn, starting=_migrating):
                _migrated(conn)
            conn.executescript(SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                conn.execute(
                    "INSERT INTO meta(key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
            elif int(row[0]) != SCHEMA_VERSION:
                raise IssuanceFailed(
                    f"journal schema {row[0]} is not the supported {SCHEMA_VERSION}",
                    ReasonCode.JOURNAL_UNAVAILABLE,
                )
        except (sqlite3.Error, OSError) as exc:
            raise journal_error(exc, "opening the journal") from exc
        self._conn = conn

    def _open_read_only(self) -> None:
        """Open without write access (SQLite mode=ro): reports, exports and audit verification change nothing,
        and a forensic copy on read-only media can be read.

        In WAL mode a reader needs the -shm index beside the file; SQLite opens it, or creates it when the
        directory is writable. A copy in a read-only directory without its -shm cannot get one. Then, with an
        empty or no -wal, immutable=1 reads the database file exactly; with a -wal that holds transactions
        (which immutable=1 would silently leave out) the file and its -wal are copied into a private temporary
        directory and read there."""
        if not self.path.is_file():
            raise IssuanceFailed(
                f"no journal at {self.path}: `birthline init` creates it (or [appliance] state_dir / [journal]"
                " path name another place)",
                ReasonCode.JOURNAL_UNAVAILABLE,
            )
        wal = self.path.with_name(self.path.name + "-wal")
        try:
            try:
                conn = _connect_read_only(self.path, "mode=ro")
            except sqlite3.OperationalError:
                if not wal.exists() or wal.stat().st_size == 0:
                    conn = _connect_read_only(self.path, "mode=ro&immutable=1")
                else:
                    self._snapshot = Path(tempfile.mkdtemp(prefix="birthline-journal-"))
                    copy = self._snapshot / self.path.name
                    shutil.copyfile(self.path, copy)
                    shutil.copyfile(wal, copy.with_name(wal.name))
                    conn = _connect_read_only(copy, "mode=ro")
            row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        except (sqlite3.Error, OSError) as exc:
            raise journal_error(exc, f"opening {self.path} read-only") from exc
        if row is None or int(row[0]) != SCHEMA_VERSION:
            conn.close()
            raise IssuanceFailed(
                f"journal {self.path} has schema {row[0] if row else '?'}, not {SCHEMA_VERSION}: a command that"
                " writes (birthline init) migrates it",
                ReasonCode.JOURNAL_UNAVAILABLE,
            )
        self._conn = conn

    # -- transactions -----------------------------------------------------------------------------------------
    def transaction(self, fn: Callable[[sqlite3.Connection], T], doing: str) -> T:
        """Run fn inside BEGIN IMMEDIATE .. COMMIT on the journal thread (call from that thread)."""
        conn = self.conn
        started = time.perf_counter()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(conn)
                conn.execute("COMMIT")
                if self.commit_observer is not None:
                    self.commit_observer(time.perf_counter() - started)
            except BaseException:
                # On disk full SQLite may already have rolled back by itself; a second rollback is harmless.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise journal_error(exc, doing) from exc
        return result

    async def atransaction(self, fn: Callable[[sqlite3.Connection], T], doing: str) -> T:
        """`transaction` on the journal thread; the ones queued while another commits share one COMMIT, each in
        its own SAVEPOINT (group commit, appliance/issuance/groupcommit.py)."""
        result: T = await self.group.run(fn, doing)
        return result

    # -- recovery and queries -----------------------------------------------------------------------------------
    def recover(self) -> int:
        """Burn every intent left by a crash, in its own transaction; returns how many (IssueService does the
        same inside the transaction that also audits it)."""
        return len(self.call(lambda: self.transaction(burn_interrupted, "recovering interrupted issuances")))

    def rows(self, where: str = "1=1", params: tuple[object, ...] = ()) -> list[IssuanceRow]:
        def q() -> list[IssuanceRow]:
            cur = self.conn.execute(
                f"SELECT {IssuanceRow.COLUMNS} FROM issuance WHERE {where} ORDER BY id", params
            )
            return [IssuanceRow.from_row(r) for r in cur.fetchall()]

        return self.call(q)

    def counts(self) -> dict[str, int]:
        def q() -> dict[str, int]:
            return dict(self.conn.execute("SELECT state, COUNT(*) FROM issuance GROUP BY state").fetchall())

        return self.call(q)

    def integrity_check(self) -> str:
        return self.call(lambda: str(self.conn.execute("PRAGMA integrity_check").fetchone()[0]))


def now() -> float:
    return time.time()


__all__ = [
    "SCHEMA_VERSION",
    "IssuanceRow",
    "Journal",
    "burn_interrupted",
    "journal_error",
    "journal_files",
    "now",
    "work_order_of",
]
