"""The daemon's observer: it hears the issuance core, the alarms and the station server, counts (Stats), keeps
what each station last did, and publishes events to the control API's stream (EventBus).

Everything here runs on the event loop except the alarm listener and the journal's commit timer, which may be
called on the journal or PKCS#11 thread and only hand over (publish_threadsafe, a locked histogram).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.alarms import Alarm, Alarms
from appliance.control.events import EventBus
from appliance.control.stats import Stats
from appliance.issuance.observe import Confirmation, Outcome
from console import wire

# A device serial or station name on the stream is the peer's text, bounded; the client escapes it for display.
TEXT_MAX = 128
STATION_POLL_S = 0.25
ISSUING_RECENT_S = 10.0  # a station that issued within this is "issuing"
ERROR_RECENT_S = 60.0  # ... whose last answer was a refusal within this is "error"


def _text(value: str | None) -> str | None:
    return None if value is None else value[:TEXT_MAX]


@dataclass
class StationActivity:
    """What the issuance core last did for one station (the station server's StationState says the rest)."""

    issued: int = 0
    refused: int = 0
    confirmed: int = 0
    last_device_serial: str | None = None
    last_issued_at: float | None = None
    last_refusal: dict[str, Any] | None = None  # {"code", "reason", "device_serial", "time"}

    def snapshot(self) -> dict[str, Any]:
        return {
            "issued": self.issued, "refused": self.refused, "confirmed": self.confirmed,
            "last_device_serial": self.last_device_serial, "last_issued_at": self.last_issued_at,
            "last_refusal": self.last_refusal,
        }  # fmt: skip


# What the hub reads of each station from the station server: name -> (connected, authenticated, peer).
StationProbe = Callable[[], Mapping[str, tuple[bool, bool, str | None]]]


class ControlHub:
    """IssuanceObserver for the core; publishes to `bus`, counts in `stats`."""

    def __init__(self, alarms: Alarms, bus: EventBus | None = None, stats: Stats | None = None) -> None:
        self.bus = bus or EventBus()
        self.stats = stats or Stats()
        self.alarms = alarms
        self.activity: dict[str, StationActivity] = {}
        self.started_at = time.time()
        self._probe: StationProbe | None = None
        self._seen: dict[str, tuple[bool, bool, str | None]] = {}
        self._watcher: asyncio.Task[None] | None = None
        alarms.subscribe(self._on_alarm)

    # -- lifecycle ----------------------------------------------------------------------------------------------
    async def __aenter__(self) -> ControlHub:
        self.bus.bind(asyncio.get_running_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    def watch_stations(self, probe: StationProbe) -> None:
        """Poll the station server every STATION_POLL_S for connects and disconnects (the stations package
        knows nothing of the appliance, so it is read, not hooked)."""
        self._probe = probe
        self._seen = dict(probe())
        self._watcher = asyncio.get_running_loop().create_task(self._watch(), name="control-station-watch")

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(STATION_POLL_S)
            self.poll_stations()

    def poll_stations(self) -> None:
        assert self._probe is not None
        now = dict(self._probe())
        for name in sorted(set(now) | set(self._seen)):
            before = self._seen.get(name, (False, False, None))
            after = now.get(name, (False, False, None))
            if before[:2] == after[:2]:
                continue
            if after[0] != before[0]:
                state = "connected" if after[0] else "disconnected"
            else:
                state = "authenticated" if after[1] else "unauthenticated"
            self.bus.publish(
                wire.EVENT_STATION, {"station": name, "state": state, "peer": after[2] or before[2]}
            )
        self._seen = now

    # -- IssuanceObserver -------------------------------------------------------------------------------------
    def answered(self, outcome: Outcome) -> None:
        station, product = outcome.station, outcome.product or ""
        act = self.activity.get(station)
        if act is None:
            act = self.activity[station] = StationActivity()
        serial = _text(outcome.device_serial)
        act.last_device_serial = serial
        error = outcome.error
        if error is not None:
            code = error.code.name
            self.stats.refused[(station, product, code)] += 1
            act.refused += 1
            act.last_refusal = {"code": code, "reason": error.message[:300], "device_serial": serial,
                                "time": time.time()}  # fmt: skip
            kind = wire.EVENT_REFUSED
        elif outcome.pending:
            self.stats.pending[(station, product)] += 1
            kind = wire.EVENT_PENDING
        else:
            if outcome.reused:
                self.stats.reused[(station, product)] += 1
            else:
                self.stats.issued[(station, product)] += 1
                self.stats.per_second.add()
                self.stats.per_minute.add()
                act.issued += 1
            act.last_issued_at = time.time()
            kind = wire.EVENT_ISSUED
        if not self.bus.subscribers:
            self.bus.skip()  # no console: nothing to build
            return
        data: dict[str, Any] = {
            "station": station, "device_serial": serial, "work_order": outcome.work_order, "product": outcome.product,
            "profile": outcome.profile, "front_end": outcome.front_end,
        }  # fmt: skip
        if error is not None:
            data["code"], data["code_number"], data["reason"] = (
                error.code.name,
                int(error.code),
                error.message[:300],
            )
        elif kind == wire.EVENT_ISSUED:
            data["cert_serial"], data["reused"] = outcome.cert_serial, outcome.reused
        self.bus.publish(kind, data)

    def signed(self, certificates: int, seconds: float) -> None:
        self.stats.sign_seconds.observe(seconds)
        self.stats.signed_certificates += certificates

    def confirmed(self, confirmations: list[Confirmation]) -> None:
        for c in confirmations:
            self.stats.confirmed[c.station] += 1
            self.stats.confirmation_lag.observe(max(0.0, c.lag_s))
            act = self.activity.get(c.station)
            if act is not None:
                act.confirmed += 1
            self.bus.publish(wire.EVENT_CONFIRMED, {
                "station": c.station, "device_serial": _text(c.device_serial), "cert_serial": c.cert_serial,
                "lag_s": round(c.lag_s, 3),
            })  # fmt: skip

    def journal_committed(self, seconds: float) -> None:
        self.stats.commit_seconds.observe(seconds)

    # -- alarms ---------------------------------------------------------------------------------------------------
    def _on_alarm(self, event: str, alarm: Alarm) -> None:
        self.bus.publish_threadsafe(wire.EVENT_ALARM, {"action": event, "alarm": alarm.snapshot()})

    def station_state(
        self, name: str, connected: bool, enrolling: int, paused: bool, enabled: bool, linkless: bool = False
    ) -> str:
        """issuing / idle / paused / error / disconnected / disabled (docs/control-api.md, "Stations"). A
        `linkless` station (one a CMP, EST or SCEP label acts as: each request is its own HTTP exchange) is never
        disconnected: its state comes from its answers alone."""
        if not enabled:
            return "disabled"
        if paused:
            return "paused"
        if not connected and not linkless:
            return "disconnected"
        act = self.activity.get(name)
        now = time.time()
        if (
            act is not None
            and act.last_refusal is not None
            and now - act.last_refusal["time"] < ERROR_RECENT_S
        ) and (act.last_issued_at is None or act.last_issued_at < act.last_refusal["time"]):
            return "error"
        if enrolling or (
            act is not None and act.last_issued_at is not None and now - act.last_issued_at < ISSUING_RECENT_S
        ):
            return "issuing"
        return "idle"
