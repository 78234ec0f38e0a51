"""The status document (GET /v1/status): everything a console shows, in one JSON object.

Built from the journal (lines, stations, work orders and their counts, the upstream queue: one round trip on
the journal thread), the station server's live state, the hub's counters and the open alarms. Two requests
within STATUS_CACHE_S share one build, so any number of consoles cost the journal one read per interval.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from appliance.alarms import Alarms
from appliance.config import Config
from appliance.control.hub import ControlHub
from appliance.control.sessions import Sessions
from appliance.issuance.journal import Journal
from appliance.issuance.pauses import StationPauses
from appliance.outbox import queue_status
from appliance.production.reconcile import report
from console import wire

STATUS_CACHE_S = 0.5
RECENTLY_CLOSED = 10  # closed work orders listed, newest first, after every draft and active one
HSM_ALARMS = ("issuance.hsm-unavailable", "issuance.signature-invalid")
CLOCK_ALARM = "issuance.clock-not-trusted"

# name -> the station server's StationState.snapshot() (stations/server.py)
StationSnapshots = Callable[[], Mapping[str, Mapping[str, Any]]]
# the CMP server's counters (appliance/cmp/responder.py CmpResponder.snapshot), None while it does not run
CmpSnapshot = Callable[[], Mapping[str, Any] | None]


@dataclass
class StatusSources:
    config: Config
    journal: Journal
    hub: ControlHub
    alarms: Alarms
    pauses: StationPauses
    sessions: Sessions
    stations: StationSnapshots
    cmp: CmpSnapshot | None = None


def _read(journal: Journal, config: Config) -> dict[str, Any]:
    """On the journal thread: one consistent read of everything the document needs from the journal."""
    conn = journal.conn
    conn.execute("BEGIN")
    try:
        lines = [
            {"name": str(n), "description": str(d or "")}
            for n, d in conn.execute("SELECT name, description FROM production_line ORDER BY name")
        ]
        stations = [
            {"name": str(n), "kind": str(k), "enabled": bool(e), "line": line}
            for n, k, e, line in conn.execute("SELECT name, kind, enabled, line FROM stations ORDER BY name")
        ]
        ids = [
            str(r[0])
            for r in conn.execute(
                "SELECT id FROM work_order WHERE state != 'closed' ORDER BY created_at, id"
            ).fetchall()
        ]
        ids += [
            str(r[0])
            for r in conn.execute(
                "SELECT id FROM work_order WHERE state = 'closed' ORDER BY closed_at DESC LIMIT ?",
                (RECENTLY_CLOSED,),
            ).fetchall()
        ]
        wo_lines: dict[str, list[str]] = {}
        for wo, line in conn.execute("SELECT work_order, line FROM work_order_line ORDER BY line"):
            wo_lines.setdefault(str(wo), []).append(str(line))
        orders = []
        for wo in ids:
            r = report(journal, wo)
            orders.append({
                "id": wo, "product": r.product, "state": r.state, "planned": r.planned, "issued": r.issued,
                "confirmed": r.confirmed, "pending_confirmation": r.pending_confirmation,
                "upstream_pending": r.upstream_pending, "scrapped": r.scrapped, "reworked": r.reworked,
                "revoked": r.revoked, "revoked_by_reason": r.revoked_by_reason,
                "remaining": r.remaining, "lines": wo_lines.get(wo, []),
            })  # fmt: skip
        last = conn.execute("SELECT MAX(created_at) FROM issuance").fetchone()[0]
    finally:
        conn.execute("COMMIT")
    # Without the outbox's depth: counting it reads every outbox row, one per certificate for ever, on the thread
    # every commit waits for (docs/performance.md "Ten years of journal").
    upstream = queue_status(journal, config.upstream, counts=False) if config.upstream.enabled else None
    return {
        "lines": lines,
        "stations": stations,
        "orders": orders,
        "last_issuance_at": last,
        "upstream": upstream,
    }


def _upstream(config: Config, raw: Mapping[str, Any] | None) -> dict[str, Any]:
    if raw is None:
        return {"enabled": False, "link": "disabled"}
    err, ok = raw.get("last_error"), raw.get("last_success")
    if err is not None and (ok is None or str(err["at"]) >= str(ok)):
        link = "down"
    elif ok is not None:
        link = "up"
    else:
        link = "unknown"
    return {
        "enabled": True, "url": raw["url"], "mode": raw["mode"], "link": link, "queue_depth": raw["open"],
        "oldest_age_s": raw["oldest_open_age_s"], "last_success": ok, "last_error": err,
        "over_limit": raw["alarm"], "issuance_stopped": raw["issuance_stopped"], "limits": raw["limits"],
    }  # fmt: skip


def _cmp(source: CmpSnapshot | None) -> dict[str, Any]:
    snapshot = source() if source is not None else None
    return {"enabled": False} if snapshot is None else {"enabled": True, **snapshot}


class StatusBuilder:
    def __init__(self, sources: StatusSources) -> None:
        self.s = sources
        self._cached: tuple[float, dict[str, Any]] | None = None
        self._lock = asyncio.Lock()

    async def document(self) -> dict[str, Any]:
        async with self._lock:
            now = time.monotonic()
            if self._cached is not None and now - self._cached[0] < STATUS_CACHE_S:
                return self._cached[1]
            doc = await self._build()
            self._cached = (time.monotonic(), doc)
            return doc

    async def _build(self) -> dict[str, Any]:
        s = self.s
        raw = await s.journal.acall(_read, s.journal, s.config)
        live = s.stations()
        pauses = s.pauses.all()
        alarms = s.alarms.active()
        causes = {a.cause: a for a in alarms}
        now = time.time()
        # Stations a CMP, EST or SCEP label acts as have no link of their own: kind "cmp", "est" or "scep", state
        # from their answers.
        fronts: dict[str, str] = {}
        for kind, section in (("scep", s.config.scep), ("est", s.config.est), ("cmp", s.config.cmp)):
            if section.listen:
                fronts.update({label.station: kind for label in section.labels.values()})
        stations = []
        for st in raw["stations"]:
            name = st["name"]
            snap = dict(live.get(name, {}))
            pause = pauses.get(name)
            act = s.hub.activity.get(name)
            connected = bool(snap.get("connected", False))
            linkless = name in fronts and not connected
            stations.append({
                **st, "kind": fronts.get(name, st["kind"]),
                "state": s.hub.station_state(name, connected, int(snap.get("enrolling", 0) or 0),
                                             pause is not None, st["enabled"], linkless),
                "connected": connected, "authenticated": bool(snap.get("authenticated", False)),
                "peer": snap.get("peer"), "enrolling": snap.get("enrolling", 0),
                "last_seen": snap.get("last_seen"), "last_link_error": snap.get("last_error"),
                "paused": pause.snapshot() if pause is not None else None,
                **(act.snapshot() if act is not None else {"issued": 0, "refused": 0, "confirmed": 0,
                   "last_device_serial": snap.get("last_device_serial"), "last_issued_at": None,
                   "last_refusal": None}),
                "link_counters": snap.get("counters", {}),
            })  # fmt: skip
        by_line: dict[str | None, list[dict[str, Any]]] = {}
        for st in stations:
            by_line.setdefault(st["line"], []).append(st)
        lines = [
            {**line, "stations": by_line.get(line["name"], []),
             "work_orders": [o["id"] for o in raw["orders"] if line["name"] in o["lines"] and o["state"] == "active"]}
            for line in raw["lines"]
        ]  # fmt: skip
        hsm_alarm = next((causes[c] for c in HSM_ALARMS if c in causes), None)
        clock_alarm = causes.get(CLOCK_ALARM)
        stats = s.hub.stats
        return {
            "api": wire.API_VERSION,
            "time": now,
            "seq": s.hub.bus.last_seq,
            "appliance": {"started_at": s.hub.started_at, "uptime_s": round(now - s.hub.started_at, 1),
                          "config": str(s.config.source) if s.config.source else None,
                          "issuing_ca": s.config.issuance.issuing_ca},
            "hsm": {"state": "unavailable" if hsm_alarm else "ok", "token_label": s.config.hsm.token_label,
                    "detail": hsm_alarm.message if hsm_alarm else None},
            "clock": {"now": now, "last_issuance_at": raw["last_issuance_at"], "trusted": clock_alarm is None,
                      "allowed_skew_s": s.config.issuance.clock_skew_s,
                      "detail": clock_alarm.message if clock_alarm else None},
            "issuance": {
                "issued": sum(stats.issued.values()), "refused": sum(stats.refused.values()),
                "confirmed": sum(stats.confirmed.values()),
                "rate_per_s": round(stats.per_second.per_second(10), 3),
                "rate_per_s_1m": round(stats.per_second.per_second(60), 3),
                "per_minute_last_hour": stats.per_minute.series()[:-1],
                "per_second_last_minute": stats.per_second.series()[:-1],
            },
            "lines": lines,
            "unassigned_stations": by_line.get(None, []),
            "work_orders": raw["orders"],
            "upstream": _upstream(s.config, raw["upstream"]),
            "alarms": [a.snapshot() for a in alarms],
            "cmp": _cmp(s.cmp),
            "console": {"subscribers": s.hub.bus.subscribers, "sessions": len(s.sessions)},
        }  # fmt: skip
