"""The OCSP responder (RFC 6960) over the journal, signing with delegated responder keys in the HSM.

Per active issuing CA, a delegated OCSP signing certificate (id-kp-OCSPSigning, id-pkix-ocsp-nocheck, 30 days)
is issued by the CA for a fresh key generated in the token; it is re-issued, with a new key, 10 days before it
expires. Answers (docs/revocation.md has the table):

    issued / confirmed, not revoked           -> good
    in the revocation table                   -> revoked (revocationTime, reason unless unspecified)
    burned (reserved, signature never released) -> revoked, RFC 6960 2.2 "non-issued" form: certificateHold,
                                                 1970-01-01, with the extended-revoke extension (4.4.8)
    intent (being issued this very moment)    -> unknown, never cached
    a serial the journal never saw            -> unknown (default), or the non-issued revoked form with
                                                 never_issued="revoked"
    one of our OCSP signing certificates      -> good

Request problems never raise: the parser (ocsp_request.py) turns every request into one CertID or a refusal
with a reason: malformedRequest (oversize, not DER, no request or several, an extension twice, an unknown
critical extension, a bad nonce or serial) or unauthorized (a CertID hash we do not serve, or an issuer that is
not one of our CAs, by issuerNameHash + issuerKeyHash). Refusals are counted by reason and logged once per reason
and minute. internalError is for our own failures only, logged once per exception type and minute.

Responses without a nonce are cached per (CA, serial, CertID hash) and reused until half their validity, so
load does not turn into HSM signatures one for one; concurrent misses for one key share one signature. The
cache forgets a serial when its revocation or issuance row changes (polled from the journal every `poll_s`,
so revocations made by another process, the CLI, are seen within that time). A request with a nonce is
signed fresh and echoes the nonce.

Signing never starves issuance (docs/revocation.md, "Load"): the responder keys sign in the PKCS#11 thread's
validation lane, behind every certificate; at most `max_inflight_signs` signatures are queued for the HSM at
once, each waits at most `sign_wait_s` to start (then tryLater); and a network client may cause at most
`client_rate` fresh signatures a second (bursts of `client_burst`), all clients together `total_rate`. Over
budget, a nonce request gets the cached answer without the nonce (RFC 5019 2.2.1), or tryLater. Nor do cheap
answers starve it of the CPU: while issuance is at work (`issuing()`), all network clients' requests together
are paced to `request_rate_while_issuing`, on top of each client's own request rate.

Here: the responder's set-up, its answering paths and budgets, and its long-lived task. Beside it, by
responsibility: answers.py (what an answer is and how it is built), ocsp_cache.py (the answers kept, made ahead
and dropped), ocsp_batches.py (fresh signatures in batches), ocsp_request.py (the request parser), presign.py
(responses built by hand for sign_many).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from appliance.alarms import Alarms, LogOnce
from appliance.ca import CaRecord
from appliance.errors import BirthlineError
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.lifecycle import PollingTask
from appliance.va.answers import (
    CERTID_HASHES,
    EXTENDED_REVOKE_OID,
    INTERNAL_ERROR,
    MALFORMED,
    REFUSALS,
    TRY_LATER,
    UNAUTHORIZED,
    Entry,
    OcspAnswer,
    Parsed,
    Signing,
    answer_of,
    digest,
    key_hash_input,
    response_builder,
)
from appliance.va.crl import issuing_cas
from appliance.va.ocsp_batches import BatchSigning
from appliance.va.ocsp_cache import AnswerCache
from appliance.va.ocsp_request import Refusal, parse_request
from appliance.va.ratelimit import ClientLimiter, Rate
from appliance.va.signer import OcspSigner, ensure_signer
from appliance.va.status import CertStatus, NeverIssued, lookup_status
from hsm.algorithms import default_hash
from hsm.errors import HsmBusyError, HsmError
from hsm.token import Token
from hsm.worker import Lane, Priority

# Re-exported: the HTTP and line listeners, the tests and the benches import these from here. (Not
# SIGN_BATCHES_IN_FLIGHT: it is read in ocsp_batches.py, and a copy here would be a name that sets nothing.)
__all__ = [
    "DEFAULT_MAX_REQUEST_BYTES",
    "DEFAULT_RESPONSE_VALIDITY_S",
    "EXTENDED_REVOKE_OID",
    "INTERNAL_ERROR",
    "MALFORMED",
    "TRY_LATER",
    "UNAUTHORIZED",
    "OcspAnswer",
    "OcspResponder",
]

log = logging.getLogger(__name__)

DEFAULT_RESPONSE_VALIDITY_S = 3600.0
DEFAULT_MAX_REQUEST_BYTES = 4096


def _never() -> bool:
    return False


class OcspResponder(AnswerCache, BatchSigning, PollingTask):
    """RFC 6960 answers over the journal. Call load() (or enter it as an async context manager, which also
    runs the "va-ocsp-refresh" task: cache invalidation every poll_s, signer renewal every signer_check_s)."""

    TASK_NAME = "va-ocsp-refresh"

    def __init__(
        self,
        journal: Journal,
        token: Token,
        audit: AuditSink,
        *,
        validity_s: float = DEFAULT_RESPONSE_VALIDITY_S,
        never_issued: NeverIssued = "unknown",
        max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
        cache_max: int = 10_000,
        max_pending: int = 256,
        max_inflight_signs: int = 4,
        sign_wait_s: float = 2.0,
        client_rate: float = 50.0,
        client_burst: int = 100,
        total_rate: float = 200.0,
        request_rate: float = 200.0,
        request_burst: int = 400,
        pace_max_delay_s: float = 1.0,
        request_rate_while_issuing: float = 2000.0,
        issuing: Callable[[], bool] | None = None,
        max_clients: int = 4096,
        signer_validity_days: int = 30,
        signer_renew_days: int = 10,
        poll_s: float = 2.0,
        signer_check_s: float = 300.0,
        presign_max: int = 0,
        presign_batch: int = 128,
        actor: str = "appliance",
        clock: Callable[[], float] = time.time,
        alarms: Alarms | None = None,
        limit_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if never_issued not in ("unknown", "revoked"):
            raise ValueError("never_issued is 'unknown' or 'revoked'")
        super().__init__(poll_s)
        self.journal = journal
        self.token = token
        self.audit = audit
        self.validity_s = validity_s
        self.never_issued: NeverIssued = never_issued
        self.max_request_bytes = max_request_bytes
        self.cache_max = cache_max
        self.max_pending = max_pending
        self.max_inflight_signs = max_inflight_signs
        self.lane = Lane(Priority.VALIDATION, max_wait_s=sign_wait_s)
        self.limit_clock = limit_clock
        self._clients = ClientLimiter(client_rate, client_burst, max_clients, clock=limit_clock)
        self._total = Rate(total_rate, max(1.0, total_rate), limit_clock())
        self._requests = ClientLimiter(request_rate, request_burst, max_clients, clock=limit_clock)
        self.pace_max_delay_s = pace_max_delay_s
        # Issuance first on the CPU, as it is at the HSM: while it is at work, all network clients together are
        # paced to this rate, in bursts of a tenth of a second's worth.
        self.request_rate_while_issuing = request_rate_while_issuing
        self._while_issuing = Rate(
            request_rate_while_issuing, max(1.0, request_rate_while_issuing / 10), limit_clock()
        )
        self.issuing: Callable[[], bool] = issuing or _never
        """Whether issuance is at work now (runtime.Core.activity.busy in the daemon); never, by default."""
        self._slots: asyncio.Semaphore | None = None
        self._signing_now = 0
        self.peak_signing = 0  # the most signatures ever looked up / queued / signing at once
        self.signer_validity_days = signer_validity_days
        self.signer_renew_days = signer_renew_days
        self.signer_check_s = signer_check_s
        self.presign_max = presign_max
        self.presign_batch = presign_batch
        self.presigned = 0  # answers signed ahead of time (also counted in `signed`)
        self.actor = actor
        self.clock = clock
        self.hits = 0
        self.misses = 0
        self.signed = 0
        self.errors = 0
        self.paced = 0  # requests held back to their client's request rate
        self.tarpitted = 0  # ... held pace_max_delay_s and answered tryLater: far over that rate
        self.yielded = 0  # requests held longer than their client's rate asks, for issuance at work
        self.yielded_refused = 0  # ... answered tryLater after the hold: over that budget by pace_max_delay_s
        self.busy = 0  # the HSM had higher-priority work for sign_wait_s: tryLater
        self.throttled = 0  # no fresh signature for this client now (budget or max_pending)
        self.nonce_dropped = 0  # ... answered from the cache without the nonce instead
        self.refused: dict[str, int] = {}  # refusals by reason (ocsp_request.py)
        # One line per cause and minute: refusals are the peer's doing, internal errors ours; neither may let a
        # flood of requests become a flood of log lines.
        self._log_once = LogOnce(interval_s=60.0)
        self.last_error: BaseException | None = None
        self.alarms = alarms or Alarms()
        self._issuers: dict[tuple[str, bytes, bytes], str] = {}
        self._signing: dict[str, Signing] = {}
        self._cache: dict[tuple[str, int, str], Entry] = {}
        # Request bytes -> cache entry: a request seen before (or the plain encoding of a pre-produced answer)
        # is answered from its bytes alone, without parsing (fast()). Entries die with their cache entry.
        self._by_request: dict[bytes, Entry] = {}
        # (ca, serial) changed since the current presign pass began; kept only during a pass (every issuance is a
        # change: outside a pass the set would grow by one entry per certificate for as long as the daemon runs).
        self._changed: set[tuple[str, int]] = set()
        self._presigning = False
        self._init_batches()
        self._inflight: dict[tuple[str, int, str], asyncio.Future[OcspAnswer]] = {}
        self._pending = 0
        self._generation = 0  # bumped whenever something is invalidated: a racing miss then does not cache
        self._seen_revocation = 0
        self._seen_issuance = 0
        self._loaded = False
        self._signer_checked = time.monotonic()

    # -- set-up ----------------------------------------------------------------------------------------------
    def load(self) -> None:
        """(Re)load the issuing CAs and make sure each has a valid signer (may sign in the HSM; blocking)."""
        self._install(self._prepare())

    def _prepare(
        self,
    ) -> tuple[dict[tuple[str, bytes, bytes], str], dict[str, Signing], tuple[int, int] | None]:
        """The blocking half of load(), safe in a worker thread: it only reads the responder's state."""
        issuers: dict[tuple[str, bytes, bytes], str] = {}
        signing: dict[str, Signing] = {}
        for ca in issuing_cas(self.journal):
            self._add_issuer(issuers, ca)
            signer = ensure_signer(
                self.journal, self.token, self.audit, ca.name, validity_days=self.signer_validity_days,
                renew_before_days=self.signer_renew_days, actor=self.actor, clock=self.clock,
            )  # fmt: skip
            old = self._signing.get(ca.name)
            if old is not None and old.signer.key_label == signer.key_label:
                signing[ca.name] = old
            else:
                key = self.token.get_key(signer.key_label).in_lane(self.lane)
                signing[ca.name] = Signing(signer, key, default_hash(key.algorithm))
        marks = None if self._loaded else self.journal.call(self._watermarks)
        return issuers, signing, marks

    def _install(
        self,
        prepared: tuple[dict[tuple[str, bytes, bytes], str], dict[str, Signing], tuple[int, int] | None],
    ) -> None:
        issuers, signing, marks = prepared
        for ca, s in signing.items():
            old = self._signing.get(ca)
            if old is None or old.signer.key_label != s.signer.key_label:
                self._forget_ca(ca)
        if marks is not None:
            self._seen_revocation, self._seen_issuance = marks
            self._loaded = True
        self._issuers, self._signing = issuers, signing

    @staticmethod
    def _add_issuer(issuers: dict[tuple[str, bytes, bytes], str], ca: CaRecord) -> None:
        cert = ca.certificate
        name_der = cert.subject.public_bytes()
        key_bits = key_hash_input(cert)
        for alg in CERTID_HASHES:
            issuers[(alg.name, digest(alg, name_der), digest(alg, key_bits))] = ca.name

    def signer(self, ca: str) -> OcspSigner | None:
        s = self._signing.get(ca)
        return None if s is None else s.signer

    # -- answering -------------------------------------------------------------------------------------------
    def _refuse(self, refusal: Refusal, client: str | None) -> OcspAnswer:
        self.refused[refusal.reason] = self.refused.get(refusal.reason, 0) + 1
        # Peer-caused and cheap to repeat: one line per reason and interval, never one per request.
        self._log_once.log(
            log, logging.INFO, f"refused:{refusal.reason}", "OCSP request from %s refused: %s (%s)",
            client or "this process", refusal.reason, refusal.status.name,
        )  # fmt: skip
        return REFUSALS[refusal.status]

    def _parse(self, request_der: bytes, client: str | None = None) -> Parsed | OcspAnswer:
        req = parse_request(request_der, self.max_request_bytes)
        if isinstance(req, Refusal):
            return self._refuse(req, client)
        alg = req.hash_algorithm
        ca = self._issuers.get((alg.name, req.name_hash, req.key_hash))
        if ca is None:
            return self._refuse(Refusal(ocsp.OCSPResponseStatus.UNAUTHORIZED, "unknown-issuer"), client)
        if ca not in self._signing:
            return TRY_LATER
        return Parsed(ca, alg, req.name_hash, req.key_hash, req.serial, req.nonce)

    def _lookup(self, p: Parsed) -> CertStatus:
        return lookup_status(self.journal.conn, p.ca, p.serial, self.never_issued)

    def _sign(self, p: Parsed, status: CertStatus, now: float) -> OcspAnswer:
        signing = self._signing[p.ca]
        builder, this_update, next_update = response_builder(signing, p, status, now, self.validity_s)
        # The key signs in the validation lane: behind every certificate the HSM has queued (hsm/worker.py).
        response = builder.sign(signing.key, signing.hash)
        self.signed += 1
        return answer_of(
            response.public_bytes(serialization.Encoding.DER), p, status, this_update, next_update
        )

    def answer(self, request_der: bytes) -> OcspAnswer:
        """Blocking form (CLI, tests): journal lookups and HSM signing on the calling thread's behalf. In-process
        callers are trusted: no client budget applies."""
        try:
            p = self._parse(bytes(request_der))
            if isinstance(p, OcspAnswer):
                return p
            now = self.clock()
            if p.nonce is None and (hit := self._hit(p.key, now)) is not None:
                return hit
            self.misses += 1
            generation = self._generation
            status = self.journal.call(self._lookup, p)
            try:
                answer = self._sign(p, status, now)
            except HsmBusyError:
                self.busy += 1
                return TRY_LATER
            self._store(p, status, answer, generation)
            return answer
        except Exception as exc:  # noqa: BLE001 - the responder answers every input; never raises
            return self._internal(exc)

    def respond(self, request_der: bytes) -> bytes:
        return self.answer(request_der).der

    async def admit(self, client: str) -> bool:
        """Pace a network client to its request rate before any work is done for it (the HTTP layer calls this
        first). Within the rate: at once. Above it: held until within it. Far above it (a wait beyond
        pace_max_delay_s): held pace_max_delay_s all the same, then False (answer tryLater). A client that
        sends as fast as it is answered thus slows itself down instead of spinning on cheap refusals."""
        delay = self.pace(client)
        if delay is None:
            await asyncio.sleep(self.pace_max_delay_s)
            return False
        if delay > 0:
            await asyncio.sleep(delay)
        return True

    def pace(self, client: str) -> float | None:
        """admit() without the wait, for listeners that hold requests themselves (appliance/va/fastpath.py):
        0.0 within the client's rate (and, while issuance is at work, within the while-issuing rate of all
        clients together), seconds to hold the request, or None far above either (hold it pace_max_delay_s,
        then answer tryLater). Counted as admit counts.

        A request takes its place in the shared rate when it arrives, even if its own client's rate then holds
        it longer: a GCRA cell keeps one time, not a calendar, so a place reserved later would lose every gap
        before it. Clients that send faster than their own rate thus take a little of the shared rate from the
        others (one interval per held request), never more than their own rates allow."""
        issuing = self.issuing()
        held = 0.0
        if issuing:
            shared = self._while_issuing.reserve(self.limit_clock(), self.pace_max_delay_s)
            if shared is None:
                self.tarpitted += 1
                self.yielded_refused += 1
                self._log_once.log(
                    log, logging.WARNING, "yield",
                    "OCSP and CRL requests over [va] request_rate_while_issuing (%g/s) while issuance is at"
                    " work: held, and answered tryLater (CRL: 503) past pace_max_delay_s",
                    self.request_rate_while_issuing,
                )  # fmt: skip
                return None
            held = shared
        delay = self._requests.reserve(client, self.pace_max_delay_s)
        if delay is None:
            if issuing:
                self._while_issuing.refund()  # refused for its own rate: it takes nothing from the others
            self.tarpitted += 1
            return None
        if held > delay:
            self.yielded += 1
            delay = held
        if delay > 0:
            self.paced += 1
        return delay

    def _within_budget(self, client: str | None) -> bool:
        """May this request cost a fresh signature? Network clients spend their own budget and the shared one;
        in-process callers (client None) are not limited."""
        if client is None:
            return True
        return self._clients.take(client) and self._total.reserve(self.limit_clock()) is not None

    async def _over_budget(self, p: Parsed, now: float) -> OcspAnswer:
        """No signature for this client now. A nonce request gets the pre-produced answer without its nonce if
        one is cached or being signed (RFC 5019 2.2.1: "the most complete response it can"); else tryLater."""
        self.throttled += 1
        if p.nonce is not None:
            hit = self._hit(p.key, now)
            if hit is None and (waiting := self._inflight.get(p.key)) is not None:
                hit = await asyncio.shield(waiting)
            if hit is not None and hit.status == ocsp.OCSPResponseStatus.SUCCESSFUL:
                self.nonce_dropped += 1
                return hit
        return TRY_LATER

    async def aanswer(self, request_der: bytes, client: str | None = None) -> OcspAnswer:
        """The event-loop form: the cache hit path never leaves the loop; a miss looks up on the journal
        thread and signs in a worker thread; concurrent misses for one key share one signature.

        `client` is the peer address (aiohttp's request.remote): a fresh signature (a nonce, or a miss) is
        within that client's budget and the shared one, or none is made (see _over_budget). At most
        `max_inflight_signs` signatures are queued for or inside the HSM at once; up to `max_pending` more
        requests wait for a turn, the rest get tryLater."""
        try:
            p = self._parse(bytes(request_der), client)
            if isinstance(p, OcspAnswer):
                return p
            now = self.clock()
            if p.nonce is None:
                if (hit := self._hit(p.key, now)) is not None:
                    self._index(bytes(request_der), self._cache[p.key])
                    return hit
                waiting = self._inflight.get(p.key)
                if waiting is not None:
                    self.hits += 1
                    return await asyncio.shield(waiting)
            if self._pending >= self.max_pending:
                self.throttled += 1
                return TRY_LATER
            if not self._within_budget(client):
                return await self._over_budget(p, now)
            self.misses += 1
            self._pending += 1
            future: asyncio.Future[OcspAnswer] | None = None
            if p.nonce is None:
                future = asyncio.get_running_loop().create_future()
                self._inflight[p.key] = future
            answer = TRY_LATER  # what those sharing this signature get if we are cancelled
            try:
                async with self._sign_slots():
                    self._signing_now += 1
                    self.peak_signing = max(self.peak_signing, self._signing_now)
                    try:
                        generation = self._generation
                        answer, status = await self._sign_batched(p, now)
                    finally:
                        self._signing_now -= 1
                if (entry := self._store(p, status, answer, generation)) is not None:
                    self._index(bytes(request_der), entry)
            except HsmBusyError:
                self.busy += 1
                answer = TRY_LATER
            except Exception as exc:  # noqa: BLE001 - our own failure: internalError, logged once per cause
                answer = self._internal(exc)
            finally:
                self._pending -= 1
                if future is not None:
                    self._inflight.pop(p.key, None)
                    future.set_result(answer)
            return answer
        except Exception as exc:  # noqa: BLE001 - the responder answers every input; never raises
            return self._internal(exc)

    async def arespond(self, request_der: bytes, client: str | None = None) -> bytes:
        return (await self.aanswer(request_der, client)).der

    def _sign_slots(self) -> asyncio.Semaphore:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_inflight_signs)
        return self._slots

    def _internal(self, exc: BaseException) -> OcspAnswer:
        self.errors += 1
        self.last_error = exc
        # Ours, not the peer's, but a flood of requests must not turn one fault into a flood of lines.
        self._log_once.log(
            log, logging.ERROR, f"internal:{type(exc).__name__}", "OCSP responder: internal error: %r", exc
        )
        return INTERNAL_ERROR

    # -- long-lived ------------------------------------------------------------------------------------------
    async def _started(self) -> None:
        self._install(await asyncio.to_thread(self._prepare))
        self._signer_checked = time.monotonic()

    # Two alarms, each cleared by its own next success (one cause for both would flap between them).
    ALARM_REFRESH = "va.ocsp-refresh"
    ALARM_SIGNER = "va.ocsp-signer"
    ADVICE_REFRESH = (
        "the responder cannot read revocations from the journal, so cached answers may be stale: check the"
        " journal's filesystem and the daemon's log; retried every poll"
    )
    ADVICE_SIGNER = (
        "the delegated OCSP signing certificate could not be checked or renewed (a new key in the HSM, signed"
        " by the CA, stored in the journal): check the HSM and the journal's filesystem before the current"
        " signer expires ([va] signer_renew_days); retried at the next signer check"
    )

    async def _poll(self) -> None:
        """Never raises: a failure raises its warning alarm (logged once, not per poll) and is retried."""
        try:
            await self.arefresh()
        except (BirthlineError, HsmError, sqlite3.Error, ValueError) as exc:
            self._poll_failed(self.ALARM_REFRESH, "refreshing the cache", exc, self.ADVICE_REFRESH)
        else:
            self.alarms.clear(self.ALARM_REFRESH, "refreshed")
            if self.presign_max > 0:
                try:
                    await self.presign()
                except (BirthlineError, HsmError, sqlite3.Error, ValueError) as exc:
                    # Not an outage: every answer can still be signed on demand. Retried next poll.
                    self._log_once.log(log, logging.WARNING, "presign", "OCSP pre-signing failed: %r", exc)
        if time.monotonic() - self._signer_checked >= self.signer_check_s:
            self._signer_checked = time.monotonic()
            try:
                self._install(await asyncio.to_thread(self._prepare))
            except (BirthlineError, HsmError, sqlite3.Error, ValueError) as exc:
                self._poll_failed(self.ALARM_SIGNER, "checking the OCSP signers", exc, self.ADVICE_SIGNER)
            else:
                self.alarms.clear(self.ALARM_SIGNER, "signers valid")

    def _poll_failed(self, cause: str, what: str, exc: BaseException, advice: str) -> None:
        self.errors += 1
        self.last_error = exc
        self.alarms.raise_alarm(cause, f"OCSP responder: {what} failed: {exc}", advice, severity="warning")
