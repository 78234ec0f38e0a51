"""Per-client token buckets in a bounded table (appliance/va/ratelimit.py), on a hand-moved clock."""

from __future__ import annotations

import pytest

from appliance.va.ratelimit import ClientLimiter, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_client_keys() -> None:
    assert client_key("192.0.2.7") == "192.0.2.7"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"  # IPv4-mapped: the same client
    # one IPv6 client is its /64: walking one's own /64 earns no new budget
    assert (
        client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff:ffff:ffff:ffff") == "2001:db8:1:2::/64"
    )
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("fe80::1%eth0") == "fe80::/64"
    assert client_key(None) == client_key("") == client_key("not an address") == "unknown"


def test_budget_refills_at_its_rate() -> None:
    clock = Clock()
    limiter = ClientLimiter(rate=2.0, burst=3, clock=clock)
    assert [limiter.take("192.0.2.1") for _ in range(4)] == [True, True, True, False]
    assert limiter.take("192.0.2.2")  # another client has its own budget
    clock.now += 0.5  # one token back
    assert [limiter.take("192.0.2.1") for _ in range(2)] == [True, False]
    clock.now += 100  # never more than the burst
    assert [limiter.take("192.0.2.1") for _ in range(4)] == [True, True, True, False]


def test_a_many_address_flood_cannot_grow_the_table_or_spend_known_clients_budgets() -> None:
    clock = Clock()
    limiter = ClientLimiter(rate=1.0, burst=2, max_clients=3, clock=clock)
    assert limiter.take("10.0.0.1") and limiter.take("10.0.0.2") and limiter.take("10.0.0.3")
    # 10,000 new addresses while the table is full of clients with spent tokens: one shared overflow bucket
    admitted = sum(limiter.take(f"10.1.{i // 256}.{i % 256}") for i in range(10_000))
    assert admitted == 2 and len(limiter) == 3
    # the known clients still have their own (one token each left)
    assert limiter.take("10.0.0.1") and limiter.take("10.0.0.2")
    # once the oldest entry has refilled it carries no information and makes room for a newcomer
    clock.now += 10
    assert limiter.take("10.2.0.1") and len(limiter) == 3


def test_arguments_are_checked() -> None:
    with pytest.raises(ValueError):
        ClientLimiter(rate=0, burst=1)
    with pytest.raises(ValueError):
        ClientLimiter(rate=1, burst=0)
