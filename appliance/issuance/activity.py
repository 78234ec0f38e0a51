"""Whether issuance is at work: what the appliance's lower-priority work yields to.

Issuance is the line's job; OCSP answers and CRL fetches for relying parties share its event loop and cores.
Every IssueService of a process marks its requests here (one Activity per process, runtime.Core.activity), and
the OCSP responder reads `busy()` on each request to apply its while-issuing budget (docs/revocation.md,
"Load": issuance first on the CPU as at the HSM).

Busy means a request is open now, or one closed less than `linger_s` ago. The linger is there because a line
issues in bursts: a station asks for its next device a few milliseconds to a few seconds after its last one, and
the OCSP load between two devices would otherwise run unbudgeted and be in full flight when the next one comes.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

ACTIVITY_LINGER_S: Final = 1.0


class Activity:
    """Open issuance requests, and when the last one closed. The event loop owns it (not thread-safe)."""

    __slots__ = ("_clock", "_last_end", "_open", "linger_s")

    def __init__(
        self, linger_s: float = ACTIVITY_LINGER_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if linger_s < 0:
            raise ValueError("linger_s >= 0 is required")
        self.linger_s = linger_s
        self._clock = clock
        self._open = 0
        self._last_end = float("-inf")

    @property
    def open(self) -> int:
        """Requests begun and not yet ended."""
        return self._open

    def begin(self) -> None:
        self._open += 1

    def end(self) -> None:
        if self._open <= 0:
            raise RuntimeError("Activity.end() without a begin()")
        self._open -= 1
        self._last_end = self._clock()

    def busy(self) -> bool:
        """A request is open, or one ended within linger_s."""
        return self._open > 0 or self._clock() - self._last_end < self.linger_s
