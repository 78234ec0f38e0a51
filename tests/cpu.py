"""CPU-time budgets for "rejected before any expensive work" tests.

Wall-clock bounds fail on a loaded machine (the process waits for a core); the CPU time this process spends
does not grow with other load. The budgets are an order of magnitude above what the work costs when it is
linear, and orders below what the quadratic or exponential behaviour they guard against would cost.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator


@contextlib.contextmanager
def cpu_budget(seconds: float) -> Iterator[None]:
    start = time.process_time()
    yield
    used = time.process_time() - start
    assert used < seconds, f"used {used:.3f} s of CPU; budget {seconds} s"
