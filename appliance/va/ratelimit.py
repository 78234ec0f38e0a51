"""Token buckets per client address, in a table that cannot grow without bound.

A client is its IP address; an IPv6 client is its /64, the block one host or one LAN segment normally holds, so
walking through the addresses of one's own /64 earns nothing. An IPv4-mapped IPv6 address is the IPv4 address.
The address is the TCP peer's: a header such as X-Forwarded-For is never believed (anyone can write one), so
behind a reverse proxy every client shares the proxy's budget.

The table holds at most `max_clients` entries. A new client takes the place of the least recently seen one if
that one's bucket has refilled (a full bucket carries no information, so forgetting it changes nothing);
otherwise every newcomer shares one overflow bucket until entries refill. A flood from many addresses therefore
costs a bounded table, and takes its tokens from the overflow bucket, not from the clients already known.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

OVERFLOW = "overflow"


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


@dataclass
class TokenBucket:
    rate: float  # tokens per second
    burst: float  # bucket size
    tokens: float
    stamp: float

    def refill(self, now: float) -> float:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
        return self.tokens

    def take(self, now: float) -> bool:
        if self.refill(now) >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def full(self, now: float) -> bool:
        return self.refill(now) >= self.burst


class ClientLimiter:
    """`rate` actions per second per client, in bursts of up to `burst`; see the module docstring."""

    def __init__(
        self,
        rate: float,
        burst: float,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_clients < 1:
            raise ValueError("rate > 0, burst >= 1 and max_clients >= 1 are required")
        self.rate = rate
        self.burst = burst
        self.max_clients = max_clients
        self.clock = clock
        self._table: OrderedDict[str, TokenBucket] = OrderedDict()
        self._overflow = self._new(clock())

    def _new(self, now: float) -> TokenBucket:
        return TokenBucket(self.rate, self.burst, self.burst, now)

    def __len__(self) -> int:
        return len(self._table)

    def _bucket(self, key: str, now: float) -> TokenBucket:
        bucket = self._table.get(key)
        if bucket is not None:
            self._table.move_to_end(key)
            return bucket
        if len(self._table) >= self.max_clients:
            oldest_key, oldest = next(iter(self._table.items()))
            if not oldest.full(now):
                return self._overflow
            del self._table[oldest_key]
        bucket = self._table[key] = self._new(now)
        return bucket

    def take(self, remote: str | None) -> bool:
        """Spend one token of this peer's budget; False when it has none left."""
        now = self.clock()
        return self._bucket(client_key(remote), now).take(now)
