"""Stations an operator has paused: the issuance core refuses them STATION_PAUSED until they are resumed.

A pause is a row in `station_pause` (it survives a restart: an operator who stopped a fixture expects it to stay
stopped) and a dict in memory that the core reads on its hot path (one lookup per request). Pausing and resuming
write the row and its audit entry in one transaction, under the person who did it; who may do it is decided
by the caller (appliance/control/actions.py: the same roles as the CLI).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink

EVENT_PAUSE = "station.pause"
EVENT_RESUME = "station.resume"


@dataclass(frozen=True)
class Pause:
    station: str
    paused_by: str
    reason: str
    paused_at: float

    def refusal(self) -> IssuanceRefused:
        return IssuanceRefused(
            f"station {self.station} is paused (by {self.paused_by}: {self.reason}); an operator resumes it on"
            " the console",
            ReasonCode.STATION_PAUSED,
            {"paused_by": self.paused_by},
        )

    def snapshot(self) -> dict[str, object]:
        return {"paused_by": self.paused_by, "reason": self.reason, "paused_at": self.paused_at}


class PauseError(Exception):
    """A pause or resume that cannot be done: no such station (`missing`), or already in that state."""

    def __init__(self, message: str, *, missing: bool = False) -> None:
        super().__init__(message)
        self.missing = missing


class StationPauses:
    """The paused stations. `load()` once (the issuance service does at start); then `get()` is a dict lookup."""

    def __init__(self, journal: Journal, clock: Callable[[], float] = time.time) -> None:
        self.journal = journal
        self.clock = clock
        self._paused: dict[str, Pause] = {}

    def load_in(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute("SELECT station, paused_by, reason, paused_at FROM station_pause").fetchall()
        self._paused = {str(r[0]): Pause(str(r[0]), str(r[1]), str(r[2]), float(r[3])) for r in rows}

    async def load(self) -> None:
        await self.journal.acall(lambda: self.load_in(self.journal.conn))

    @property
    def paused(self) -> bool:
        """Any station paused (the core's hot path skips the per-request lookup when none is)."""
        return bool(self._paused)

    def get(self, station: str) -> Pause | None:
        return self._paused.get(station)

    def all(self) -> dict[str, Pause]:
        return dict(self._paused)

    async def pause(self, station: str, actor: str, reason: str, audit: AuditSink, **extra: object) -> Pause:
        now = self.clock()

        def txn(conn: sqlite3.Connection) -> Pause:
            if conn.execute("SELECT 1 FROM stations WHERE name=?", (station,)).fetchone() is None:
                raise PauseError(f"no station named {station!r}", missing=True)
            if conn.execute("SELECT 1 FROM station_pause WHERE station=?", (station,)).fetchone():
                raise PauseError(f"station {station!r} is already paused")
            conn.execute(
                "INSERT INTO station_pause (station, paused_by, reason, paused_at) VALUES (?,?,?,?)",
                (station, actor, reason, now),
            )
            audit.append(conn, actor, EVENT_PAUSE, {"station": station, "reason": reason, **extra})
            return Pause(station, actor, reason, now)

        pause = await self.journal.atransaction(txn, f"pausing station {station}")
        self._paused[station] = pause
        return pause

    async def resume(self, station: str, actor: str, audit: AuditSink, **extra: object) -> Pause:
        def txn(conn: sqlite3.Connection) -> Pause:
            row = conn.execute(
                "SELECT paused_by, reason, paused_at FROM station_pause WHERE station=?", (station,)
            ).fetchone()
            if row is None:
                raise PauseError(f"station {station!r} is not paused")
            conn.execute("DELETE FROM station_pause WHERE station=?", (station,))
            paused_for = round(self.clock() - float(row[2]), 1)
            audit.append(conn, actor, EVENT_RESUME, {"station": station, "paused_for_s": paused_for, **extra})
            return Pause(station, str(row[0]), str(row[1]), float(row[2]))

        pause = await self.journal.atransaction(txn, f"resuming station {station}")
        self._paused.pop(station, None)
        return pause
