"""bench/stations.py's fixture start offsets: what each --start mode promises."""

from __future__ import annotations

import random

import pytest

from bench.stations import DEVICE_BYTES, STARTS, start_offsets
from stations.transports.serial import wire_time


@pytest.mark.parametrize("n", [1, 2, 8])
def test_start_offsets(n: int) -> None:
    cycle = wire_time(DEVICE_BYTES, 115200)
    assert start_offsets("lockstep", n, 115200, random.Random(1)) == [0.0] * n
    even = start_offsets("even", n, 115200, random.Random(1))
    assert even == pytest.approx([i * cycle / n for i in range(n)])
    rnd = start_offsets("random", n, 115200, random.Random(1))
    assert len(rnd) == n and rnd == sorted(rnd) and all(0 <= o < cycle for o in rnd)
    assert start_offsets("random", 8, 115200, random.Random(2)) != start_offsets(
        "random", 8, 115200, random.Random(3)
    )
    assert set(STARTS) == {"random", "even", "lockstep"}


def test_start_offsets_scale_with_baud() -> None:
    assert start_offsets("even", 2, 57600, random.Random(1))[1] == pytest.approx(
        2 * start_offsets("even", 2, 115200, random.Random(1))[1]
    )
