"""Rates per client address, in a table that cannot grow without bound.

Each rate is the generic cell rate algorithm (GCRA, the token bucket kept as one timestamp): `rate` actions a
second, in bursts of up to `burst`. `reserve(client, max_delay)` either admits an action at once, or says how
long to wait until it is within the rate (pacing, when at most `max_delay`), or refuses it. Pacing is what
slows a client that sends as fast as it is answered: its own requests wait, so it cannot spin on cheap refusals.

A client is its IP address; an IPv6 client is its /64, the block one host or one LAN segment normally holds, so
walking through the addresses of one's own /64 earns nothing. An IPv4-mapped IPv6 address is the IPv4 address.
The address is the TCP peer's: a header such as X-Forwarded-For is never believed (anyone can write one), so
behind a reverse proxy every client shares the proxy's budget.

The table holds at most `max_clients` entries. A new client takes the place of the least recently seen one if
that one is back within its rate (such an entry carries no information, so forgetting it changes nothing);
otherwise every newcomer shares one overflow entry until entries recover. A flood from many addresses therefore
costs a bounded table, and spends the overflow entry's budget, not that of the clients already known.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable


# Per request on the OCSP paths: parsing the address cost ~2.5% of the event loop's time under nonce load. The
# address strings of the peers of the moment are few; the cache is bounded whatever a network holds.
@functools.lru_cache(maxsize=4096)
def client_key(remote: str | None) -> str:
    """The rate-limiting identity of a peer address (aiohttp's request.remote)."""
    if not remote:
        return "unknown"
    try:
        ip = ipaddress.ip_address(remote.split("%", 1)[0])  # drop an IPv6 zone ("fe80::1%eth0")
    except ValueError:
        return "unknown"
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Rate:
    """One GCRA cell: `rate` per second, bursts of `burst`. Not thread-safe: the event loop owns it."""

    __slots__ = ("_interval", "_tat", "_tolerance")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate > 0 and burst >= 1 are required")
        self._interval = 1.0 / rate
        self._tolerance = (burst - 1) * self._interval
        self._tat = now  # theoretical arrival time of the next action at the nominal rate

    def reserve(self, now: float, max_delay: float = 0.0) -> float | None:
        """Seconds to wait before acting (0.0: now), or None (nothing reserved) if that would exceed max_delay."""
        tat = max(self._tat, now)
        wait = tat - now - self._tolerance
        if (
            wait > max_delay + 1e-9
        ):  # timestamps are floats: the last action of a burst must not be lost to rounding
            return None
        self._tat = tat + self._interval
        return max(0.0, wait)

    def idle(self, now: float) -> bool:
        """Back to a full burst: the entry says nothing a fresh one would not."""
        return self._tat <= now

    def wait(self, now: float) -> float:
        """Seconds until an action would be admitted at once (0.0: now). Reserves nothing."""
        return max(0.0, max(self._tat, now) - now - self._tolerance)

    def refund(self) -> None:
        """Give back one action reserved earlier (it turned out to cost nothing worth limiting)."""
        self._tat -= self._interval


class ClientLimiter:
    """A Rate per client; see the module docstring."""

    def __init__(
        self,
        rate: float,
        burst: float,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_clients < 1:
            raise ValueError("max_clients >= 1 is required")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._table: OrderedDict[str, Rate] = OrderedDict()
        self._overflow = Rate(rate, burst, clock())

    def __len__(self) -> int:
        return len(self._table)

    def _entry(self, key: str, now: float) -> Rate:
        entry = self._table.get(key)
        if entry is not None:
            self._table.move_to_end(key)
            return entry
        if len(self._table) >= self.max_clients:
            oldest_key, oldest = next(iter(self._table.items()))
            if not oldest.idle(now):
                return self._overflow
            del self._table[oldest_key]
        entry = self._table[key] = Rate(self.rate, self.burst, now)
        return entry

    def reserve(self, remote: str | None, max_delay: float = 0.0) -> float | None:
        """For this peer: seconds to wait before acting, or None when it is over its rate by more than that."""
        now = self.clock()
        return self._entry(client_key(remote), now).reserve(now, max_delay)

    def wait(self, remote: str | None) -> float:
        """Seconds until this peer's next action would be admitted at once. Reserves nothing."""
        now = self.clock()
        return self._entry(client_key(remote), now).wait(now)

    def refund(self, remote: str | None) -> None:
        """Give back one action this peer reserved earlier. A peer whose entry was forgotten meanwhile (or that
        shares the overflow entry) gives it back to whichever entry it has now."""
        self._entry(client_key(remote), self.clock()).refund()

    def take(self, remote: str | None) -> bool:
        """Spend one action of this peer's budget now; False when it has none left."""
        return self.reserve(remote) is not None
