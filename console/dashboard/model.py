"""What the dashboard knows about the line: the status document plus the events that came after it.

Pure data, no I/O and no Textual: the link (console/dashboard/link.py) feeds it, the widgets read it. The
control API's rule for missing nothing (docs/control-api.md, "Events") is kept here: events are applied to the
counters only when their `seq` is above the status document's `seq`, and kept a little while so that the next
status document (which replaces the counters) gets them applied again on top. Every event goes to the log once.

Times are the daemon's (the status document's `time`, each event's `time`), never this process's clock, so what
is shown depends only on what the daemon said.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from console import wire

LOG_MAX: Final = 500  # log entries kept (and shown) by the dashboard
LOG_FLUSH_MAX: Final = (
    200  # new log entries handed to the screen per refresh; older ones of a burst are counted
)
REPLAY_MAX: Final = 5_000  # events kept for re-applying on top of the next status document (a second's worth)
# Station states, as the daemon names them (docs/control-api.md, "A station"), and what an event turns them into.
ACTIVE_STATES: Final = frozenset({"issuing", "idle", "error"})


def _map(value: Any) -> Mapping[str, Any]:
    """A JSON object from the daemon, or an empty one: a field of another shape (a later API version, a
    defect) is read as absent rather than break the dashboard."""
    return value if isinstance(value, Mapping) else {}


def _maps(value: Any) -> list[Mapping[str, Any]]:
    return [x for x in value if isinstance(x, Mapping)] if isinstance(value, list) else []


def _strs(value: Any) -> list[str]:
    return [str(x) for x in value] if isinstance(value, list) else []


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def _int(value: Any) -> int:
    return int(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _float(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


@dataclass
class Refusal:
    code: str
    reason: str
    device_serial: str | None
    time: float | None


@dataclass
class Pause:
    by: str
    reason: str
    at: float | None


@dataclass
class Station:
    name: str
    line: str | None
    kind: str = ""
    enabled: bool = True
    state: str = "disconnected"
    connected: bool = False
    peer: str | None = None
    last_seen: float | None = None
    issued: int = 0
    refused: int = 0
    confirmed: int = 0
    last_device_serial: str | None = None
    last_issued_at: float | None = None
    last_refusal: Refusal | None = None
    last_link_error: str | None = None
    paused: Pause | None = None

    @classmethod
    def from_status(cls, doc: Mapping[str, Any]) -> Station:
        refusal = doc.get("last_refusal")
        pause = doc.get("paused")
        return cls(
            name=str(doc.get("name", "")), line=_str(doc.get("line")), kind=str(doc.get("kind", "")),
            enabled=bool(doc.get("enabled", True)), state=str(doc.get("state", "disconnected")),
            connected=bool(doc.get("connected", False)), peer=_str(doc.get("peer")),
            last_seen=_float(doc.get("last_seen")), issued=_int(doc.get("issued")),
            refused=_int(doc.get("refused")), confirmed=_int(doc.get("confirmed")),
            last_device_serial=_str(doc.get("last_device_serial")), last_issued_at=_float(doc.get("last_issued_at")),
            last_refusal=Refusal(str(refusal.get("code", "")), str(refusal.get("reason", "")),
                                 _str(refusal.get("device_serial")), _float(refusal.get("time")))
            if isinstance(refusal, Mapping) else None,
            last_link_error=_str(doc.get("last_link_error")),
            paused=Pause(str(pause.get("paused_by", "")), str(pause.get("reason", "")), _float(pause.get("paused_at")))
            if isinstance(pause, Mapping) else None,
        )  # fmt: skip


@dataclass
class WorkOrder:
    id: str
    product: str = ""
    state: str = ""
    planned: int = 0
    issued: int = 0
    confirmed: int = 0
    remaining: int = 0
    scrapped: int = 0
    reworked: int = 0
    pending_confirmation: int = 0
    lines: tuple[str, ...] = ()

    @classmethod
    def from_status(cls, doc: Mapping[str, Any]) -> WorkOrder:
        return cls(
            id=str(doc.get("id", "")), product=str(doc.get("product", "")), state=str(doc.get("state", "")),
            planned=_int(doc.get("planned")), issued=_int(doc.get("issued")), confirmed=_int(doc.get("confirmed")),
            remaining=_int(doc.get("remaining")), scrapped=_int(doc.get("scrapped")),
            reworked=_int(doc.get("reworked")), pending_confirmation=_int(doc.get("pending_confirmation")),
            lines=tuple(_strs(doc.get("lines"))),
        )  # fmt: skip

    @property
    def done(self) -> float:
        """Share of the quota used, 0..1."""
        return min(1.0, (self.planned - self.remaining) / self.planned) if self.planned > 0 else 0.0


@dataclass
class Alarm:
    cause: str
    severity: str
    message: str
    advice: str
    raised_at: float | None
    last_seen: float | None
    count: int
    code: int | None
    acknowledged_by: str | None
    acknowledged_at: float | None

    @classmethod
    def from_status(cls, doc: Mapping[str, Any]) -> Alarm:
        code = doc.get("code")
        return cls(
            cause=str(doc.get("cause", "")), severity=str(doc.get("severity", "warning")),
            message=str(doc.get("message", "")), advice=str(doc.get("advice", "")),
            raised_at=_float(doc.get("raised_at")), last_seen=_float(doc.get("last_seen")),
            count=_int(doc.get("count")), code=code if isinstance(code, int) else None,
            acknowledged_by=_str(doc.get("acknowledged_by")), acknowledged_at=_float(doc.get("acknowledged_at")),
        )  # fmt: skip


@dataclass(frozen=True)
class LogEntry:
    """One line of the dashboard's log. `kind` is the event type (or "link" for the dashboard's own)."""

    time: float | None
    kind: str
    station: str
    subject: str  # a device serial, work order, alarm cause, ...
    detail: str
    severity: str = "info"  # info, good, warning, error


@dataclass
class Summary:
    """The status document's appliance-wide parts."""

    time: float | None = None
    started_at: float | None = None
    config: str | None = None
    issuing_ca: str | None = None
    hsm_state: str = "unknown"
    hsm_token: str | None = None
    hsm_detail: str | None = None
    clock_trusted: bool | None = None  # None: not known yet (no status document read)
    clock_detail: str | None = None
    last_issuance_at: float | None = None
    issued: int = 0
    refused: int = 0
    confirmed: int = 0
    rate_per_s: float = 0.0
    rate_per_s_1m: float = 0.0
    per_minute_last_hour: list[int] = field(default_factory=list)
    upstream_enabled: bool = False
    upstream_link: str = "disabled"  # up, down, unknown, disabled
    upstream_depth: int = 0
    upstream_age_s: float | None = None
    upstream_over_limit: bool = False
    upstream_stopped: bool = False  # its hard limits stopped issuance
    subscribers: int = 0
    sessions: int = 0


def _by_severity(alarm: Alarm) -> tuple[int, float]:
    return (0 if alarm.severity == "critical" else 1, alarm.raised_at or 0.0)


class Model:
    def __init__(self) -> None:
        self.connected = False
        self.ever_connected = False
        self.events_busy = (
            False  # the daemon refused the event stream (all its slots taken): status is polled
        )
        self.link_note: str | None = None  # why the link is down, or None
        self.link_since: float | None = None  # this process's clock: when the link went down or came up
        self.status_seq = 0
        self.summary = Summary()
        self.stations: dict[str, Station] = {}
        self.lines: list[str] = []
        self.line_orders: dict[str, list[str]] = {}
        self.work_orders: dict[str, WorkOrder] = {}
        self.alarms: dict[str, Alarm] = {}
        self.log: deque[LogEntry] = deque(maxlen=LOG_MAX)
        self._new_log: deque[LogEntry] = deque(maxlen=LOG_FLUSH_MAX)
        self.log_skipped = 0  # entries of a burst that never reached the screen (more than LOG_FLUSH_MAX)
        self._replay: deque[dict[str, Any]] = deque(maxlen=REPLAY_MAX)
        self.events_seen = 0
        self.last_event_time: float | None = None
        # What changed since the screen last looked (take_changes()).
        self.changed_stations: set[str] = set()
        self.structure_changed = True  # the set of stations or lines changed: rebuild the grid
        self.orders_changed = True
        self.alarms_changed = True
        self.summary_changed = True

    # -- the link ------------------------------------------------------------------------------------------------
    def set_connected(self, at: float, *, events: bool = True, wall: float | None = None) -> None:
        """The link is up (`at`: this process's monotonic clock). `events` False: the daemon answers but its
        event stream is busy (the status is polled instead). Link lines in the log carry this computer's
        clock (`wall`, default now): the moment the dashboard saw the change, not the last daemon time seen."""
        was = (self.connected, self.events_busy)
        self.connected = True
        self.ever_connected = True
        self.events_busy = not events
        self.link_note = None
        self.link_since = at
        self.summary_changed = True
        if was != (True, not events):
            text = (
                "connected to the daemon" if events else "connected to the daemon; events busy: status polled"
            )
            self._log(LogEntry(time.time() if wall is None else wall, "link", "", "", text, "good"))

    def set_disconnected(self, why: str, at: float, *, wall: float | None = None) -> None:
        was = self.connected
        self.connected = False
        self.events_busy = False
        self.link_note = why
        if was or self.link_since is None:
            self.link_since = at
            self._log(LogEntry(time.time() if wall is None else wall, "link", "", "", f"disconnected: {why}",
                               "error"))  # fmt: skip
        self.summary_changed = True

    @property
    def now(self) -> float | None:
        """The daemon's latest known time."""
        times = [t for t in (self.summary.time, self.last_event_time) if t is not None]
        return max(times) if times else None

    # -- the status document -------------------------------------------------------------------------------------
    def load_status(self, doc: Mapping[str, Any]) -> None:
        """Replace everything with `doc`, then re-apply the counted events it does not include yet."""
        self.status_seq = _int(doc.get("seq"))
        s = self.summary
        s.time = _float(doc.get("time"))
        appliance = _map(doc.get("appliance"))
        s.started_at, s.config = _float(appliance.get("started_at")), _str(appliance.get("config"))
        s.issuing_ca = _str(appliance.get("issuing_ca"))
        hsm = _map(doc.get("hsm"))
        s.hsm_state, s.hsm_token, s.hsm_detail = str(hsm.get("state", "unknown")), _str(hsm.get("token_label")), _str(hsm.get("detail"))  # fmt: skip
        clock = _map(doc.get("clock"))
        trusted = clock.get("trusted")
        s.clock_trusted, s.clock_detail = (
            trusted if isinstance(trusted, bool) else None,
            _str(clock.get("detail")),
        )
        s.last_issuance_at = _float(clock.get("last_issuance_at"))
        issuance = _map(doc.get("issuance"))
        s.issued, s.refused, s.confirmed = (_int(issuance.get(k)) for k in ("issued", "refused", "confirmed"))
        s.rate_per_s = _float(issuance.get("rate_per_s")) or 0.0
        s.rate_per_s_1m = _float(issuance.get("rate_per_s_1m")) or 0.0
        series = issuance.get("per_minute_last_hour")
        s.per_minute_last_hour = [_int(x) for x in series] if isinstance(series, list) else []
        up = _map(doc.get("upstream"))
        s.upstream_enabled, s.upstream_link = bool(up.get("enabled", False)), str(up.get("link", "disabled"))
        s.upstream_depth, s.upstream_age_s = _int(up.get("queue_depth")), _float(up.get("oldest_age_s"))
        s.upstream_over_limit = bool(up.get("over_limit", False))
        s.upstream_stopped = bool(up.get("issuance_stopped", False))
        console = _map(doc.get("console"))
        s.subscribers, s.sessions = _int(console.get("subscribers")), _int(console.get("sessions"))
        self.summary_changed = True

        stations: dict[str, Station] = {}
        lines: list[str] = []
        line_orders: dict[str, list[str]] = {}
        for line in _maps(doc.get("lines")):
            name = str(line.get("name", ""))
            lines.append(name)
            line_orders[name] = _strs(line.get("work_orders"))
            for st in _maps(line.get("stations")):
                station = Station.from_status(st)
                station.line = name
                stations[station.name] = station
        for st in _maps(doc.get("unassigned_stations")):
            station = Station.from_status(st)
            station.line = None
            stations[station.name] = station
        if list(stations) != list(self.stations) or lines != self.lines:
            self.structure_changed = True
        for name, station in stations.items():
            if self.stations.get(name) != station:
                self.changed_stations.add(name)
        self.stations, self.lines, self.line_orders = stations, lines, line_orders

        orders = {o.id: o for o in (WorkOrder.from_status(x) for x in _maps(doc.get("work_orders")))}
        if orders != self.work_orders:
            self.orders_changed = True
        self.work_orders = orders
        alarms = {a.cause: a for a in (Alarm.from_status(x) for x in _maps(doc.get("alarms")))}
        if alarms != self.alarms:
            self.alarms_changed = True
        self.alarms = alarms

        kept = [e for e in self._replay if _int(e.get("seq")) > self.status_seq]
        self._replay.clear()
        for event in kept:
            self._count(event)
            self._replay.append(event)

    # -- events --------------------------------------------------------------------------------------------------
    def apply(self, event: Mapping[str, Any]) -> None:
        """One event from the stream: logged, and counted unless the status document already includes it."""
        self.events_seen += 1
        t = _float(event.get("time"))
        if t is not None:
            self.last_event_time = t if self.last_event_time is None else max(t, self.last_event_time)
        entry = log_entry(event)
        if entry is not None:
            self._log(entry)
        if _int(event.get("seq")) > self.status_seq:
            self._count(event)
            self._replay.append(dict(event))

    def _log(self, entry: LogEntry) -> None:
        self.log.append(entry)
        if len(self._new_log) == self._new_log.maxlen:
            self.log_skipped += 1
        self._new_log.append(entry)

    def take_log(self) -> tuple[list[LogEntry], int]:
        """The log entries the screen has not shown yet, and how many of the burst it will never show."""
        new, skipped = list(self._new_log), self.log_skipped
        self._new_log.clear()
        self.log_skipped = 0
        return new, skipped

    def _count(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        station = self.stations.get(str(event.get("station", "")))
        t = _float(event.get("time"))
        if kind in (wire.EVENT_ISSUED, wire.EVENT_PENDING, wire.EVENT_REFUSED) and station is not None:
            station.last_device_serial = _str(event.get("device_serial"))
            if kind == wire.EVENT_REFUSED:
                station.refused += 1
                station.last_refusal = Refusal(str(event.get("code", "")), str(event.get("reason", "")),
                                               _str(event.get("device_serial")), t)  # fmt: skip
                if station.state in ACTIVE_STATES and event.get("code") != "STATION_PAUSED":
                    station.state = "error"
            else:
                if kind == wire.EVENT_ISSUED and not event.get("reused"):
                    station.issued += 1
                station.last_issued_at = t
                if station.state in ACTIVE_STATES:
                    station.state = "issuing"
            self.changed_stations.add(station.name)
        if kind == wire.EVENT_ISSUED and not event.get("reused"):
            self.summary.issued += 1
            self.summary_changed = True
            order = self.work_orders.get(str(event.get("work_order", "")))
            if order is not None:
                order.issued += 1
                order.remaining = max(0, order.remaining - 1)
                order.pending_confirmation += 1
                self.orders_changed = True
        elif kind == wire.EVENT_REFUSED:
            self.summary.refused += 1
            self.summary_changed = True
        elif kind == wire.EVENT_CONFIRMED:
            self.summary.confirmed += 1
            self.summary_changed = True
            if station is not None:
                station.confirmed += 1
                self.changed_stations.add(station.name)
        elif kind == wire.EVENT_STATION and station is not None:
            self._station_event(station, event)
        elif kind == wire.EVENT_ALARM:
            self._alarm_event(event)
        elif kind == wire.EVENT_WORKORDER:
            order = self.work_orders.get(str(event.get("work_order", "")))
            if order is not None:
                order.state = str(event.get("state", order.state))
                self.orders_changed = True

    def _station_event(self, station: Station, event: Mapping[str, Any]) -> None:
        state = event.get("state")
        if state == "connected":
            station.connected = True
            station.peer = _str(event.get("peer")) or station.peer
            if station.state == "disconnected":
                station.state = "idle"
        elif state == "disconnected":
            station.connected = False
            if station.state in ACTIVE_STATES:
                station.state = "disconnected"
        elif state == "paused":
            station.paused = Pause(
                str(event.get("by", "")), str(event.get("reason", "")), _float(event.get("time"))
            )
            if station.enabled:
                station.state = "paused"
        elif state == "resumed":
            station.paused = None
            if station.state == "paused":
                station.state = "idle" if station.connected else "disconnected"
        self.changed_stations.add(station.name)

    def _alarm_event(self, event: Mapping[str, Any]) -> None:
        doc = event.get("alarm")
        if not isinstance(doc, Mapping):
            return
        alarm = Alarm.from_status(doc)
        if event.get("action") == "cleared":
            self.alarms.pop(alarm.cause, None)
        else:
            self.alarms[alarm.cause] = alarm
        self.alarms_changed = True
        self.summary_changed = True

    # -- views ---------------------------------------------------------------------------------------------------
    def station_order(self) -> list[Station]:
        """Stations by line (in the daemon's order of lines, unassigned last), then by name."""
        rank = {line: i for i, line in enumerate(self.lines)}
        return sorted(self.stations.values(), key=lambda s: (rank.get(s.line or "", len(rank)), s.name))

    def alarm_order(self) -> list[Alarm]:
        return sorted(self.alarms.values(), key=_by_severity)

    def counts_by_state(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for s in self.stations.values():
            counts[s.state] = counts.get(s.state, 0) + 1
        return counts

    def take_changes(self) -> tuple[bool, set[str], bool, bool, bool]:
        """(structure, stations, work orders, alarms, summary) changed since the last call; resets them."""
        out = (self.structure_changed, self.changed_stations, self.orders_changed, self.alarms_changed,
               self.summary_changed)  # fmt: skip
        self.structure_changed = self.orders_changed = self.alarms_changed = self.summary_changed = False
        self.changed_stations = set()
        return out


def log_entry(event: Mapping[str, Any]) -> LogEntry | None:
    """The log line for an event, or None for events the log leaves out (confirmations: one per issuance)."""
    kind = str(event.get("type", ""))
    t = _float(event.get("time"))
    station = str(event.get("station") or "")
    serial = str(event.get("device_serial") or "")
    # The front end when it is not the station protocol (cmp, scep, cli): the station column is then a label's.
    via = f" via {event.get('front_end')}" if event.get("front_end") not in (None, "", "station") else ""
    if kind == wire.EVENT_ISSUED:
        reused = " (retry: the stored certificate)" if event.get("reused") else ""
        return LogEntry(t, kind, station, serial, f"{event.get('work_order') or ''}{reused}{via}", "good")
    if kind == wire.EVENT_PENDING:
        return LogEntry(
            t, kind, station, serial, f"{event.get('work_order') or ''} (upstream CA issues it){via}"
        )
    if kind == wire.EVENT_REFUSED:
        return LogEntry(
            t, kind, station, serial, f"{event.get('code', '')}: {event.get('reason', '')}{via}", "error"
        )
    if kind == wire.EVENT_STATION:
        state = str(event.get("state", ""))
        if state == "paused":
            by = event.get("by") or "?"
            why = event.get("reason") or ""
            return LogEntry(
                t, kind, station, "", f"paused by {by}{': ' + str(why) if why else ''}", "warning"
            )
        if state == "resumed":
            return LogEntry(t, kind, station, "", f"resumed by {event.get('by') or '?'}", "good")
        peer = f" ({event.get('peer')})" if event.get("peer") else ""
        return LogEntry(
            t, kind, station, "", f"{state}{peer}", "error" if state == "disconnected" else "info"
        )
    if kind == wire.EVENT_ALARM:
        alarm = event.get("alarm") if isinstance(event.get("alarm"), Mapping) else {}
        assert isinstance(alarm, Mapping)
        action = str(event.get("action", ""))
        by = f" by {alarm.get('acknowledged_by')}" if action == "acknowledged" else ""
        sev = "error" if alarm.get("severity") == "critical" and action == "raised" else "warning"
        return LogEntry(t, kind, "", str(alarm.get("cause", "")), f"alarm {action}{by}: {alarm.get('message', '')}",
                        "good" if action == "cleared" else sev)  # fmt: skip
    if kind == wire.EVENT_WORKORDER:
        return LogEntry(t, kind, "", str(event.get("work_order", "")),
                        f"work order {event.get('state', '')} by {event.get('by') or '?'}", "warning")  # fmt: skip
    if kind == wire.EVENT_DEVICE:
        return LogEntry(t, kind, "", serial,
                        f"device {event.get('action', '')} by {event.get('by') or '?'}: {event.get('reason') or ''}",
                        "warning")  # fmt: skip
    if kind == wire.EVENT_DROPPED:
        return LogEntry(t, kind, "", "", f"the daemon ended this stream: {event.get('reason', '')}", "error")
    return None
