"""A flood of HTTP POSTs from chosen local addresses (127.0.0.x), for the listener tests of the CMP and SCEP
front ends: keep-alive connections reopened when the server closes them, answers counted by status."""

from __future__ import annotations

import asyncio
import time
from collections import Counter


class Conn:
    """One keep-alive HTTP/1.1 connection from a chosen local address (reopened when the server closes it)."""

    def __init__(self, port: int, src: str, path: str, content_type: str) -> None:
        self.port, self.src = port, src
        self.head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: {content_type}\r\n"
        self.rw: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def post(self, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.rw is None:
            self.rw = await asyncio.open_connection("127.0.0.1", self.port, local_addr=(self.src, 0))
        r, w = self.rw
        w.write(f"{self.head}Content-Length: {len(body)}\r\n\r\n".encode() + body)
        await w.drain()
        line = await r.readline()
        if not line:
            raise ConnectionResetError("closed by the server")
        headers: dict[str, str] = {}
        while (h := await r.readline()) not in (b"\r\n", b""):
            k, _, v = h.decode().partition(":")
            headers[k.strip().lower()] = v.strip()
        data = await r.readexactly(int(headers.get("content-length", "0")))
        if headers.get("connection", "").lower() == "close":
            w.close()
            self.rw = None
        return int(line.split()[1]), headers, data

    def close(self) -> None:
        if self.rw is not None:
            self.rw[1].close()


async def flood(
    port: int,
    path: str,
    content_type: str,
    sources: list[str],
    per_source: int,
    bodies: list[bytes],
    seconds: float,
) -> tuple[Counter[str], float]:
    """`per_source` connections from each address send as fast as answered for `seconds`; counts by HTTP
    status ("503 without Retry-After" if one lacks it, "connection error" for a reset or refused connection)."""
    counts: Counter[str] = Counter()
    stop = time.monotonic() + seconds

    async def one(src: str, i: int) -> None:
        conn = Conn(port, src, path, content_type)
        try:
            while time.monotonic() < stop:
                try:
                    status, headers, _ = await conn.post(bodies[i % len(bodies)])
                except (OSError, asyncio.IncompleteReadError):
                    counts["connection error"] += 1
                    conn.rw = None
                    continue
                counts[
                    str(status) if status != 503 or "retry-after" in headers else "503 without Retry-After"
                ] += 1
        finally:
            conn.close()

    t0 = time.monotonic()
    await asyncio.gather(*(one(src, i) for src in sources for i in range(per_source)))
    return counts, time.monotonic() - t0
