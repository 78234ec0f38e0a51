"""Alarms: conditions a person must act on, with one home.

A component that knows something is wrong (the journal cannot be written, the HSM is away, a listener is at its
connection cap) raises an alarm under a stable *cause* key. Raising the same cause again while it is active only
updates its count and last-seen time: the log gets one line per cause, not one per failed request, so a
stranger cannot fill the disk with a flood and an operator sees the cause, not the noise. Clearing logs once.

The control API and dashboard read `Alarms.active()`; a person acknowledges an alarm there (audited by the
caller). This module keeps state in memory only: every alarm is raised again by the component that sees the
condition after a restart, so nothing here needs to survive one.

Thread-safe: the journal thread, the PKCS#11 thread and the event loop may all raise.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

log = logging.getLogger("birthline.alarms")

Severity = Literal["warning", "critical"]  # critical: issuance (or a front end) is stopped


@dataclass(frozen=True)
class Alarm:
    cause: str  # stable key, e.g. "journal.unavailable", "listener.va.cap"
    severity: Severity
    message: str  # what is wrong, for a person (no secrets, no raw peer input)
    advice: str  # what to do about it
    raised_at: float  # wall clock, first time in this episode
    last_seen: float
    count: int = 1  # how many times the condition was seen in this episode
    code: int | None = None  # the ReasonCode clients are refused with, if any
    details: Mapping[str, Any] = field(default_factory=dict)
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None

    def snapshot(self) -> dict[str, Any]:
        return {
            "cause": self.cause, "severity": self.severity, "message": self.message, "advice": self.advice,
            "raised_at": self.raised_at, "last_seen": self.last_seen, "count": self.count, "code": self.code,
            "details": dict(self.details), "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": self.acknowledged_at,
        }  # fmt: skip


class Alarms:
    """The appliance's open alarms, by cause."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._active: dict[str, Alarm] = {}
        self._listeners: list[Callable[[str, Alarm], None]] = []

    def raise_alarm(
        self,
        cause: str,
        message: str,
        advice: str,
        *,
        severity: Severity = "critical",
        code: int | None = None,
        details: Mapping[str, Any] | None = None,
    ) -> bool:
        """Raise (or refresh) the alarm for `cause`. Returns True when it is new: the caller's log line, if any,
        belongs there; this method already logs a new alarm once at ERROR (critical) or WARNING."""
        now = self.clock()
        with self._lock:
            old = self._active.get(cause)
            if old is not None:
                self._active[cause] = replace(
                    old, last_seen=now, count=old.count + 1, message=message, details=dict(details or {})
                )
                return False
            alarm = Alarm(cause, severity, message, advice, now, now, 1, code, dict(details or {}))
            self._active[cause] = alarm
            listeners = list(self._listeners)
        log.log(
            logging.ERROR if severity == "critical" else logging.WARNING,
            "ALARM %s: %s (%s)", cause, message, advice,
        )  # fmt: skip
        for listener in listeners:
            listener("raised", alarm)
        return True

    def clear(self, cause: str, note: str = "") -> bool:
        """The condition is gone. Returns True if an alarm was active; logs its end once."""
        with self._lock:
            alarm = self._active.pop(cause, None)
            listeners = list(self._listeners)
        if alarm is None:
            return False
        log.warning(
            "alarm cleared %s after %d occurrence(s)%s", cause, alarm.count, f": {note}" if note else ""
        )
        for listener in listeners:
            listener("cleared", alarm)
        return True

    def acknowledge(self, cause: str, person: str) -> Alarm | None:
        """A person has seen it. The alarm stays active until its condition clears. The caller audits this."""
        with self._lock:
            alarm = self._active.get(cause)
            if alarm is None:
                return None
            alarm = self._active[cause] = replace(alarm, acknowledged_by=person, acknowledged_at=self.clock())
            return alarm

    def get(self, cause: str) -> Alarm | None:
        with self._lock:
            return self._active.get(cause)

    def active(self) -> list[Alarm]:
        with self._lock:
            return sorted(self._active.values(), key=lambda a: (a.severity != "critical", a.raised_at))

    def subscribe(self, listener: Callable[[str, Alarm], None]) -> None:
        """listener(event, alarm) with event "raised" or "cleared"; called on the raising thread."""
        with self._lock:
            self._listeners.append(listener)


class LogOnce:
    """Log a recurring condition once per cause and interval, then count it: for failures caused by peers or
    by the environment, where one line per occurrence would let the flood fill the log.

        limiter = LogOnce(interval_s=60)
        limiter.log(log, logging.WARNING, "station.bad-tag:line1", "station %s: bad tag", name)

    The first occurrence of a cause is logged; later ones within `interval_s` are counted, and the next line
    logged for that cause says how many were suppressed. Causes are kept up to `max_causes` (oldest evicted),
    so hostile input choosing new causes cannot grow memory without bound.
    """

    def __init__(
        self, interval_s: float = 60.0, max_causes: int = 1024, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.interval_s = interval_s
        self.max_causes = max_causes
        self.clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, tuple[float, int]] = {}  # cause -> (last logged, suppressed since)

    def log(self, logger: logging.Logger, level: int, cause: str, msg: str, *args: object) -> bool:
        now = self.clock()
        with self._lock:
            last = self._seen.get(cause)
            if last is not None and now - last[0] < self.interval_s:
                self._seen[cause] = (last[0], last[1] + 1)
                return False
            suppressed = 0 if last is None else last[1]
            self._seen.pop(cause, None)
            self._seen[cause] = (now, 0)
            while len(self._seen) > self.max_causes:
                del self._seen[next(iter(self._seen))]
        if suppressed:
            logger.log(level, msg + " (%d more like this since the last report)", *args, suppressed)
        else:
            logger.log(level, msg, *args)
        return True


class LogTally:
    """Log an event that many sources cause (connections refused from rotating addresses) at most once per
    cause and interval, with how many occurred and from which sources most, never once per source.

        tally = LogTally(interval_s=60)
        tally.add(log, logging.WARNING, "refused_peer", peer, "va listener: refused a connection from %s", peer)

    The first event of a cause is logged as it is. Later ones within `interval_s` of that line are counted with
    their source; the next line logged for the cause (at the first event after the interval) adds how many
    there were since the last line and the sources seen most often. Sources are counted in a table of at most
    `max_sources` entries (the Space-Saving count: a newcomer to a full table replaces the least counted entry
    and inherits its count, so a source named is one of the most frequent, its count an upper bound) and causes
    are kept up to `max_causes` (oldest evicted): rotating sources or causes cannot grow memory or the log.
    """

    def __init__(
        self,
        interval_s: float = 60.0,
        *,
        top: int = 3,
        max_sources: int = 32,
        max_causes: int = 64,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.top = top
        self.max_sources = max_sources
        self.max_causes = max_causes
        self.clock = clock
        self._lock = threading.Lock()
        # cause -> (time of its last line, events since that line, {source: count})
        self._causes: dict[str, tuple[float, int, dict[str, int]]] = {}

    def add(
        self, logger: logging.Logger, level: int, cause: str, source: str, msg: str, *args: object
    ) -> bool:
        """Count one event of `cause` from `source`; True when a line was logged for it."""
        now = self.clock()
        with self._lock:
            entry = self._causes.get(cause)
            if entry is not None and now - entry[0] < self.interval_s:
                last, count, sources = entry
                self._count(sources, source)
                self._causes[cause] = (last, count + 1, sources)
                return False
            summary = ""
            if entry is not None and entry[1]:
                _, count, sources = entry
                self._count(sources, source)
                ranked = sorted(sources.items(), key=lambda kv: (-kv[1], kv[0]))[: self.top]
                top = ", ".join(f"{s} x{n}" for s, n in ranked)
                summary = f" ({count + 1} like this since the last report, most from {top})"
            self._causes.pop(cause, None)
            self._causes[cause] = (now, 0, {})
            while len(self._causes) > self.max_causes:
                del self._causes[next(iter(self._causes))]
        logger.log(level, msg + "%s", *args, summary)
        return True

    def _count(self, sources: dict[str, int], source: str) -> None:
        if source in sources:
            sources[source] += 1
        elif len(sources) < self.max_sources:
            sources[source] = 1
        else:
            least = min(sources, key=sources.__getitem__)
            sources[source] = sources.pop(least) + 1
