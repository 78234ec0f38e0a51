"""What the upstream outbox holds: the queue `birthline upstream status`, the control API and the forwarder report
(docs/cmp.md "The forwarder").

Read with SQL alone, so a command that only looks at the queue never loads the CMP machinery
(appliance/cmp/forwarder.py sends the records).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from typing import TYPE_CHECKING, Any

from appliance.issuance.journal import Journal

if TYPE_CHECKING:
    from appliance.config import UpstreamSection


SET_ASIDE_SHOWN = 20
"""How many parked and failed records `upstream status` lists (the newest; the depth counts all)."""


def queue_status(
    journal: Journal, settings: UpstreamSection, now: float | None = None, *, counts: bool = True
) -> dict[str, Any]:
    """What `birthline upstream status` prints: depth by kind and state, oldest open record, last success and
    last error, the parked and failed records with their reasons, the limits and whether they are exceeded.

    `counts=False` (the status document, read by consoles every few seconds on the daemon's journal thread):
    without the depth, the RA-mode requests by state and the parked and failed records. The depths come from
    counters the journal's triggers keep, not from the rows (one per certificate, for ever); the open
    records, their age and the limits come from the open rows' indexes."""
    when = time.time() if now is None else now

    def q() -> dict[str, Any]:
        conn = journal.conn
        depth: dict[str, dict[str, int]] = {}
        if counts:
            # Counters the journal's triggers keep (issuance/schema.py, OUTBOX_COUNT_TABLE): GROUP BY read every row.
            for kind, state, n in conn.execute("SELECT kind, state, n FROM outbox_count WHERE n > 0"):
                depth.setdefault(str(kind), {})[str(state)] = int(n)
        open_rows, oldest = conn.execute(
            "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state IN ('queued', 'sent', 'waiting')"
        ).fetchone()
        meta = dict(conn.execute(
            "SELECT key, value FROM meta WHERE key IN ('upstream_last_success', 'upstream_last_error')").fetchall())  # fmt: skip
        ra = (
            {str(s): int(n) for s, n in conn.execute("SELECT state, n FROM ra_request_count WHERE n > 0")}
            if counts
            else {}
        )
        aside = [
            {"id": int(i), "kind": str(k), "cert_serial": str(c), "state": str(s), "at": _iso(at),
             "reason": str(e or "")}
            for i, k, c, s, at, e in conn.execute(
                "SELECT id, kind, cert_serial, state, done_at, last_error FROM outbox"
                " WHERE state IN ('parked', 'failed') ORDER BY id DESC LIMIT ?", (SET_ASIDE_SHOWN,))
        ] if counts else []  # fmt: skip
        return {
            "depth": depth,
            "open": int(open_rows),
            "oldest": oldest,
            "meta": meta,
            "ra": ra,
            "aside": aside,
        }

    raw = journal.call(q)
    age = None if raw["oldest"] is None else max(0.0, when - float(raw["oldest"]))
    last_error = (
        json.loads(raw["meta"]["upstream_last_error"]) if "upstream_last_error" in raw["meta"] else None
    )
    last_success = (
        float(raw["meta"]["upstream_last_success"]) if "upstream_last_success" in raw["meta"] else None
    )
    s = settings
    # A standalone line (no upstream) has nothing to drain: its limits do not apply and nothing is alarming.
    alarm = s.enabled and (raw["open"] > s.max_queue_size or (age or 0.0) > s.max_queue_age_s)
    hard = raw["open"] >= s.hard_max_queue_size or (age or 0.0) >= s.hard_max_queue_age_s
    status = {
        "url": s.url or None,
        "standalone": not s.enabled,
        "mode": s.mode,
        "open": raw["open"],
        "depth": raw["depth"],
        "ra_requests": raw["ra"],  # RA mode: device requests by state (pending = a station is waiting)
        "oldest_open_age_s": age,
        "last_success": _iso(last_success),
        "last_error": None if last_error is None else {"at": _iso(last_error["at"]), "error": last_error["error"]},
        "parked": [a for a in raw["aside"] if a["state"] == "parked"],
        "failed": [a for a in raw["aside"] if a["state"] == "failed"],
        "limits": {"max_queue_size": s.max_queue_size, "max_queue_age_s": s.max_queue_age_s,
                   "hard_max_queue_size": s.hard_max_queue_size, "hard_max_queue_age_s": s.hard_max_queue_age_s},
        "alarm": alarm,
        "issuance_stopped": hard and s.enabled,
    }  # fmt: skip
    if not counts:  # not read: absent rather than shown empty
        for key in ("depth", "ra_requests", "parked", "failed"):
            del status[key]
    return status


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
