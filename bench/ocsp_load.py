"""An OCSP load generator for bench/ocsp.py that runs in its own process (so its CPU is not the server's).

`connections` keep-alive connections each send up to `depth` POST /ocsp requests before reading their answers
(HTTP/1.1 pipelining; depth 1 is one request in flight per connection, as most clients do). Answers are counted
by HTTP status and OCSP responseStatus (the first bytes of the body), and `check_every`th body is parsed in full
with cryptography to count good / revoked / unknown. The generator reports its own CPU time beside the wall time.
"""

from __future__ import annotations

import asyncio
import collections
import time

from cryptography.x509 import ocsp

_SUCCESSFUL = b"\x0a\x01\x00"


async def _connection(
    host: str, port: int, queue: collections.deque[bytes], depth: int, counts: collections.Counter[str],
    check_every: int,
) -> None:  # fmt: skip
    reader, writer = await asyncio.open_connection(host, port)
    try:
        seen = 0
        while queue:
            batch = [queue.pop() for _ in range(min(depth, len(queue)))]
            writer.write(b"".join(
                b"POST /ocsp HTTP/1.1\r\nHost: va\r\nContent-Type: application/ocsp-request\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body) for body in batch
            ))  # fmt: skip
            for _ in batch:
                head = await reader.readuntil(b"\r\n\r\n")
                status = head[9:12].decode()
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length)
                if status != "200":
                    counts[f"http {status}"] += 1
                elif _SUCCESSFUL not in body[2:7]:
                    counts["unsuccessful"] += 1
                else:
                    counts["successful"] += 1
                    seen += 1
                    if seen % check_every == 0:
                        counts[
                            "checked " + ocsp.load_der_ocsp_response(body).certificate_status.name.lower()
                        ] += 1
    finally:
        writer.close()


def run_load(
    host: str, port: int, bodies: list[bytes], connections: int, depth: int, check_every: int = 50
) -> tuple[float, float, dict[str, int]]:
    """(wall seconds, this process's CPU seconds, counts) for answering every body once."""

    async def main() -> tuple[float, float, dict[str, int]]:
        queue = collections.deque(reversed(bodies))
        counts: collections.Counter[str] = collections.Counter()
        cpu0, t0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(
            _connection(host, port, queue, depth, counts, check_every) for _ in range(connections)
        ))  # fmt: skip
        return time.perf_counter() - t0, time.process_time() - cpu0, dict(counts)

    return asyncio.run(main())
