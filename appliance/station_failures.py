"""Failed station handshakes and forged frames: audited in bounded space, logged once per cause, alarmed.

The station server reports every failed handshake (AUTH_FAILED, UNKNOWN_STATION, STATION_DISABLED,
UNSUPPORTED_VERSION, and the BUSY of a station over its failure limit) and every frame it refused as forged or
replayed (BAD_TAG, REPLAY); the daemon adds TLS connections whose certificate no station owns. Each is a fact an
auditor may want, but a broken or hostile fixture can cause thousands a minute, so they are kept the way refused
issuance requests are (issuance/refusals.py): per station (or, where no station is known, per peer), the first
`burst` of each `window_s` are audited in full as `station.link-refused`, the rest only counted and audited as
one `station.link-refused-summary` when the window closes. Entries are written by a background task, in one
transaction per pass, never on the path of the frame that caused them.

The log gets one line per cause (station and code) per window (alarms.LogOnce), and a station that reaches the
server's failure limit raises the alarm `station.link-failing:<station>`, cleared when it authenticates again.

This module is core: it knows nothing of the stations package; the daemon adapts the server's reports to it.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable

from appliance.alarms import Alarms, LogOnce
from appliance.audit.log import AuditLog
from appliance.errors import BirthlineError
from appliance.issuance.refusals import RefusalLimiter
from appliance.lifecycle import PollingTask

log = logging.getLogger(__name__)

MAX_PENDING = 10_000  # entries waiting for the next pass; beyond this (journal away) they are only counted
ALARM_CAUSE = "station.link-failing:"


class LinkFailures(PollingTask):
    """An async context manager (a PollingTask): ``failed()`` and ``authenticated()`` from the event loop."""

    TASK_NAME = "station-link-audit"

    def __init__(
        self,
        audit: AuditLog,
        alarms: Alarms,
        *,
        burst: int = 10,
        window_s: float = 60.0,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(poll_s)
        self.audit = audit
        self.alarms = alarms
        self.clock = clock
        self._limiter = RefusalLimiter(burst, window_s)
        self._log = LogOnce(interval_s=window_s)
        self._pending: list[dict[str, object]] = []
        self._lost = 0  # admitted entries that found the queue full
        self.stats = {"failed": 0, "audited": 0, "suppressed": 0}

    def failed(
        self,
        *,
        station: str,
        peer: str,
        code: str,
        text: str,
        claimed: str = "",
        blocked_s: float = 0.0,
    ) -> None:
        """One failed handshake or refused frame. ``station`` is the station the port or certificate is bound
        to, or a ``tls-cert:`` key (a certificate no station owns) where none is; ``code`` the protocol code's name; ``text`` ours."""
        now = self.clock()
        self.stats["failed"] += 1
        if self._limiter.admit(station, code, now):
            entry: dict[str, object] = {
                "station": station,
                "peer": peer,
                "code": code,
                "reason": text,
                "at": now,
            }
            if claimed and claimed != station:
                entry["claimed"] = claimed
            if blocked_s:
                entry["blocked_s"] = blocked_s
            if len(self._pending) < MAX_PENDING:
                self._pending.append(entry)
            else:
                self._lost += 1
        else:
            self.stats["suppressed"] += 1
        self._log.log(
            log, logging.WARNING, f"station.{code.lower()}:{station}",
            "station link %s (%s): %s: %s", station, peer, code, text,
        )  # fmt: skip
        if blocked_s and station.startswith("tls-cert:"):
            # No station to block: the certificate is refused before any handshake anyway, so only say what
            # keeps happening (the audit entries name the addresses).
            self.alarms.raise_alarm(
                ALARM_CAUSE + station,
                f"{station} (a TLS certificate no enabled station owns) keeps connecting ({code}: {text});"
                " each attempt is refused at once and audited in bounded space",
                "a retired or rotated fixture's certificate is still in use: find the host by the addresses in the"
                " audit (station.link-refused) and remove the old bundle",
                severity="warning",
            )
        elif blocked_s:
            self.alarms.raise_alarm(
                ALARM_CAUSE + station,
                f"station {station} keeps failing ({code}: {text}); its handshakes are refused (BUSY) for"
                f" {blocked_s:.0f} s",
                "check the fixture's credential bundle (a rotated key?), its port or certificate; if nobody is"
                " working on this station, someone may be trying its link (audit: station.link-refused)",
                severity="warning",
            )
        self.nudge()

    def authenticated(self, station: str) -> None:
        self.alarms.clear(ALARM_CAUSE + station, "the station authenticated")

    async def _poll(self) -> None:
        await self._flush()

    async def _stopping(self) -> None:
        await self._flush(final=True)

    async def _flush(self, *, final: bool = False) -> None:
        now = self.clock()
        # Taken here, on the event loop: the limiter is not shared with the journal thread.
        summaries = self._limiter.due(now, all_windows=final)
        items, lost = self._pending, self._lost
        if not (items or lost or summaries):
            return
        self._pending, self._lost = [], 0

        def txn(conn: sqlite3.Connection) -> int:
            if items or lost:
                data: dict[str, object] = {"items": items}
                if lost:
                    data["not_recorded"] = lost
                self.audit.append(conn, "appliance", "station.link-refused", data)
            if summaries:
                self.audit.append(conn, "appliance", "station.link-refused-summary", {"items": summaries})
            return len(items)

        try:
            self.stats["audited"] += await self.audit.journal.atransaction(
                txn, "auditing station link failures"
            )
        except BirthlineError as exc:
            # Kept for the next pass, within the bound. This pass's summaries are lost with the rollback (their
            # windows have left the limiter): that costs counts, never an issuance.
            self._pending = items[: MAX_PENDING - len(self._pending)] + self._pending
            self._lost += lost
            self._log.log(
                log,
                logging.WARNING,
                "station.link-audit",
                "could not audit station link failures: %s",
                exc.message,
            )
