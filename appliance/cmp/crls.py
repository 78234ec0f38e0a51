"""CRLs of other CAs, fetched from a certificate's CRL distribution point when a CMP signer's revocation status is
needed (appliance/cmp/trust.py), and kept until they are due again.

A fetch is bounded: http(s) only, `timeout_s` for the whole exchange, at most `max_bytes` read (a longer answer
is dropped unread), parsed off the event loop. One fetch per URL at a time (requests that need the same CRL
wait for it), a failed URL is not tried again for `retry_s`, a fetched CRL is fetched again after `refresh_s` or
at its nextUpdate, whichever is first, and at most `max_entries` URLs are remembered. Nothing is fetched ahead of
need: the first message from a signer of a new CA waits for its CRL.

The cache does not judge a CRL (issuer, signature, times): the caller does, with the issuer certificate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from cryptography import x509

from appliance.alarms import LogOnce

log = logging.getLogger(__name__)

Fetch = Callable[[str], Awaitable[bytes]]


class CrlUnavailable(Exception):
    """No CRL could be had from this URL (network, HTTP status, size, format); the text says why."""


@dataclass
class _Entry:
    crl: x509.CertificateRevocationList | None
    until: float  # fetch again (or, after a failure, try again) after this
    error: str = ""


def crl_urls(cert: x509.Certificate) -> list[str]:
    """The http(s) URLs of a certificate's CRL distribution points (full names only; LDAP and relative names are
    not fetched)."""
    try:
        points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except (x509.ExtensionNotFound, ValueError):
        return []
    urls = []
    for point in points:
        for name in point.full_name or ():
            if isinstance(name, x509.UniformResourceIdentifier) and name.value.lower().startswith(
                ("http://", "https://")
            ):
                urls.append(name.value)
    return urls[:4]


class CrlCache:
    def __init__(
        self,
        *,
        timeout_s: float = 5.0,
        max_bytes: int = 1024 * 1024,
        retry_s: float = 60.0,
        refresh_s: float = 3600.0,
        max_entries: int = 256,
        clock: Callable[[], float] = time.time,
        fetch: Fetch | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self.max_bytes = max_bytes
        self.retry_s = retry_s
        self.refresh_s = refresh_s
        self.max_entries = max_entries
        self.clock = clock
        self._fetch = fetch or self._http
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._inflight: dict[str, asyncio.Task[_Entry]] = {}
        self._failures = LogOnce(300.0)
        self.stats = {"fetched": 0, "failed": 0}

    async def get(self, url: str) -> x509.CertificateRevocationList:
        """The CRL at `url`, from the cache while it is fresh; CrlUnavailable when there is none to be had."""
        now = self.clock()
        entry = self._entries.get(url)
        if entry is None or entry.until <= now:
            task = self._inflight.get(url)
            if task is None:
                task = asyncio.ensure_future(self._load(url))
                self._inflight[url] = task
                task.add_done_callback(lambda _t: self._inflight.pop(url, None))
            entry = await asyncio.shield(task)
        if entry.crl is None:
            raise CrlUnavailable(entry.error)
        return entry.crl

    async def _load(self, url: str) -> _Entry:
        now = self.clock()
        try:
            data = await asyncio.wait_for(self._fetch(url), self.timeout_s)
            crl = await asyncio.to_thread(_parse, data)
        except (CrlUnavailable, TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, CrlUnavailable) else str(exc)
            self.stats["failed"] += 1
            # A peer can name any URL in a certificate; its failures are logged once per URL and 5 minutes.
            self._failures.log(log, logging.WARNING, url, "CRL from %s unavailable: %s", url, text[:200])
            # What a peer is told (statusString) is ours, never the library's text above.
            entry = _Entry(None, now + self.retry_s, _told(exc, self.timeout_s))
        else:
            self.stats["fetched"] += 1
            due = now + self.refresh_s
            if crl.next_update_utc is not None:
                due = min(due, crl.next_update_utc.timestamp())
            entry = _Entry(crl, max(due, now + 1.0))
        self._entries[url] = entry
        self._entries.move_to_end(url)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return entry

    async def _http(self, url: str) -> bytes:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as rsp:
            if rsp.status != 200:
                raise CrlUnavailable(f"HTTP {rsp.status}")
            if rsp.content_length is not None and rsp.content_length > self.max_bytes:
                raise CrlUnavailable(f"{rsp.content_length} bytes, more than {self.max_bytes}")
            data = await rsp.content.read(self.max_bytes + 1)
            if len(data) > self.max_bytes:
                raise CrlUnavailable(f"more than {self.max_bytes} bytes")
            return data


def _told(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, CrlUnavailable):
        return str(exc)[:200] or "no CRL"
    if isinstance(exc, TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientError | OSError):
        return "the fetch failed (no connection, or no HTTP answer)"
    return "the answer is not a CRL (DER or PEM) whose issuer and dates decode"


def _parse(data: bytes) -> x509.CertificateRevocationList:
    """The fetched CRL, its issuer name and dates decoded here (cryptography decodes names only when asked): what
    does not decode is a failed fetch (ValueError), not an exception deep in the signer check."""
    crl = (
        x509.load_pem_x509_crl(data)
        if data.lstrip().startswith(b"-----BEGIN")
        else x509.load_der_x509_crl(data)
    )
    try:
        _ = crl.issuer, crl.last_update_utc, crl.next_update_utc
    except Exception as exc:  # noqa: BLE001 - what cryptography raises for a peer's bytes is not a stable contract
        raise ValueError(f"the CRL's issuer or dates do not decode: {type(exc).__name__}: {exc}") from None
    return crl
