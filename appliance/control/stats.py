"""Counters and histograms the daemon keeps for the control API and the metrics, cheap enough for the hot path.

Plain dicts and lists: an increment is a dict update on the event loop. The metrics endpoint turns them into
OpenMetrics families when it is scraped (appliance/control/metrics.py), so nothing here depends on the
exposition library and nothing is formatted until someone asks.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time
from collections.abc import Callable, Sequence

# Seconds. HSM signing and journal commits are milliseconds; a confirmation follows its certificate by the
# device's write time (seconds), or by hours when a fixture is stopped mid-run.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    10.0,
)
LAG_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class Histogram:
    """Cumulative-bucket histogram (OpenMetrics semantics). Thread-safe: the journal thread observes too."""

    def __init__(self, buckets: Sequence[float]) -> None:
        self.bounds = tuple(buckets)
        self.counts = [0] * (len(self.bounds) + 1)  # the last is +Inf
        self.sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float, n: int = 1) -> None:
        i = bisect.bisect_left(self.bounds, value)
        with self._lock:
            self.counts[i] += n
            self.sum += value * n

    def snapshot(self) -> tuple[list[tuple[str, int]], float]:
        """Cumulative (le, count) pairs ending with +Inf, and the sum."""
        with self._lock:
            counts, total = list(self.counts), self.sum
        out, running = [], 0
        for bound, n in zip((*map(_le, self.bounds), "+Inf"), counts, strict=True):
            running += n
            out.append((bound, running))
        return out, total


def _le(bound: float) -> str:
    return f"{bound:g}"


class RateWindow:
    """Counts per `width`-second bucket over the last `size` buckets (the issuance rate and its sparkline)."""

    def __init__(self, width: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.width = width
        self.size = size
        self.clock = clock
        self._buckets: collections.deque[int] = collections.deque([0] * size, maxlen=size)
        self._current = int(clock() // width)

    def _roll(self) -> None:
        now = int(self.clock() // self.width)
        gap = now - self._current
        if gap > 0:
            for _ in range(min(gap, self.size)):
                self._buckets.append(0)
            self._current = now

    def add(self, n: int = 1) -> None:
        self._roll()
        self._buckets[-1] += n

    def series(self) -> list[int]:
        """Oldest first; the last bucket is the one in progress."""
        self._roll()
        return list(self._buckets)

    def per_second(self, buckets: int) -> float:
        """The rate over the last `buckets` complete buckets."""
        series = self.series()[:-1][-buckets:]
        return sum(series) / (len(series) * self.width) if series else 0.0


class Stats:
    """What the issuance core and the journal report, kept for the metrics and the status document."""

    def __init__(self) -> None:
        self.issued: collections.Counter[tuple[str, str]] = collections.Counter()  # (station, product)
        self.reused: collections.Counter[tuple[str, str]] = collections.Counter()
        self.pending: collections.Counter[tuple[str, str]] = collections.Counter()
        self.refused: collections.Counter[tuple[str, str, str]] = collections.Counter()  # + reason
        self.confirmed: collections.Counter[str] = collections.Counter()  # station
        self.sign_seconds = Histogram(LATENCY_BUCKETS)
        self.signed_certificates = 0
        self.commit_seconds = Histogram(LATENCY_BUCKETS)
        self.confirmation_lag = Histogram(LAG_BUCKETS)
        self.per_second = RateWindow(1.0, 61)  # the last minute, and the second in progress
        self.per_minute = RateWindow(60.0, 61)  # the last hour, and the minute in progress
