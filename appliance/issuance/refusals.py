"""How refusals reach the audit log without letting one station fill the disk.

Every refusal is a fact an auditor may want, but a broken or hostile fixture can send thousands of bad requests a
minute, and the audit log is append-only. Per station, the first `burst` refusals of each window are audited in
full (who, which request, which device, the code and the reason); the rest are only counted, and each window
with suppressed refusals is audited as one summary (station, window, count per code) when it closes. Nothing is
issued by a refusal, so what a crash can lose is at most one window's suppressed counts, never a certificate.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class _Window:
    start: float
    admitted: int = 0
    suppressed: Counter[str] = field(default_factory=Counter)


class RefusalLimiter:
    """Not thread-safe: used on the journal thread only, inside the issuance transactions."""

    def __init__(self, burst: int = 60, window_s: float = 60.0) -> None:
        self.burst = burst
        self.window_s = window_s
        self._windows: dict[str, _Window] = {}
        self._closed: list[tuple[str, _Window]] = []  # closed windows whose summary is still to be audited

    def admit(self, station: str, code: str, now: float) -> bool:
        """True: audit this refusal in full. False: it was counted for the station's summary."""
        window = self._windows.get(station)
        if window is None or now - window.start >= self.window_s:
            if window is not None and window.suppressed:
                self._closed.append((station, window))
            window = self._windows[station] = _Window(now)
        if window.admitted < self.burst:
            window.admitted += 1
            return True
        window.suppressed[code] += 1
        return False

    def due(self, now: float, *, all_windows: bool = False, key: str = "station") -> list[dict[str, object]]:
        """Summaries of the windows that closed (of every window with `all_windows`, at shutdown), each returned
        once. `key` names what the limiter is kept per in the summary ("label" for the EST and SCEP layers)."""
        for station, window in list(self._windows.items()):
            if now - window.start >= self.window_s or all_windows:
                del self._windows[station]
                if window.suppressed:
                    self._closed.append((station, window))
        out: list[dict[str, object]] = [
            {key: station, "window_start": w.start, "window_s": self.window_s,
             "suppressed": dict(sorted(w.suppressed.items()))}
            for station, w in self._closed
        ]  # fmt: skip
        self._closed.clear()
        return out

    def pending(self, now: float) -> bool:
        """A summary is due now (a closed window had suppressed refusals)."""
        return bool(self._closed) or any(
            w.suppressed and now - w.start >= self.window_s for w in self._windows.values()
        )
