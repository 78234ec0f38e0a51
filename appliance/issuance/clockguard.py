"""Whether the wall clock can date a certificate: not behind the last issuance, and not stepped since the last
batch. A certificate dated by a wrong clock is wrong for its whole life (not yet valid for its device, or valid
from a time already past), so issuance is refused CLOCK_NOT_TRUSTED until the clock is right.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

from appliance.errors import IssuanceRefused, ReasonCode

LAST_ISSUE_SQL = "SELECT MAX(created_at) FROM issuance"


class ClockGuard:
    """The last issuance time (read from the journal once, then kept) and the wall/steady anchor of the last batch
    on time. Used from the journal thread (in the intent transaction) and the event loop; each call is short and
    the worst a race does is read the last issuance time twice."""

    def __init__(self, skew_s: float, steady_clock: Callable[[], float] | None) -> None:
        self.skew_s = skew_s
        self.steady_clock = steady_clock
        """A clock nobody sets (the daemon: CLOCK_BOOTTIME), against which steps of the wall clock are seen. None:
        no such check (tests that drive the wall clock by hand)."""
        self.last_issue: float | None = None
        self._anchor: tuple[float, float] | None = None  # (wall, steady) at the last batch that was on time

    def load(self, conn: sqlite3.Connection) -> None:
        """Read the last issuance time, once (an index seek: issuance_created)."""
        if self.last_issue is None:
            self.last_issue = float(conn.execute(LAST_ISSUE_SQL).fetchone()[0] or 0.0)

    def behind(self, now: float) -> IssuanceRefused | None:
        """The clock is more than skew_s behind the last issuance (load() first)."""
        last = self.last_issue or 0.0
        if now + self.skew_s < last:
            return IssuanceRefused(
                f"the clock is {last - now:.0f} s behind the last issuance; set the time",
                ReasonCode.CLOCK_NOT_TRUSTED,
            )
        return None

    def stepped(self, now: float) -> IssuanceRefused | None:
        """The wall clock jumped (someone set it, or a bad time source) since the last batch: compared with the
        steady clock, it moved more than skew_s further or less far. A certificate dated by a clock that jumped
        forward is not yet valid for its device, and once the clock is set right every later issuance would be
        refused as behind it; so refuse until the clock is set back. A step to the right time (the clock was
        wrong when the daemon started) is accepted by restarting the daemon, which anchors afresh."""
        if self.steady_clock is None:
            return None
        steady = self.steady_clock()
        if self._anchor is not None:
            wall0, steady0 = self._anchor
            step = (now - wall0) - (steady - steady0)
            if abs(step) > self.skew_s:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall0))
                return IssuanceRefused(
                    f"the clock was stepped {'forward' if step > 0 else 'back'} by {abs(step):.0f} s since the"
                    f" last issuance ({when}); set it back, or restart the daemon if the new time is right",
                    ReasonCode.CLOCK_NOT_TRUSTED,
                )
        # Anchored at every batch on time: the slow slewing NTP does never adds up to a step.
        self._anchor = (now, steady)
        return None

    def refusal(self, conn: sqlite3.Connection, now: float) -> IssuanceRefused | None:
        """In the intent transaction: why this batch may not be dated `now`, or None."""
        self.load(conn)
        return self.behind(now) or self.stepped(now)

    def issued(self, now: float) -> None:
        self.last_issue = max(self.last_issue or 0.0, now)
