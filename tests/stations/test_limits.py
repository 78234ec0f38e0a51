"""FailureLimiter: N failures in a window block a station for the window; success and time forgive."""

from __future__ import annotations

import pytest

from stations.limits import FailureLimiter


def test_the_limit_blocks_for_one_window_and_then_lets_the_station_try_again() -> None:
    limiter = FailureLimiter(limit=3, window_s=60)
    assert [limiter.failed("st", t) for t in (0.0, 1.0)] == [None, None]
    assert limiter.blocked("st", 1.5) is None
    assert limiter.failed("st", 2.0) == 60  # the third failure reaches the limit, once
    assert limiter.failed("st", 3.0) is None  # more failures while blocked change nothing
    assert limiter.blocked("st", 2.0) == 60
    assert limiter.blocked("st", 50.0) == pytest.approx(12.0)
    assert limiter.blocked("other", 50.0) is None  # per station
    assert limiter.blocked("st", 62.0) is None  # the window has passed
    assert limiter.failures("st") == 0


def test_failures_spread_over_more_than_a_window_never_block() -> None:
    limiter = FailureLimiter(limit=3, window_s=10)
    for t in range(0, 100, 6):  # one failure every 6 s: never 3 within 10 s of the window's first
        assert limiter.failed("st", float(t)) is None
        assert limiter.blocked("st", float(t)) is None


def test_a_successful_handshake_forgives_earlier_failures() -> None:
    limiter = FailureLimiter(limit=3, window_s=60)
    limiter.failed("st", 0.0)
    limiter.failed("st", 1.0)
    limiter.succeeded("st")
    assert limiter.failed("st", 2.0) is None and limiter.failures("st") == 1


def test_memory_is_bounded_whatever_keys_a_peer_invents() -> None:
    limiter = FailureLimiter(limit=2, window_s=60, max_keys=100)
    for i in range(10_000):
        limiter.failed(f"id-{i}", 0.0)
    assert len(limiter._counts) == 100
    assert limiter.failures("id-9999") == 1 and limiter.failures("id-0") == 0


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError):
        FailureLimiter(limit=0)
    with pytest.raises(ValueError):
        FailureLimiter(window_s=0)
