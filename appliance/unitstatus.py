"""The daemon under systemd: READY, the watchdog pings and the STATUS line of `systemctl status birthline`.

    async with Daemon(config) as daemon:             # the HSM login, the journal, every listener are up
        async with UnitReporter(Notifier.from_environment(), daemon_figures(daemon)):   # READY=1 ... STOPPING=1
            await daemon.wait()

WATCHDOG=1 is sent by a task on the daemon's event loop, never by a thread: a loop that is stuck (a blocking
call, a runaway callback) stops the pings, and systemd kills and restarts the daemon after WatchdogSec.

The STATUS line is what an administrator reads first: certificates issued today, stations connected, the
active alarms, and, first of all, a clock behind the last issuance (issuance is refused until it is set right).
It is looked at every CHECK_S and sent when it changes, at most once per PACE_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from appliance.alarms import Alarm
from appliance.sdnotify import Notifier

if TYPE_CHECKING:
    from appliance.daemon import Daemon

log = logging.getLogger(__name__)

__all__ = ["CLOCK_ALARM", "DaemonFigures", "Figures", "UnitReporter", "issued_since", "status_line"]

CHECK_S = 1.0
PACE_S = 5.0
ALARMS_NAMED = 3  # causes named in the line; the rest are counted
RECOUNT_S = 60.0  # the journal is counted again at least this often (`birthline issue` beside the daemon)
CLOCK_ALARM = "issuance.clock-not-trusted"
ISSUED_STATES = "('issued', 'confirmed', 'reworked', 'scrapped')"  # the rows that hold a certificate


@dataclass(frozen=True)
class Figures:
    issued_today: int
    connected: int  # stations with a link (serial or LAN) connected now
    stations: int  # enabled stations with a link of their own (CMP, EST, SCEP labels have none)
    alarms: list[Alarm] = field(default_factory=list)


def status_line(f: Figures) -> str:
    """One line, most urgent first: `systemctl status` shows it as `Status: "..."`."""
    parts = []
    clock = next((a for a in f.alarms if a.cause == CLOCK_ALARM), None)
    if clock is not None:
        parts.append("ISSUANCE REFUSED: the clock is behind the last issuance, set the time")
    parts.append(f"{f.issued_today} issued today")
    parts.append(f"{f.connected} of {f.stations} station{'s' if f.stations != 1 else ''} connected")
    if not f.alarms:
        parts.append("no alarms")
    else:
        critical = sum(1 for a in f.alarms if a.severity == "critical")
        named = ", ".join(a.cause for a in f.alarms[:ALARMS_NAMED])
        more = f" and {len(f.alarms) - ALARMS_NAMED} more" if len(f.alarms) > ALARMS_NAMED else ""
        parts.append(
            f"{len(f.alarms)} alarm{'s' if len(f.alarms) != 1 else ''} ({critical} critical): {named}{more}"
        )
    return "; ".join(parts)


def issued_since(conn: sqlite3.Connection, since: float) -> int:
    """Certificates issued from `since` (a POSIX time) on. The issuance table has no index on time; rows are
    written in time order (the clock check keeps it within [issuance] clock_skew_s), so the first row of the
    period is found by bisecting the row ids, and only that period's rows are counted: a ten-year journal costs
    a few dozen lookups, not a scan."""
    lo, hi = conn.execute("SELECT MIN(id), MAX(id) FROM issuance").fetchone()
    if lo is None:
        return 0
    hi += 1
    while lo < hi:
        mid = (lo + hi) // 2
        row = conn.execute(
            "SELECT created_at FROM issuance WHERE id >= ? ORDER BY id LIMIT 1", (mid,)
        ).fetchone()
        if row is None or row[0] >= since:
            hi = mid
        else:
            lo = mid + 1
    sql = f"SELECT COUNT(*) FROM issuance WHERE id >= ? AND state IN {ISSUED_STATES}"  # a constant, no input
    return int(conn.execute(sql, (lo,)).fetchone()[0])


def local_midnight(now: float) -> float:
    day = datetime.datetime.fromtimestamp(now).astimezone()
    return day.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()


class DaemonFigures:
    """The figures of a running Daemon. The journal is counted on its own thread, and only when the day
    changed, the daemon issued since the last count, or RECOUNT_S passed: most looks cost no journal read."""

    def __init__(self, daemon: Daemon, clock: Callable[[], float] = time.time) -> None:
        self.daemon = daemon
        self.clock = clock
        self._counted: tuple[float, int, float] | None = None  # (midnight, issued by the daemon, monotonic)
        self._today = 0
        cfg = daemon.config
        # Stations a CMP, EST or SCEP label acts as have no link of their own: never "connected".
        self._linkless = {
            label.station for section in (cfg.cmp, cfg.est, cfg.scep) if section.listen
            for label in section.labels.values()
        }  # fmt: skip

    async def __call__(self) -> Figures:
        d = self.daemon
        assert d.core is not None and d.server is not None
        journal, midnight = d.core.journal, local_midnight(self.clock())
        issued = sum(d.control.hub.stats.issued.values()) if d.control is not None else -1
        last = self._counted
        if (
            last is None
            or last[:2] != (midnight, issued)
            or issued < 0
            or time.monotonic() - last[2] > RECOUNT_S
        ):
            self._today = await journal.acall(lambda: issued_since(journal.conn, midnight))
            self._counted = (midnight, issued, time.monotonic())
        linked = [r.name for r in d.registered_stations() if r.enabled and r.name not in self._linkless]
        states = d.server.states
        connected = sum(1 for name in linked if name in states and states[name].connected)
        return Figures(self._today, connected, len(linked), d.core.alarms.active())


class UnitReporter:
    """READY=1 on entry, WATCHDOG=1 and STATUS= while inside, STOPPING=1 on exit. `figures` is awaited on the
    event loop at every look (DaemonFigures for the daemon)."""

    def __init__(
        self,
        notifier: Notifier,
        figures: Callable[[], Awaitable[Figures]],
        *,
        check_s: float = CHECK_S,
        pace_s: float = PACE_S,
    ) -> None:
        self.notifier = notifier
        self.figures = figures
        self.check_s = check_s
        self.pace_s = pace_s
        self.sent_status: str | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def _line(self) -> str:
        return status_line(await self.figures())

    async def __aenter__(self) -> UnitReporter:
        line = await self._line()
        self.notifier.send(READY=1, STATUS=line)
        self.sent_status = line
        log.info("ready: %s", line)
        loop = asyncio.get_running_loop()
        if (interval := self.notifier.watchdog_interval_s) is not None:
            self._tasks.append(loop.create_task(self._watchdog(interval), name="systemd-watchdog"))
        if self.notifier.enabled:
            self._tasks.append(loop.create_task(self._status(), name="systemd-status"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.notifier.send(STOPPING=1, STATUS="stopping")
        self.notifier.close()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.send(WATCHDOG=1)
            await asyncio.sleep(interval)

    async def _status(self) -> None:
        last_sent = time.monotonic()
        while True:
            await asyncio.sleep(self.check_s)
            try:
                line = await self._line()
            except Exception:  # a status line is never worth the daemon; logged, tried again
                log.exception("building the systemd STATUS line failed")
                continue
            if line == self.sent_status:
                continue
            wait = self.pace_s - (time.monotonic() - last_sent)
            if wait > 0:
                await asyncio.sleep(wait)
                line = await self._line()
            self.notifier.send(STATUS=line)
            self.sent_status, last_sent = line, time.monotonic()
