"""Request ids the appliance makes itself, for requests that came without one (CLI, in-process callers).

A UUIDv7 (RFC 9562 5.7) in hex: the Unix time in milliseconds, then 74 bits from the CSPRNG. The journal indexes
request ids per station for ever; ids that grow with time land at the end of that index instead of on a random
page of ten years of them (docs/performance.md "Ten years of journal"). The station fixture library makes its
ids the same way (stations.client.new_request_id; stations/ and the appliance core do not import each other).
"""

from __future__ import annotations

import secrets
import time


def new_request_id(now_ms: int | None = None) -> str:
    """32 lowercase hex digits; later ids sort after earlier ones (to the millisecond)."""
    ms = (time.time_ns() // 1_000_000 if now_ms is None else now_ms) & ((1 << 48) - 1)
    rand = int.from_bytes(secrets.token_bytes(10), "big")
    value = (ms << 80) | (0x7 << 76) | ((rand >> 62) & 0xFFF) << 64 | (0b10 << 62) | (rand & ((1 << 62) - 1))
    return f"{value:032x}"
