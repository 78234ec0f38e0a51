"""Free loopback ports for tests that start a served demo, which binds P..P+DEMO_PORTS-1."""

from __future__ import annotations

import socket

DEMO_PORTS = 6  # the served demo: LAN P, VA +1, CMP +2, metrics +3, EST +4, SCEP +5 (appliance/demo.py)


def free_ports(count: int = DEMO_PORTS) -> int:
    """A first port of `count` consecutive free loopback ports."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first: int = s.getsockname()[1]
        if first + count > 65535:
            continue
        ok = True
        for p in range(first, first + count):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return first
    raise AssertionError("no free ports")
