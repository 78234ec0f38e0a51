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
"""

from __future__ import annotations

import asyncio
import datetime as dt
import functools
import hashlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ObjectIdentifier

from appliance import der
from appliance.alarms import Alarms, LogOnce
from appliance.ca import CaRecord
from appliance.errors import BirthlineError
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.lifecycle import PollingTask
from appliance.va.crl import issuing_cas
from appliance.va.ocsp_request import Refusal, parse_request
from appliance.va.presign import ResponseMaker, Unsigned, plain_request
from appliance.va.ratelimit import ClientLimiter, Rate
from appliance.va.revocation import Reason
from appliance.va.signer import OcspSigner, ensure_signer
from appliance.va.status import CertStatus, NeverIssued, live_statuses, lookup_status
from hsm.algorithms import default_hash
from hsm.errors import HsmBusyError, HsmError
from hsm.token import Token
from hsm.worker import Lane, Priority

log = logging.getLogger(__name__)

EXTENDED_REVOKE_OID = ObjectIdentifier("1.3.6.1.5.5.7.48.1.9")  # RFC 6960 4.4.8, value NULL
NON_ISSUED_TIME = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
DEFAULT_RESPONSE_VALIDITY_S = 3600.0
DEFAULT_MAX_REQUEST_BYTES = 4096
SIGN_BATCHES_IN_FLIGHT = 2
# SHA-1 only identifies the issuer in a CertID (openssl sends it by default); it signs nothing.
_CERTID_HASHES: tuple[hashes.HashAlgorithm, ...] = (
    hashes.SHA1(),  # noqa: S303
    hashes.SHA256(),
    hashes.SHA384(),
    hashes.SHA512(),
)


# -- answers -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class OcspAnswer:
    """One OCSPResponse and what HTTP caching needs to know about it."""

    der: bytes
    status: ocsp.OCSPResponseStatus
    produced_at: float | None = None
    next_update: float | None = None
    cacheable: bool = False  # a successful answer without a nonce: HTTP caches may keep it
    cert_status: str | None = None  # good / revoked / unknown

    @functools.cached_property
    def etag(self) -> str:
        return '"' + hashlib.sha256(self.der).hexdigest()[:32] + '"'


def _unsuccessful(status: ocsp.OCSPResponseStatus) -> OcspAnswer:
    return OcspAnswer(
        ocsp.OCSPResponseBuilder.build_unsuccessful(status).public_bytes(serialization.Encoding.DER), status
    )


MALFORMED = _unsuccessful(ocsp.OCSPResponseStatus.MALFORMED_REQUEST)
INTERNAL_ERROR = _unsuccessful(ocsp.OCSPResponseStatus.INTERNAL_ERROR)
TRY_LATER = _unsuccessful(ocsp.OCSPResponseStatus.TRY_LATER)
UNAUTHORIZED = _unsuccessful(ocsp.OCSPResponseStatus.UNAUTHORIZED)
_REFUSALS = {a.status: a for a in (MALFORMED, UNAUTHORIZED)}


# -- the responder -----------------------------------------------------------------------------------------------------
def _key_hash_input(cert: x509.Certificate) -> bytes:
    """The subjectPublicKey BIT STRING value (without the unused-bits octet), as CertID's issuerKeyHash hashes."""
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    outer = der.read_tlv(spki)
    _alg, bits = der.read_children(spki, outer)
    return spki[bits.content + 1 : bits.end]


def _digest(alg: hashes.HashAlgorithm, data: bytes) -> bytes:
    h = hashes.Hash(alg)
    h.update(data)
    return h.finalize()


@dataclass(frozen=True)
class _Parsed:
    ca: str
    algorithm: hashes.HashAlgorithm
    name_hash: bytes
    key_hash: bytes
    serial: int
    nonce: bytes | None

    @property
    def key(self) -> tuple[str, int, str]:
        return (self.ca, self.serial, self.algorithm.name)


@dataclass
class _Entry:
    answer: OcspAnswer
    fresh_until: float
    dead: bool = False  # dropped from the cache (changed, evicted, expired): never served again


@dataclass
class _Signing:
    signer: OcspSigner
    key: Any  # the HSM private key
    hash: hashes.HashAlgorithm | None  # None for Ed25519

    @functools.cached_property
    def maker(self) -> ResponseMaker:
        return ResponseMaker(self.signer.cert, self.hash)


# A request waiting for its status and its answer's signature: what it asked, when, and where the answer (with the
# status it states) goes.
_Waiting = tuple[_Parsed, float, "asyncio.Future[tuple[OcspAnswer, CertStatus]]"]
# ... and once its status is read.
_Looked = tuple[_Parsed, CertStatus, float, "asyncio.Future[tuple[OcspAnswer, CertStatus]]"]


def _never() -> bool:
    return False


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(t), dt.UTC)


class OcspResponder(PollingTask):
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
        self._signing: dict[str, _Signing] = {}
        self._cache: dict[tuple[str, int, str], _Entry] = {}
        # Request bytes -> cache entry: a request seen before (or the plain encoding of a pre-produced answer)
        # is answered from its bytes alone, without parsing (fast()). Entries die with their cache entry.
        self._by_request: dict[bytes, _Entry] = {}
        # (ca, serial) changed since the current presign pass began; kept only during a pass (every issuance is a
        # change: outside a pass the set would grow by one entry per certificate for as long as the daemon runs).
        self._changed: set[tuple[str, int]] = set()
        self._presigning = False
        # Answers waiting for a signature: signed together, one sign_many call per CA and turn (_drain).
        self._to_sign: list[_Waiting] = []
        self._drainer: asyncio.Task[None] | None = None
        # Batches between their sign_many call and their answers: the HSM signs one while the answers of the
        # one before are verified (a thread, the GIL) instead of each waiting for the other.
        self._batches_in_flight = asyncio.Semaphore(SIGN_BATCHES_IN_FLIGHT)
        self._batch_tasks: set[asyncio.Task[None]] = set()
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
    ) -> tuple[dict[tuple[str, bytes, bytes], str], dict[str, _Signing], tuple[int, int] | None]:
        """The blocking half of load(), safe in a worker thread: it only reads the responder's state."""
        issuers: dict[tuple[str, bytes, bytes], str] = {}
        signing: dict[str, _Signing] = {}
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
                signing[ca.name] = _Signing(signer, key, default_hash(key.algorithm))
        marks = None if self._loaded else self.journal.call(self._watermarks)
        return issuers, signing, marks

    def _install(
        self,
        prepared: tuple[dict[tuple[str, bytes, bytes], str], dict[str, _Signing], tuple[int, int] | None],
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
        key_bits = _key_hash_input(cert)
        for alg in _CERTID_HASHES:
            issuers[(alg.name, _digest(alg, name_der), _digest(alg, key_bits))] = ca.name

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
        return _REFUSALS[refusal.status]

    def _parse(self, request_der: bytes, client: str | None = None) -> _Parsed | OcspAnswer:
        req = parse_request(request_der, self.max_request_bytes)
        if isinstance(req, Refusal):
            return self._refuse(req, client)
        alg = req.hash_algorithm
        ca = self._issuers.get((alg.name, req.name_hash, req.key_hash))
        if ca is None:
            return self._refuse(Refusal(ocsp.OCSPResponseStatus.UNAUTHORIZED, "unknown-issuer"), client)
        if ca not in self._signing:
            return TRY_LATER
        return _Parsed(ca, alg, req.name_hash, req.key_hash, req.serial, req.nonce)

    def _hit(self, key: tuple[str, int, str], now: float) -> OcspAnswer | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        if now >= entry.fresh_until:
            self._cache.pop(key, None)
            entry.dead = True
            return None
        self.hits += 1
        return entry.answer

    def _lookup(self, p: _Parsed) -> CertStatus:
        return lookup_status(self.journal.conn, p.ca, p.serial, self.never_issued)

    def _sign(self, p: _Parsed, status: CertStatus, now: float) -> OcspAnswer:
        signing = self._signing[p.ca]
        builder, this_update, next_update = self._builder(signing, p, status, now)
        # The key signs in the validation lane: behind every certificate the HSM has queued (hsm/worker.py).
        response = builder.sign(signing.key, signing.hash)
        self.signed += 1
        return self._answer_of(response.public_bytes(serialization.Encoding.DER), p, status, this_update,
                               next_update)  # fmt: skip

    async def _sign_batched(self, p: _Parsed, now: float) -> tuple[OcspAnswer, CertStatus]:
        """Look up and sign in the next batch: what queued while the batches before were in the HSM, up to a
        batch's share of max_inflight_signs, has its status read in one journal call and goes in one sign_many
        call (which verifies each signature). The answer and the status it states. Raises what the lookup or
        signing raised (HsmBusyError, ...)."""
        future: asyncio.Future[tuple[OcspAnswer, CertStatus]] = asyncio.get_running_loop().create_future()
        self._to_sign.append((p, now, future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain(), name="va-ocsp-sign")
        return await future

    async def _drain(self) -> None:
        while self._to_sign:
            await self._batches_in_flight.acquire()
            # What is queued by now (this task alone takes from the queue), up to an equal share of the signatures
            # allowed in flight, rounded up: a batch that took them all would leave nothing for the next one to
            # sign while it is verified, and the HSM would idle half the time. A request given up meanwhile (its
            # task cancelled) costs neither a lookup nor a signature.
            cap = -(-self.max_inflight_signs // SIGN_BATCHES_IN_FLIGHT)
            queued = [w for w in self._to_sign if not w[2].done()]
            batch, self._to_sign = queued[:cap], queued[cap:]
            if not batch:
                self._batches_in_flight.release()
                break
            task = asyncio.create_task(self._sign_batch(batch), name="va-ocsp-sign-batch")
            self._batch_tasks.add(task)
            task.add_done_callback(self._batch_tasks.discard)

    async def _sign_batch(self, batch: list[_Waiting]) -> None:
        """Sign one batch (one sign_many call per CA) and answer its requests; then free its place in flight."""
        try:
            await self._sign_by_ca(batch)
        finally:
            self._batches_in_flight.release()

    async def _sign_by_ca(self, batch: list[_Waiting]) -> None:
        try:
            # One trip to the journal thread for the whole batch: one per request cost more of the event loop's
            # time (a thread hand-off and a future each way) than the lookup itself.
            statuses = await self.journal.acall(lambda: [self._lookup(p) for p, _, _ in batch])
        except Exception as exc:  # noqa: BLE001 - handed to each waiting request, which answers for it
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        by_ca: dict[str, list[_Looked]] = {}
        for (p, now, future), status in zip(batch, statuses, strict=True):
            by_ca.setdefault(p.ca, []).append((p, status, now, future))
        for ca, items in by_ca.items():
            try:
                signing = self._signing[ca]
                built = [self._unsigned(signing, p, st, now) for p, st, now, _ in items]
                # The key signs in the validation lane: behind every certificate the HSM has queued.
                signatures = await signing.key.asign_many([u.tbs for u, _, _ in built])
                self.signed += len(signatures)
                for (p, st, _, future), (u, this_update, next_update), sig in zip(
                    items, built, signatures, strict=True
                ):
                    if not future.done():
                        answer = self._answer_of(u.response(sig), p, st, this_update, next_update)
                        future.set_result((answer, st))
            except Exception as exc:  # noqa: BLE001 - handed to each waiting request, which answers for it
                for *_, future in items:
                    if not future.done():
                        future.set_exception(exc)

    @staticmethod
    def _answer_of(
        response: bytes, p: _Parsed, status: CertStatus, this_update: int, next_update: int
    ) -> OcspAnswer:
        return OcspAnswer(
            response, ocsp.OCSPResponseStatus.SUCCESSFUL,
            float(this_update), float(next_update), p.nonce is None, status.kind,
        )  # fmt: skip

    def _unsigned(
        self, signing: _Signing, p: _Parsed, status: CertStatus, now: float
    ) -> tuple[Unsigned, int, int]:
        """What _builder's builder would sign, built by hand (presign.py) for sign_many."""
        this_update = int(now)
        next_update = this_update + int(self.validity_s)
        revoked_at, reason = None, None
        if status.kind == "good":
            cert_status = ocsp.OCSPCertStatus.GOOD
        elif status.kind == "unknown":
            cert_status = ocsp.OCSPCertStatus.UNKNOWN
        elif status.non_issued:
            cert_status, revoked_at, reason = (
                ocsp.OCSPCertStatus.REVOKED,
                0,
                x509.ReasonFlags.certificate_hold,
            )
        else:
            why = status.reason or Reason.UNSPECIFIED
            cert_status, revoked_at = ocsp.OCSPCertStatus.REVOKED, int(status.revoked_at or 0.0)
            reason = None if why == Reason.UNSPECIFIED else why.flag
        unsigned = signing.maker.make(
            p.algorithm.name, p.name_hash, p.key_hash, p.serial, cert_status, this_update, next_update,
            revoked_at, reason, extended_revoke=status.non_issued, nonce=p.nonce,
        )  # fmt: skip
        return unsigned, this_update, next_update

    def _builder(
        self, signing: _Signing, p: _Parsed, status: CertStatus, now: float
    ) -> tuple[ocsp.OCSPResponseBuilder, int, int]:
        this_update = int(now)
        next_update = this_update + int(self.validity_s)
        if status.kind == "good":
            cert_status, rev_time, rev_reason = ocsp.OCSPCertStatus.GOOD, None, None
        elif status.kind == "unknown":
            cert_status, rev_time, rev_reason = ocsp.OCSPCertStatus.UNKNOWN, None, None
        elif status.non_issued:
            cert_status, rev_time, rev_reason = (
                ocsp.OCSPCertStatus.REVOKED,
                NON_ISSUED_TIME,
                x509.ReasonFlags.certificate_hold,
            )
        else:
            reason = status.reason or Reason.UNSPECIFIED
            cert_status, rev_time = ocsp.OCSPCertStatus.REVOKED, _utc(status.revoked_at or 0.0)
            rev_reason = None if reason == Reason.UNSPECIFIED else reason.flag
        builder = (
            ocsp.OCSPResponseBuilder()
            .add_response_by_hash(
                p.name_hash,
                p.key_hash,
                p.serial,
                p.algorithm,
                cert_status,
                _utc(this_update),
                _utc(next_update),
                rev_time,
                rev_reason,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, signing.signer.cert)
            .certificates([signing.signer.cert])
        )
        if status.non_issued:
            builder = builder.add_extension(
                x509.UnrecognizedExtension(EXTENDED_REVOKE_OID, b"\x05\x00"), critical=False
            )
        if p.nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(p.nonce), critical=False)
        return builder, this_update, next_update

    def _store(self, p: _Parsed, status: CertStatus, answer: OcspAnswer, generation: int) -> _Entry | None:
        if p.nonce is not None or not status.cacheable or generation != self._generation:
            return None
        return self._put(p.key, answer)

    def _put(self, key: tuple[str, int, str], answer: OcspAnswer) -> _Entry:
        if len(self._cache) >= self.cache_max:
            for old in list(self._cache)[: max(1, self.cache_max // 10)]:
                self._cache.pop(old).dead = True
        assert answer.produced_at is not None
        if (previous := self._cache.get(key)) is not None:
            previous.dead = True
        entry = self._cache[key] = _Entry(answer, answer.produced_at + self.validity_s / 2)
        return entry

    def _index(self, request_der: bytes, entry: _Entry) -> None:
        if len(self._by_request) >= self.cache_max:
            for old in list(self._by_request)[: max(1, self.cache_max // 10)]:
                del self._by_request[old]
        self._by_request[request_der] = entry

    def fast(self, request_der: bytes) -> OcspAnswer | None:
        """The answer for a request whose exact bytes were answered from the cache before, or that asks in the
        plain encoding for a pre-produced answer: one dict lookup, no parsing, no journal, no HSM. None: use
        aanswer. Only answers without a nonce are found here (a nonce makes every request's bytes new)."""
        entry = self._by_request.get(request_der)
        if entry is None:
            return None
        if entry.dead or self.clock() >= entry.fresh_until:
            del self._by_request[request_der]
            return None
        self.hits += 1
        return entry.answer

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

    async def _over_budget(self, p: _Parsed, now: float) -> OcspAnswer:
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

    # -- answers made ahead of time ----------------------------------------------------------------------------
    def _certid_hashes(self, ca: str) -> tuple[bytes, bytes] | None:
        for (alg, name_hash, key_hash), name in self._issuers.items():
            if name == ca and alg == "sha1":
                return name_hash, key_hash
        return None

    async def presign(self) -> int:
        """Answer ahead of time, as large responders do: sign (SHA-1 CertID, no nonce, the form RFC 5019
        clients and openssl send) answers for the `presign_max` newest live certificates of each CA that have
        none in the cache, or whose answer is past a quarter of its validity, in batches of `presign_batch`
        answers per HSM call (validation lane, behind certificates). A warm request then costs a lookup.

        A certificate whose issuance or revocation row changes while its batch is signed (seen by refresh())
        is not stored: its next answer is made from the journal as it is then. Returns answers stored."""
        self._changed.clear()
        self._presigning = True
        try:
            return await self._presign_pass()
        finally:
            self._presigning = False
            self._changed.clear()

    async def _presign_pass(self) -> int:
        stored = 0
        for ca, signing in list(self._signing.items()):
            ids = self._certid_hashes(ca)
            if ids is None:
                continue
            name_hash, key_hash = ids
            rows = await self.journal.acall(live_statuses, self.journal.conn, ca, self.presign_max)
            now = self.clock()
            due = [
                (serial, status) for serial, status in rows
                if (e := self._cache.get((ca, serial, "sha1"))) is None or e.fresh_until - now < self.validity_s / 4
            ]  # fmt: skip
            for start in range(0, len(due), self.presign_batch):
                chunk = due[start : start + self.presign_batch]
                parsed = [_Parsed(ca, _CERTID_HASHES[0], name_hash, key_hash, s, None) for s, _ in chunk]
                built = [
                    self._unsigned(signing, p, st, now) for p, (_, st) in zip(parsed, chunk, strict=True)
                ]
                signatures = await signing.key.asign_many([u.tbs for u, _, _ in built])
                self.signed += len(signatures)
                self.presigned += len(signatures)
                # A long pass must not hold back revocations: the poll's refresh also runs between batches,
                # so what it drops (and the _changed check below) is never more than a batch late.
                await self.arefresh()
                if self._signing.get(ca) is not signing:
                    break  # a new signer took over meanwhile: its answers are made on demand / next pass
                for p, (_, status), (u, this_update, next_update), sig in zip(
                    parsed, chunk, built, signatures, strict=True
                ):
                    if (ca, p.serial) in self._changed:
                        continue
                    answer = self._answer_of(u.response(sig), p, status, this_update, next_update)
                    entry = self._put(p.key, answer)
                    self._index(plain_request("sha1", name_hash, key_hash, p.serial), entry)
                    stored += 1
        return stored

    # -- invalidation ----------------------------------------------------------------------------------------
    def _watermarks(self) -> tuple[int, int]:
        conn = self.journal.conn
        rev = conn.execute("SELECT COALESCE(MAX(change_seq), 0) FROM revocation").fetchone()[0]
        iss = conn.execute("SELECT COALESCE(MAX(id), 0) FROM issuance").fetchone()[0]
        return int(rev), int(iss)

    def _changes(self) -> tuple[int, int, list[tuple[str, str]]]:
        conn = self.journal.conn
        changed: list[tuple[str, str]] = []
        rev, iss = self._seen_revocation, self._seen_issuance
        for seq, ca, serial in conn.execute(
            "SELECT change_seq, ca, cert_serial FROM revocation WHERE change_seq > ? ORDER BY change_seq",
            (rev,),
        ):
            rev = max(rev, int(seq))
            changed.append((str(ca), str(serial)))
        for row_id, ca, serial in conn.execute(
            "SELECT id, ca, cert_serial FROM issuance WHERE id > ? ORDER BY id", (iss,)
        ):
            iss = max(iss, int(row_id))
            changed.append((str(ca), str(serial)))
        return rev, iss, changed

    def _apply(self, changes: tuple[int, int, list[tuple[str, str]]]) -> int:
        rev, iss, changed = changes
        self._seen_revocation, self._seen_issuance = rev, iss
        if changed:
            self._generation += 1
        dropped = 0
        for ca, serial in changed:
            number = int(serial, 16)
            if self._presigning:
                self._changed.add((ca, number))
            for alg in _CERTID_HASHES:
                if (entry := self._cache.pop((ca, number, alg.name), None)) is not None:
                    entry.dead = True
                    dropped += 1
        return dropped

    def refresh(self) -> int:
        """Forget cached answers whose certificate's revocation or issuance row changed; returns how many."""
        return self._apply(self.journal.call(self._changes))

    async def arefresh(self) -> int:
        return self._apply(await self.journal.acall(self._changes))

    def _forget_ca(self, ca: str) -> None:
        self._generation += 1
        for key in [k for k in self._cache if k[0] == ca]:
            self._cache.pop(key).dead = True

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
