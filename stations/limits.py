"""Failures per station link, counted so that a peer that keeps failing is slowed down rather than served.

A failed handshake costs the appliance a registry lookup and a key derivation, and each one is audited. A
station (its serial port, or its TLS certificate) that fails ``limit`` times within ``window_s`` of its first
failure is blocked for ``window_s``: its HELLOs are answered BUSY before any lookup or key derivation. A
successful handshake forgets the count. The station key is 32 random bytes, so the limit is not what stops a
guesser; it bounds the work, the audit entries and the log lines a broken or hostile fixture can cause.

Pure and clock-injected: the caller passes ``now`` (a monotonic clock) to every call.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_FAILURE_LIMIT = 10
DEFAULT_FAILURE_WINDOW = 60.0
MAX_KEYS = 4096  # counts kept at once; the oldest are forgotten first


@dataclass
class _Count:
    start: float
    failures: int = 0
    blocked_until: float | None = None


class FailureLimiter:
    """Counts failures per key (a station name, or a port or peer where no station is bound). Not thread-safe:
    the station server uses it on the event loop only."""

    def __init__(
        self,
        limit: int = DEFAULT_FAILURE_LIMIT,
        window_s: float = DEFAULT_FAILURE_WINDOW,
        max_keys: int = MAX_KEYS,
    ) -> None:
        if limit < 1 or window_s <= 0 or max_keys < 1:
            raise ValueError("limit and max_keys must be at least 1 and window_s positive")
        self.limit = limit
        self.window_s = window_s
        self.max_keys = max_keys
        self._counts: dict[str, _Count] = {}

    def blocked(self, key: str, now: float) -> float | None:
        """Seconds until ``key`` may try again, or None when it may try now."""
        count = self._counts.get(key)
        if count is None or count.blocked_until is None:
            return None
        if now >= count.blocked_until:
            del self._counts[key]
            return None
        return count.blocked_until - now

    def failed(self, key: str, now: float) -> float | None:
        """Count one failure. Returns the blocking time when this failure reaches the limit (once per episode),
        else None."""
        count = self._counts.get(key)
        expired = count is not None and (
            now >= count.blocked_until
            if count.blocked_until is not None
            else now - count.start >= self.window_s
        )
        if count is None or expired:
            self._counts.pop(key, None)
            count = self._counts[key] = _Count(now)
            while len(self._counts) > self.max_keys:
                del self._counts[next(iter(self._counts))]
        if count.blocked_until is not None:
            return None  # already blocked: e.g. the rest of a burst of bad tags in one read
        count.failures += 1
        if count.failures < self.limit:
            return None
        count.blocked_until = now + self.window_s
        return self.window_s

    def succeeded(self, key: str) -> None:
        """A handshake of ``key`` succeeded: its earlier failures no longer count."""
        self._counts.pop(key, None)

    def failures(self, key: str) -> int:
        count = self._counts.get(key)
        return 0 if count is None else count.failures
