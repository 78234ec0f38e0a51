"""How the forwarder reaches the upstream CA: one CMP message POSTed over HTTP (RFC 9811), its answer
the body of a 200 response. Anything else (no connection, a timeout, another status) is UpstreamError, which the
forwarder retries with backoff; what the body says is judged by the forwarder, not here.
"""

from __future__ import annotations

from typing import Protocol

import aiohttp

CONTENT_TYPE = "application/pkixcmp"


class UpstreamError(Exception):
    """The upstream could not be reached or answered at the HTTP level with something other than 200."""


class Transport(Protocol):
    async def post(self, der: bytes) -> bytes: ...


class HttpTransport:
    """POST application/pkixcmp to the upstream URL (RFC 9811) with the configured timeouts."""

    def __init__(self, url: str, connect_timeout_s: float, request_timeout_s: float) -> None:
        self.url = url
        self.timeout = aiohttp.ClientTimeout(total=request_timeout_s, sock_connect=connect_timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def post(self, der: bytes) -> bytes:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self._session.post(self.url, data=der, headers={"Content-Type": CONTENT_TYPE}) as rsp:
                body = await rsp.read()
                if rsp.status != 200:
                    raise UpstreamError(f"HTTP {rsp.status} from the upstream")
                return body
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamError(f"upstream unreachable: {type(exc).__name__}: {exc}"[:300]) from None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
