"""The validation authority as one long-lived component: the CRL publisher and the OCSP responder.

async with ValidationAuthority(core.journal, core.token, core.audit, VaSettings(...)) as va:
    app = make_app(va)               # appliance.va.http
    async with VaServer(app, "0.0.0.0", 7451) as server: ...
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from appliance.alarms import Alarms
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.va.crl import DEFAULT_CRL_VALIDITY_S, CrlPublisher
from appliance.va.ocsp import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_RESPONSE_VALIDITY_S, OcspResponder
from appliance.va.status import NeverIssued
from hsm.token import Token


@dataclass(frozen=True)
class VaSettings:
    """Everything the VA needs from the configuration (the lead maps a [va] table onto this)."""

    crl_validity_s: float = DEFAULT_CRL_VALIDITY_S  # CRL nextUpdate - thisUpdate; regenerated at half of it
    ocsp_validity_s: float = DEFAULT_RESPONSE_VALIDITY_S  # OCSP nextUpdate - thisUpdate; re-signed at half
    signer_validity_days: int = 30  # delegated OCSP signing certificate
    signer_renew_days: int = 10  # re-issued (new key) when it expires within this
    never_issued: NeverIssued = "unknown"  # answer for a serial the journal never saw
    poll_s: float = 2.0  # how soon changes made by another process (the CLI) are seen
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES  # OCSP request body (POST) or decoded GET
    http_max_age_s: int = 300  # Cache-Control max-age cap for CRLs and OCSP GET answers
    # Cached OCSP answers, about 2 KB of the daemon's memory each (docs/performance.md "Memory").
    cache_max: int = 10_000
    max_pending_signs: int = 256  # OCSP misses waiting for the HSM beyond this get tryLater
    max_inflight_signs: int = 4  # OCSP signatures queued for or inside the HSM at once
    sign_wait_s: float = 2.0  # an OCSP signature not started by then (certificates first) gets tryLater
    sign_rate_per_client: float = 50.0  # fresh OCSP signatures (nonce or cache miss) per second per client
    sign_burst_per_client: int = 100  # ... in bursts of up to this
    sign_rate_total: float = 200.0  # ... and for all network clients together
    request_rate_per_client: float = 200.0  # OCSP requests per second per client; faster ones are held back
    request_burst_per_client: int = 400  # ... in bursts of up to this
    pace_max_delay_s: float = 1.0  # the longest a request is held; further over the rate: held, then tryLater
    # While issuance is at work, OCSP requests and CRL fetches of all network clients together per second:
    # issuance first on the CPU (docs/revocation.md "Load").
    request_rate_while_issuing: float = 2000.0
    clients_max: int = 4096  # clients tracked per budget (bounded tables; see appliance/va/ratelimit.py)
    presign_max: int = 0  # OCSP answers made ahead of time for this many newest live certificates per CA
    presign_batch: int = 128  # ... signed this many per HSM call


class ValidationAuthority:
    """Enter to load (issuing the OCSP signers if needed) and start both named tasks; exit stops them."""

    def __init__(
        self,
        journal: Journal,
        token: Token,
        audit: AuditSink,
        settings: VaSettings | None = None,
        *,
        actor: str = "appliance",
        clock: Callable[[], float] = time.time,
        alarms: Alarms | None = None,
        issuing: Callable[[], bool] | None = None,
    ) -> None:
        """`issuing`: whether issuance is at work now (runtime.Core.activity.busy); OCSP yields to it."""
        self.settings = s = settings or VaSettings()
        self.alarms = alarms or Alarms()
        self.crls = CrlPublisher(
            journal, token, audit, validity_s=s.crl_validity_s, poll_s=s.poll_s, actor=actor, clock=clock,
            alarms=self.alarms,
        )  # fmt: skip
        self.responder = OcspResponder(
            journal, token, audit, validity_s=s.ocsp_validity_s, never_issued=s.never_issued,
            max_request_bytes=s.max_request_bytes, cache_max=s.cache_max, max_pending=s.max_pending_signs,
            max_inflight_signs=s.max_inflight_signs, sign_wait_s=s.sign_wait_s,
            client_rate=s.sign_rate_per_client, client_burst=s.sign_burst_per_client,
            total_rate=s.sign_rate_total, request_rate=s.request_rate_per_client,
            request_burst=s.request_burst_per_client, pace_max_delay_s=s.pace_max_delay_s,
            request_rate_while_issuing=s.request_rate_while_issuing, issuing=issuing,
            max_clients=s.clients_max, presign_max=s.presign_max, presign_batch=s.presign_batch,
            signer_validity_days=s.signer_validity_days, signer_renew_days=s.signer_renew_days,
            poll_s=s.poll_s, actor=actor, clock=clock, alarms=self.alarms,
        )  # fmt: skip
        self._stack = contextlib.AsyncExitStack()

    async def __aenter__(self) -> ValidationAuthority:
        try:
            await self._stack.enter_async_context(self.responder)
            await self._stack.enter_async_context(self.crls)
        except BaseException:
            await self._stack.aclose()
            raise
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.__aexit__(exc_type, exc, tb)

    def changed(self) -> None:
        """A revocation was made in this process (e.g. a CMP rr): regenerate CRLs and refresh OCSP now."""
        self.crls.nudge()
        self.responder.nudge()
