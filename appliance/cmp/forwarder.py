"""The upstream forwarder: every record of the `outbox` journal table goes to the upstream CA over CMP, as an RA
(RFC 9483 5.2), exactly once as far as the upstream can tell (docs/cmp.md "The forwarder").

- p10cr rows carry the device's CSR; cr rows its public key and subject (POP raVerified, RFC 9483 5.2.3.2);
  rr rows revoke the UPSTREAM certificate of a revoked device (they wait for its p10cr/cr row to be done).
- A request is built and protected (the RA key in the HSM, or a MAC) at its first send, stored in
  `request_der` in the same transaction that moves the row to 'sent', and from then on re-sent byte for byte
  with the same transactionID, across retries and restarts.
- Modes: `single` (one POST per request, for CAs such as EJBCA that use only the first inner message of a
  nested one) or `batched` (up to batch_max requests, or what is due after batch_wait_s, in ONE nested
  message with a fresh outer transactionID and nonce, protected by the RA: RFC 9483 5.2.2.2).
- Replies are checked (protection over the bytes received, by a trusted upstream; transactionID; recipNonce;
  the certificate's public key is the request's; status). certConf follows each certificate (unless the
  upstream granted implicitConfirm), pkiConf is checked; "waiting" is answered by pollReq after checkAfter.
- Network errors, HTTP errors, untrusted or malformed replies and systemUnavail: retried with exponential
  backoff and jitter. A rejection is permanent: the row is 'failed' with the reason. duplicateCertReq and an
  rr answered certRevoked are no-ops (done).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import hashlib
import json
import logging
import random
import sqlite3
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

import aiohttp
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization

from appliance.alarms import Alarms, LogOnce
from appliance.cmp._names import name_from_der
from appliance.cmp.build import Protector, build_message, make_cert_request, required_pvno
from appliance.cmp.errors import RETRYABLE_FAIL_INFO, CmpError, FailInfo
from appliance.cmp.header import check_header, check_response, follow_up_header, request_header
from appliance.cmp.model import (
    BodyType,
    CertConfBody,
    CertRepBody,
    CertReqBody,
    CertStatus,
    CertTemplate,
    ErrorBody,
    NestedBody,
    NestedItem,
    P10crBody,
    PKIMessage,
    PKIStatus,
    PKIStatusInfo,
    PollRepBody,
    PollReqBody,
    RevDetails,
    RpBody,
    RrBody,
)
from appliance.cmp.parse import parse_message
from appliance.cmp.protection import DEFAULT_MAC_POLICY, MacPolicy, MacProtector, verify_protection
from appliance.config import UpstreamSection
from appliance.errors import BirthlineError, ConfigError, Problem
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.lifecycle import PollingTask
from appliance.outbox import queue_status
from appliance.va.revocation import Reason

if TYPE_CHECKING:
    from appliance.runtime import Core

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/pkixcmp"
OPEN_STATES = ("queued", "sent", "waiting")
_DER = serialization.Encoding.DER
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
_COLUMNS = ("id, kind, issuance_id, cert_serial, transaction_id, csr_der, public_key_der, subject_der, request_der,"
            " state, attempts, last_response_der, created_at, ra_request_id")  # fmt: skip


# Open rows that are due, oldest first; an rr waits for its device's p10cr/cr row. Served by the partial index
# outbox_open_by_id, so the done rows (kept for ever) are never scanned.
DUE_SQL = (
    f"SELECT {_COLUMNS} FROM outbox o WHERE o.state IN ('queued', 'sent', 'waiting')"
    " AND o.next_attempt_at <= ? AND (o.kind != 'rr' OR NOT EXISTS (SELECT 1 FROM outbox p"
    " WHERE p.cert_serial = o.cert_serial AND p.kind != 'rr'"
    " AND p.state IN ('queued', 'sent', 'waiting'))) ORDER BY o.id LIMIT ?"
)


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


@dataclass
class _Row:
    id: int
    kind: str
    issuance_id: int | None
    cert_serial: str
    transaction_id: bytes
    csr_der: bytes | None
    public_key_der: bytes | None
    subject_der: bytes | None
    request_der: bytes | None
    state: str
    attempts: int
    last_response_der: bytes | None
    created_at: float
    ra_request_id: int | None = None  # RA mode: the upstream's certificate IS the device's certificate

    @classmethod
    def from_row(cls, r: Sequence[Any]) -> _Row:
        return cls(*r)


@dataclass
class _Outcome:
    """What one exchange decided for a row."""

    action: str  # done | confirm | wait | retry | fail
    text: str = ""
    cert: x509.Certificate | None = None
    response: PKIMessage | None = None
    check_after: float = 0.0
    cert_req_id: int = 0
    # RA mode: the certificate's issuers, nearest first, up to a CA of [upstream] ca_certs
    chain: tuple[x509.Certificate, ...] = ()


@dataclass
class PassResult:
    done: int = 0
    retried: int = 0
    failed: int = 0
    waiting: int = 0
    sent_messages: int = 0
    errors: list[str] = field(default_factory=list)

    def merge(self, other: PassResult) -> None:
        self.done += other.done
        self.retried += other.retried
        self.failed += other.failed
        self.waiting += other.waiting
        self.sent_messages += other.sent_messages
        self.errors.extend(other.errors)


@dataclass(frozen=True)
class QueueLoad:
    open_rows: int
    oldest_created_at: float | None


class ForwarderLocked(BirthlineError):
    def __init__(self, path: Path) -> None:
        super().__init__(f"another forwarder holds {path} (the daemon, or a running `upstream sync`)")


class Forwarder(PollingTask):
    """See the module docstring. `protector` protects what we send (SignatureProtector with the RA key in the
    HSM, or a MacProtector); `server_certs` are trusted for the upstream's signed replies (the signer is one of
    them or is issued directly by one); `secret` verifies MAC-protected replies."""

    TASK_NAME = "upstream-forwarder"

    def __init__(
        self,
        journal: Journal,
        settings: UpstreamSection,
        protector: Protector,
        *,
        server_certs: Sequence[x509.Certificate] = (),
        secret: bytes | None = None,
        transport: Transport | None = None,
        lock_path: Path | None = None,
        clock: Callable[[], float] = time.time,
        jitter: Callable[[], float] = random.random,
        audit: AuditSink | None = None,
        ca_certs: Sequence[x509.Certificate] = (),
        alarms: Alarms | None = None,
    ) -> None:
        super().__init__(settings.poll_s)
        self.alarms = alarms or Alarms()
        self._tracebacks = LogOnce(300.0)
        self.journal = journal
        self.audit = audit
        self.ca_certs = tuple(ca_certs)
        """RA mode: the upstream CA certificates (root or intermediate) a device's certificate must chain to."""
        self.settings = settings
        self.protector = protector
        self.server_certs = tuple(server_certs)
        self.secret = secret
        self.transport: Transport = transport or HttpTransport(
            settings.url, settings.connect_timeout_s, settings.request_timeout_s
        )
        self.lock_path = lock_path
        self.clock = clock
        self.jitter = jitter
        extra = protector.extra_certs
        if extra:
            self.sender: x509.GeneralName = x509.DirectoryName(extra[0].subject)
        else:
            kid = settings.kid or "birthline"
            self.sender = x509.DirectoryName(x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, kid)]))
        self.recipient = x509.DirectoryName(x509.Name.from_rfc4514_string(settings.recipient))
        self.load = QueueLoad(0, None)
        self._lock_file: IO[bytes] | None = None
        self.stats = {"passes": 0, "messages": 0, "done": 0, "retried": 0, "failed": 0}

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def acquire(self) -> None:
        """One forwarder per journal: the daemon's or `upstream sync`, never both (they would send twice)."""
        if self.lock_path is None or self._lock_file is not None:
            return
        self.lock_path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.lock_path, "ab")  # noqa: SIM115 - held for the forwarder's life
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.close()
            raise ForwarderLocked(self.lock_path) from None
        self._lock_file = f

    def release(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def close(self) -> None:
        if isinstance(self.transport, HttpTransport):
            await self.transport.close()
        self.release()

    async def _started(self) -> None:
        self.acquire()
        await self.refresh_load()

    async def _stopping(self) -> None:
        await self.close()

    ALARM_FORWARDER = "upstream.forwarder"
    ALARM_QUEUE = "upstream.queue"

    async def _poll(self) -> None:
        """Never raises: a failed pass raises the warning alarm upstream.forwarder (logged once, not per pass;
        a defect's traceback once per type and 5 minutes) and the next good pass clears it."""
        try:
            await self.run_pass()
        except BirthlineError as exc:
            self._pass_failed(exc.message)
        except Exception as exc:  # noqa: BLE001 - the forwarder outlives a defect; its traceback is logged
            self._tracebacks.log(
                log, logging.ERROR, type(exc).__name__, "upstream forwarder pass failed: %s",
                "".join(traceback.format_exception(exc)).rstrip(),
            )  # fmt: skip
            self._pass_failed(f"internal error: {type(exc).__name__}")
        else:
            self.alarms.clear(self.ALARM_FORWARDER, "a pass completed")

    def _pass_failed(self, text: str) -> None:
        self.alarms.raise_alarm(
            self.ALARM_FORWARDER, f"upstream forwarder pass failed (retried every {self.poll_s:g} s): {text}",
            "the forwarder reads and updates the outbox in the journal: check the journal's filesystem (free"
            " space, writable) and the log; records stay queued and are sent once a pass succeeds",
            severity="warning",
        )  # fmt: skip

    # -- limits ------------------------------------------------------------------------------------------------
    async def refresh_load(self) -> QueueLoad:
        def q() -> QueueLoad:
            row = self.journal.conn.execute(
                "SELECT COUNT(*), MIN(created_at) FROM outbox WHERE state IN ('queued', 'sent', 'waiting')"
            ).fetchone()
            return QueueLoad(int(row[0]), row[1])

        self.load = await self.journal.acall(q)
        self._alarm()
        return self.load

    def _alarm(self) -> None:
        """The soft limits: a warning alarm while the queue is over them (one log line when it starts, not one
        per pass); the hard limits stop local issuance, which raises issuance.busy (appliance/issuance/faults.py)."""
        s, load = self.settings, self.load
        age = 0.0 if load.oldest_created_at is None else self.clock() - load.oldest_created_at
        if load.open_rows > s.max_queue_size or age > s.max_queue_age_s:
            self.alarms.raise_alarm(
                self.ALARM_QUEUE,
                f"upstream queue over its limit: {load.open_rows} record(s), oldest {age:.0f} s (limits"
                f" {s.max_queue_size}, {s.max_queue_age_s:.0f} s; issuance stops at {s.hard_max_queue_size},"
                f" {s.hard_max_queue_age_s:.0f} s)",
                "the upstream CA has not taken the queued records: check the link and the upstream (birthline"
                " upstream status shows the last error); the queue drains by itself once it answers",
                severity="warning",
                details={"open": load.open_rows, "oldest_s": round(age)},
            )
        else:
            self.alarms.clear(self.ALARM_QUEUE, f"{load.open_rows} record(s) queued")

    def admission(self) -> str | None:
        """For IssueService(admission=...): refuse local issuance past the HARD limits (from the queue load of
        the last pass; the age is computed now)."""
        s, load = self.settings, self.load
        age = 0.0 if load.oldest_created_at is None else self.clock() - load.oldest_created_at
        if load.open_rows >= s.hard_max_queue_size or age >= s.hard_max_queue_age_s:
            return (f"upstream queue over its hard limit ({load.open_rows} record(s), oldest {age:.0f} s;"
                    f" limits {s.hard_max_queue_size}, {s.hard_max_queue_age_s:.0f} s): issuance is stopped"
                    " until the upstream takes them")  # fmt: skip
        return None

    # -- one pass ----------------------------------------------------------------------------------------------
    async def _due(self, limit: int) -> list[_Row]:
        now = self.clock()

        def q() -> list[_Row]:
            rows = self.journal.conn.execute(DUE_SQL, (now, limit)).fetchall()
            return [_Row.from_row(r) for r in rows]

        return await self.journal.acall(q)

    async def run_pass(self, *, force: bool = False) -> PassResult:
        """Send what is due: in batched mode one nested message per batch_max rows, waiting up to batch_wait_s
        for a batch to fill unless `force`. Returns what happened."""
        self.stats["passes"] += 1
        result = PassResult()
        batched = self.settings.mode == "batched"
        size = self.settings.batch_max if batched else 1
        rows = await self._due(size * (4 if batched else 32))
        if rows and batched and not force and len(rows) < size:
            oldest = min(r.created_at for r in rows)
            if self.clock() - oldest < self.settings.batch_wait_s:
                return result
        chunks = [rows[start : start + size] for start in range(0, len(rows), size)]
        # Batched: up to batches_in_flight nested messages at once (their rows are disjoint), so building and
        # checking one overlaps with the upstream working on another. Single mode sends one request at a time.
        slots = asyncio.Semaphore(self.settings.batches_in_flight if batched else 1)

        async def one(chunk: list[_Row]) -> PassResult:
            async with slots:
                return await self._chunk(chunk)

        for part in await asyncio.gather(*(one(c) for c in chunks)):
            result.merge(part)
            for key in ("done", "retried", "failed"):
                self.stats[key] += getattr(part, key)
        if rows:
            await self.refresh_load()
        return result

    async def _chunk(self, rows: list[_Row]) -> PassResult:
        result = PassResult()
        prepared = await self._materialise(rows)
        outgoing: list[tuple[_Row, PKIMessage]] = []
        outcomes: dict[int, _Outcome] = {}
        for row, msg_or_outcome in prepared:
            if isinstance(msg_or_outcome, _Outcome):
                outcomes[row.id] = msg_or_outcome
            else:
                outgoing.append((row, msg_or_outcome))
        answers = await self._exchange(outgoing, result)
        confirms: list[tuple[_Row, PKIMessage, _Outcome]] = []
        for row, request in outgoing:
            outcome = self._judge(row, request, answers.get(row.id))
            if outcome.action == "confirm":
                confirms.append((row, request, outcome))
            else:
                outcomes[row.id] = outcome
        if confirms:
            outcomes.update(await self._confirm(confirms, result))
        await self._record(rows, outcomes, result)
        return result

    # -- building ----------------------------------------------------------------------------------------------
    async def _materialise(self, rows: list[_Row]) -> list[tuple[_Row, PKIMessage | _Outcome]]:
        """The message to send for each row: its stored request (built and stored now at the first send), or a
        pollReq for a waiting row. rr rows whose device has no upstream certificate fail here."""
        upstream = await self._upstream_certs([r.cert_serial for r in rows if r.kind == "rr"])
        fresh = [r for r in rows if r.request_der is None]
        built: dict[int, PKIMessage | _Outcome] = {}
        if fresh:
            built = await asyncio.to_thread(self._build_requests, fresh, upstream)
            stored = [(msg.der, r.id) for r in fresh if isinstance(msg := built[r.id], PKIMessage)]

            def txn(conn: sqlite3.Connection) -> None:
                conn.executemany(
                    "UPDATE outbox SET request_der=?, state='sent' WHERE id=? AND request_der IS NULL", stored
                )

            if stored:
                await self.journal.atransaction(txn, "storing upstream requests")
            for der, row_id in stored:
                for r in fresh:
                    if r.id == row_id:
                        r.request_der, r.state = der, "sent"
        # A request built just now is used as built; one stored earlier (a retry) is parsed from its bytes.
        resend = [r for r in rows if r.id not in built and not (r.state == "waiting" and r.last_response_der)]
        parsed = await asyncio.to_thread(lambda: [parse_message(r.request_der or b"") for r in resend])
        requests: dict[int, PKIMessage | _Outcome] = {
            **built,
            **{r.id: m for r, m in zip(resend, parsed, strict=True)},
        }
        out: list[tuple[_Row, PKIMessage | _Outcome]] = []
        for r in rows:
            b = requests.get(r.id)
            if isinstance(b, _Outcome):
                out.append((r, b))
                continue
            if r.state == "waiting" and r.last_response_der is not None:
                waiting = parse_message(r.last_response_der)
                # The certReqId the upstream used: 0 for cr, and for p10cr -1 (RFC 9810 5.3.4) or 0 (openssl 3.0,
                # EJBCA): whatever its waiting answer said.
                req_id = _waiting_cert_req_id(waiting)
                poll = await asyncio.to_thread(
                    self._follow_up, waiting, BodyType.POLLREQ, PollReqBody((req_id,))
                )
                out.append((r, poll))
            else:
                assert b is not None
                out.append((r, b))
        return out

    async def _upstream_certs(self, serials: list[str]) -> dict[str, bytes]:
        if not serials:
            return {}

        def q() -> dict[str, bytes]:
            found: dict[str, bytes] = {}
            for s in serials:
                row = self.journal.conn.execute(
                    "SELECT upstream_cert_der FROM outbox WHERE cert_serial=? AND kind != 'rr' AND state='done'"
                    " AND upstream_cert_der IS NOT NULL ORDER BY id DESC LIMIT 1", (s,)).fetchone()  # fmt: skip
                if row is not None:
                    found[s] = bytes(row[0])
            return found

        return await self.journal.acall(q)

    def _reason(self, cert_serial: str) -> x509.ReasonFlags:
        row = self.journal.conn.execute(
            "SELECT reason FROM revocation WHERE cert_serial=?", (cert_serial,)
        ).fetchone()
        return Reason(row[0]).flag if row is not None else x509.ReasonFlags.unspecified

    def _build_requests(
        self, rows: list[_Row], upstream: dict[str, bytes]
    ) -> dict[int, PKIMessage | _Outcome]:
        """Runs in a worker thread (HSM signatures); the rr reason is read through the journal thread."""
        out: dict[int, PKIMessage | _Outcome] = {}
        for r in rows:
            header = request_header(sender=self.sender, recipient=self.recipient, transaction_id=r.transaction_id,
                                    implicit_confirm=self.settings.implicit_confirm)  # fmt: skip
            try:
                if r.kind == "p10cr":
                    assert r.csr_der is not None
                    csr = x509.load_der_x509_csr(r.csr_der)
                    msg = build_message(header, BodyType.P10CR, P10crBody(csr), protection=self.protector)
                elif r.kind == "cr":
                    assert r.public_key_der is not None and r.subject_der is not None
                    subject = name_from_der(r.subject_der)
                    template = CertTemplate(subject=subject, public_key_der=r.public_key_der)
                    body = CertReqBody((make_cert_request(template, ra_verified=True),))
                    msg = build_message(header, BodyType.CR, body, protection=self.protector)
                else:
                    der = upstream.get(r.cert_serial)
                    if der is None:
                        out[r.id] = _Outcome(
                            "fail", "no upstream certificate for this device: nothing to revoke"
                        )
                        continue
                    cert = x509.load_der_x509_certificate(der)
                    reason = self.journal.call(self._reason, r.cert_serial)
                    details = RevDetails(cert.issuer, cert.serial_number, reason)
                    rr_header = request_header(sender=self.sender, recipient=self.recipient,
                                               transaction_id=r.transaction_id)  # fmt: skip
                    msg = build_message(rr_header, BodyType.RR, RrBody((details,)), protection=self.protector)
            except (ValueError, AssertionError) as exc:
                out[r.id] = _Outcome("fail", f"cannot build the upstream request: {exc}"[:300])
                continue
            out[r.id] = msg
        return out

    def _follow_up(self, received: PKIMessage, body_type: BodyType, body: Any) -> PKIMessage:
        header = follow_up_header(received.header, sender=self.sender, pvno=required_pvno(body_type, body))
        return build_message(header, body_type, body, protection=self.protector)

    # -- sending -----------------------------------------------------------------------------------------------
    async def _exchange(
        self, outgoing: list[tuple[_Row, PKIMessage]], result: PassResult
    ) -> dict[int, PKIMessage | Exception]:
        """Send the messages (one POST each, or one nested message) and return each row's answer, or why there is
        none. The nested answer is matched to the rows by transactionID; a second answer for one is ignored."""
        answers: dict[int, PKIMessage | Exception] = {}
        if not outgoing:
            return answers
        if self.settings.mode != "batched":
            for row, msg in outgoing:
                result.sent_messages += 1
                self.stats["messages"] += 1
                try:
                    answers[row.id] = await self._post(msg.der)
                except (UpstreamError, CmpError) as exc:
                    answers[row.id] = exc
            return answers
        header = request_header(sender=self.sender, recipient=self.recipient)
        body = NestedBody(tuple(NestedItem(m.der, m) for _, m in outgoing))
        outer = await asyncio.to_thread(
            build_message, header, BodyType.NESTED, body, protection=self.protector
        )
        result.sent_messages += 1
        self.stats["messages"] += 1
        try:
            reply = await self._post(outer.der)
            self._check(reply, outer)
            if not isinstance(reply.body, NestedBody):
                raise CmpError(_describe(reply), fail_info=FailInfo.BAD_REQUEST)
        except (UpstreamError, CmpError) as exc:
            return {row.id: exc for row, _ in outgoing}
        by_tid = {msg.header.transaction_id: row for row, msg in outgoing}
        for item in reply.body.items:
            if item.message is None:
                continue
            match = by_tid.get(item.message.header.transaction_id)
            if match is None or match.id in answers:
                log.warning("upstream: ignoring an unexpected or duplicate answer in a nested reply")
                continue
            answers[match.id] = item.message
        for row, _ in outgoing:
            answers.setdefault(row.id, CmpError("the upstream's nested reply has no answer for this request"))
        return answers

    async def _post(self, der: bytes) -> PKIMessage:
        data = await self.transport.post(der)
        return await asyncio.to_thread(parse_message, data)

    def _check(self, reply: PKIMessage, request: PKIMessage) -> None:
        """The reply is protected by a trusted upstream (over the bytes received) and answers `request`."""
        secret = self.secret
        verified = verify_protection(
            reply,
            secret_for=(lambda _kid: secret) if secret is not None else None,
            allow_signature=bool(self.server_certs),
            policy=MacPolicy(allow_sha1=True) if self.settings.accept_sha1_mac else DEFAULT_MAC_POLICY,
        )
        if verified.signer is not None:
            signer = verified.signer
            now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
            if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
                raise CmpError("the upstream's signer certificate is not valid now",
                               fail_info=FailInfo.SIGNER_NOT_TRUSTED)  # fmt: skip
            if not any(signer == c or _issued_by(signer, c) for c in self.server_certs):
                raise CmpError("the upstream's signer is not trusted", fail_info=FailInfo.SIGNER_NOT_TRUSTED)
        if reply.body_type is BodyType.NESTED and request.body_type is BodyType.NESTED:
            # check_response refuses a nested body (it can also be a request); the same checks for the outer reply
            check_header(reply)
            h = reply.header
            if h.transaction_id != request.header.transaction_id:
                raise CmpError(
                    "transactionID of the nested reply does not match", fail_info=FailInfo.BAD_REQUEST
                )
            if h.recip_nonce != request.header.sender_nonce or h.sender_nonce == request.header.sender_nonce:
                raise CmpError(
                    "nonces of the nested reply do not match", fail_info=FailInfo.BAD_RECIPIENT_NONCE
                )
            return
        check_response(reply, request.header)

    # -- judging -----------------------------------------------------------------------------------------------
    def _judge(self, row: _Row, request: PKIMessage, answer: PKIMessage | Exception | None) -> _Outcome:
        if answer is None:
            return _Outcome("retry", "no answer")
        if isinstance(answer, Exception):
            return _Outcome("retry", _text(answer))
        try:
            self._check(answer, request)
        except CmpError as exc:
            return _Outcome("retry", f"reply rejected: {exc}"[:300])
        body = answer.body
        if isinstance(body, ErrorBody):
            return _status(body.status, "upstream error")
        if isinstance(body, PollRepBody):
            after = body.entries[0].check_after if body.entries else self.settings.backoff_base_s
            return _Outcome("wait", "upstream: waiting", response=answer, check_after=float(after))
        if isinstance(body, RpBody) and row.kind == "rr":
            if not body.statuses:
                return _Outcome("retry", "reply rejected: rp without status")
            status = body.statuses[0]
            if status.status in (PKIStatus.ACCEPTED, PKIStatus.GRANTED_WITH_MODS):
                return _Outcome("done")
            if FailInfo.CERT_REVOKED in status.fail_info:
                return _Outcome("done", "already revoked upstream")
            return _status(status, "upstream refused the revocation")
        if (
            isinstance(body, CertRepBody)
            and row.kind != "rr"
            and answer.body_type in (BodyType.IP, BodyType.CP)
        ):
            if len(body.responses) != 1:
                return _Outcome("retry", "reply rejected: not exactly one CertResponse")
            (rsp,) = body.responses
            if row.kind == "cr" and rsp.cert_req_id != 0:
                return _Outcome("retry", f"reply rejected: certReqId {rsp.cert_req_id} was not requested")
            if rsp.status.status is PKIStatus.WAITING:
                return _Outcome("wait", "upstream: waiting", response=answer,
                                check_after=self.settings.backoff_base_s)  # fmt: skip
            if rsp.status.status not in (PKIStatus.ACCEPTED, PKIStatus.GRANTED_WITH_MODS):
                return _status(rsp.status, "upstream refused the request")
            if rsp.certificate is None:
                return _Outcome("retry", "reply rejected: accepted without a certificate")
            # after polling, `request` is our pollReq: the key and implicitConfirm are those of the stored request
            original = request
            if request.body_type is BodyType.POLLREQ and row.request_der is not None:
                original = parse_message(row.request_der)
            if rsp.certificate.public_key().public_bytes(*_SPKI) != _requested_key(original):
                return _Outcome("retry", "reply rejected: the certificate's key is not the requested key")
            # RA mode hands the certificate and its chain to a device as its birth certificate: it must chain to a
            # CA the administrator configured. A reply cannot choose the anchor. (A local-mode record only keeps
            # the upstream's certificate.)
            chain: tuple[x509.Certificate, ...] = ()
            if row.ra_request_id is not None:
                if not self.ca_certs:
                    return _Outcome("retry", "RA mode needs [upstream] ca_certs: the upstream CA certificates the"
                                    " devices' certificates must chain to")  # fmt: skip
                anchored = anchored_chain(
                    rsp.certificate, (*answer.extra_certs, *body.ca_pubs), self.ca_certs
                )
                if anchored is None:
                    return _Outcome("retry", "reply rejected: the certificate does not chain to a CA in"
                                    " [upstream] ca_certs")  # fmt: skip
                chain = anchored
            if answer.header.implicit_confirm and original.header.implicit_confirm:
                return _Outcome("done", cert=rsp.certificate, chain=chain)
            return _Outcome("confirm", cert=rsp.certificate, response=answer, cert_req_id=rsp.cert_req_id,
                            chain=chain)  # fmt: skip
        return _Outcome("retry", f"reply rejected: unexpected {answer.body_type.asn1_name}")

    async def _confirm(
        self, items: list[tuple[_Row, PKIMessage, _Outcome]], result: PassResult
    ) -> dict[int, _Outcome]:
        """certConf for each certificate received; the certificate is recorded once pkiConf is checked. A failed
        confirmation is retried from the start (the upstream answers the same request with the same certificate)."""

        def build() -> list[tuple[_Row, PKIMessage]]:
            out = []
            for row, _, outcome in items:
                assert outcome.response is not None and outcome.cert is not None
                status = CertStatus.for_certificate(
                    outcome.cert, outcome.cert_req_id, PKIStatusInfo.accepted()
                )
                out.append(
                    (row, self._follow_up(outcome.response, BodyType.CERTCONF, CertConfBody((status,))))
                )
            return out

        conf = await asyncio.to_thread(build)
        answers = await self._exchange(conf, result)
        outcomes: dict[int, _Outcome] = {}
        for (row, msg), (_, _, outcome) in zip(conf, items, strict=True):
            answer = answers.get(row.id)
            if isinstance(answer, PKIMessage):
                try:
                    self._check(answer, msg)
                except CmpError as exc:
                    outcomes[row.id] = _Outcome("retry", f"pkiConf rejected: {exc}"[:300])
                    continue
                if answer.body_type is BodyType.PKICONF:
                    outcomes[row.id] = _Outcome("done", cert=outcome.cert, chain=outcome.chain)
                elif isinstance(answer.body, ErrorBody):
                    outcomes[row.id] = _Outcome(
                        "retry", "certConf refused: " + _status_text(answer.body.status)
                    )
                else:
                    outcomes[row.id] = _Outcome("retry", f"certConf answered by {answer.body_type.asn1_name}")
            else:
                outcomes[row.id] = _Outcome("retry", _text(answer) if answer else "no answer to certConf")
        return outcomes

    # -- recording ---------------------------------------------------------------------------------------------
    def _backoff(self, attempts: int) -> float:
        s = self.settings
        delay: float = min(s.backoff_cap_s, s.backoff_base_s * 2.0 ** min(attempts - 1, 30))
        return delay * (0.5 + 0.5 * self.jitter())

    async def _record(self, rows: list[_Row], outcomes: dict[int, _Outcome], result: PassResult) -> None:
        now = self.clock()
        by_id = {r.id: r for r in rows}

        upstream_issued: list[dict[str, object]] = []
        upstream_refused: list[dict[str, object]] = []

        def txn(conn: sqlite3.Connection) -> None:
            last_ok = last_err = None
            upstream_issued.clear()
            upstream_refused.clear()
            for row_id, decided in outcomes.items():
                r = by_id[row_id]
                o = decided
                if o.action == "done" and r.ra_request_id is not None and o.cert is None:
                    # RA mode needs the certificate itself: a "duplicate, no-op" answer leaves the device without.
                    o = _Outcome("fail", o.text or "the upstream answered without a certificate")
                if o.action == "done":
                    der = o.cert.public_bytes(_DER) if o.cert is not None else None
                    conn.execute(
                        "UPDATE outbox SET state='done', done_at=?, upstream_cert_der=COALESCE(?, upstream_cert_der),"
                        " last_error=?, last_response_der=NULL, attempts=attempts+1 WHERE id=?",
                        (now, der, o.text or None, row_id),
                    )
                    if r.kind == "rr":
                        conn.execute("UPDATE revocation SET forwarded_at=? WHERE cert_serial=? AND forwarded_at IS NULL",
                                     (now, r.cert_serial))  # fmt: skip
                    if r.ra_request_id is not None and o.cert is not None and der is not None:
                        serial = f"{o.cert.serial_number:x}"
                        chain = b"".join(c.public_bytes(_DER) for c in o.chain)
                        cur = conn.execute(
                            "UPDATE ra_request SET state='issued', cert_der=?, chain_der=?, cert_serial=?, issued_at=?"
                            " WHERE id=? AND state='pending'",
                            (der, chain, serial, now, r.ra_request_id),
                        )
                        if cur.rowcount:
                            upstream_issued.append({"ra_request": r.ra_request_id, "cert_serial": serial,
                                                    "issuer": o.cert.issuer.rfc4514_string(),
                                                    "cert_sha256": hashlib.sha256(der).hexdigest()})  # fmt: skip
                    result.done += 1
                    last_ok = now
                elif o.action == "wait":
                    assert o.response is not None
                    conn.execute(
                        "UPDATE outbox SET state='waiting', next_attempt_at=?, last_response_der=?, last_error=?"
                        " WHERE id=?",
                        (now + max(o.check_after, 0.0), o.response.der, o.text, row_id),
                    )
                    result.waiting += 1
                elif o.action == "fail":
                    conn.execute(
                        "UPDATE outbox SET state='failed', done_at=?, last_error=?, attempts=attempts+1 WHERE id=?",
                        (now, o.text, row_id),
                    )
                    if r.ra_request_id is not None:
                        conn.execute("UPDATE ra_request SET state='failed', failure=? WHERE id=? AND state='pending'",
                                     (o.text, r.ra_request_id))  # fmt: skip
                        upstream_refused.append({"ra_request": r.ra_request_id, "reason": o.text})
                    result.failed += 1
                    last_err = (now, f"outbox {row_id} ({r.kind} {r.cert_serial}) failed: {o.text}")
                else:
                    attempts = r.attempts + 1
                    # a row that was waiting goes back to re-sending its request
                    conn.execute(
                        "UPDATE outbox SET state=CASE WHEN request_der IS NULL THEN 'queued' ELSE 'sent' END,"
                        " attempts=?, next_attempt_at=?, last_error=?, last_response_der=NULL WHERE id=?",
                        (attempts, now + self._backoff(attempts), o.text, row_id),
                    )
                    result.retried += 1
                    result.errors.append(o.text)
                    last_err = (now, f"outbox {row_id} ({r.kind} {r.cert_serial}): {o.text}")
            if last_ok is not None:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('upstream_last_success', ?)",
                             (repr(last_ok),))  # fmt: skip
            if last_err is not None:
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('upstream_last_error', ?)",
                             (json.dumps({"at": last_err[0], "error": last_err[1]}),))  # fmt: skip
            # RA mode: the device's certificate (or its final refusal) is an issuance event like any other.
            if self.audit is not None and upstream_issued:
                self.audit.append(conn, "appliance", "issuance.upstream-issued", {"items": upstream_issued})
            if self.audit is not None and upstream_refused:
                self.audit.append(conn, "appliance", "issuance.upstream-refused", {"items": upstream_refused})

        if outcomes:
            await self.journal.atransaction(txn, "recording upstream results")
        for o in outcomes.values():
            if o.action == "retry":
                log.info("upstream: will retry: %s", o.text)
            elif o.action == "fail":
                log.warning("upstream: permanently failed: %s", o.text)

    # -- draining (birthline upstream sync) ---------------------------------------------------------------------
    async def drain(self, *, once: bool = False, timeout_s: float = 600.0) -> bool:
        """Run passes until nothing is open (or one pass with `once`), sleeping until the next row is due, for at
        most `timeout_s`. True when everything open went and nothing failed in this run."""
        deadline = time.monotonic() + timeout_s
        failed = 0
        while True:
            result = await self.run_pass(force=True)
            failed += result.failed
            if once:
                break
            load = await self.refresh_load()
            if load.open_rows == 0:
                break
            nxt = await self.journal.acall(lambda: self.journal.conn.execute(
                "SELECT MIN(next_attempt_at) FROM outbox WHERE state IN ('queued', 'sent', 'waiting')").fetchone()[0])  # fmt: skip
            wait = max(0.0, float(nxt or 0) - self.clock())
            if time.monotonic() + wait > deadline:
                break
            if wait > 0:
                await asyncio.sleep(wait)
        load = await self.refresh_load()
        return load.open_rows == 0 and failed == 0


def issuer_chain(cert: x509.Certificate, pool: Sequence[x509.Certificate]) -> tuple[x509.Certificate, ...]:
    """The issuers of `cert` found in `pool` (the reply's extraCerts and caPubs, the configured upstream
    certificates), nearest first, each link's signature verified; it stops at a self-signed CA or a gap."""
    chain: list[x509.Certificate] = []
    current = cert
    while len(chain) < 8:
        if current.issuer == current.subject and _issued_by(current, current):
            break
        parent = next((c for c in pool if c.subject == current.issuer and c not in chain
                       and _issued_by(current, c)), None)  # fmt: skip
        if parent is None:
            break
        chain.append(parent)
        current = parent
    return tuple(chain)


def anchored_chain(
    cert: x509.Certificate, pool: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> tuple[x509.Certificate, ...] | None:
    """The issuers of `cert` up to and including the first of `anchors` they reach (from `pool` and the anchors
    themselves, each link verified), or None if they reach none."""
    chain = issuer_chain(cert, (*anchors, *pool))
    for i, ca in enumerate(chain):
        if ca in anchors:
            return chain[: i + 1]
    return None


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def _waiting_cert_req_id(waiting: PKIMessage) -> int:
    body = waiting.body
    if isinstance(body, CertRepBody) and body.responses:
        return body.responses[0].cert_req_id
    if isinstance(body, PollRepBody) and body.entries:
        return body.entries[0].cert_req_id
    return 0


def _requested_key(request: PKIMessage) -> bytes | None:
    body = request.body
    if isinstance(body, P10crBody):
        return body.csr.public_key().public_bytes(*_SPKI)
    if isinstance(body, CertReqBody) and body.requests:
        return body.requests[0].template.public_key_der
    return None


def _status_text(status: PKIStatusInfo) -> str:
    bits = ",".join(sorted(b.name for b in status.fail_info))
    return f"{'; '.join(status.status_string) or status.status.name}" + (f" [{bits}]" if bits else "")


def _status(status: PKIStatusInfo, what: str) -> _Outcome:
    text = f"{what}: {_status_text(status)}"[:300]
    if status.fail_info & RETRYABLE_FAIL_INFO:
        return _Outcome("retry", text)
    if FailInfo.DUPLICATE_CERT_REQ in status.fail_info:
        return _Outcome("done", f"duplicate (no-op): {text}")
    return _Outcome("fail", text)


def _describe(msg: PKIMessage) -> str:
    if isinstance(msg.body, ErrorBody):
        return "upstream error: " + _status_text(msg.body.status)
    return f"expected a nested reply, got {msg.body_type.asn1_name}"


def _text(exc: BaseException) -> str:
    return (exc.message if isinstance(exc, BirthlineError) else str(exc))[:300]


# -- composition helpers (daemon and CLI) ---------------------------------------------------------------------------
def load_server_certs(settings: UpstreamSection) -> tuple[x509.Certificate, ...]:
    return _load_pem(settings.server_cert, "upstream.server_cert")


def load_ca_certs(settings: UpstreamSection) -> tuple[x509.Certificate, ...]:
    return _load_pem(settings.ca_certs, "upstream.ca_certs")


def _load_pem(path: Path | None, where: str) -> tuple[x509.Certificate, ...]:
    if path is None:
        return ()
    try:
        return tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigError([Problem(where, f"cannot load {path}: {exc}")]) from None


def mac_protector(settings: UpstreamSection) -> tuple[MacProtector, bytes]:
    from appliance.cmp.server import read_secret_file

    assert settings.secret_file is not None
    secret = read_secret_file(settings.secret_file)
    return MacProtector(secret, settings.kid.encode()), secret


def make_forwarder(core: Core) -> Forwarder:
    """The forwarder as the daemon and `upstream sync` build it (RA key in the HSM, or the MAC secret)."""
    from appliance import stations_registry as reg
    from appliance.cmp.ra import ensure_ra

    cfg = core.config.upstream
    if not cfg.enabled:
        raise ConfigError([Problem("upstream.url", "is not set: there is no upstream to forward to")])
    secret: bytes | None = None
    protector: Protector
    if cfg.protection == "mac":
        protector, secret = mac_protector(cfg)
    else:
        management = reg.ensure_management_ca(core.journal, core.token, core.config.stations.management_ca,
                                              audit=core.audit, actor="appliance")  # fmt: skip
        ra_cert = core.config.cmp.ra_cert or core.config.stations.tls_dir / "cmp-ra.pem"
        protector = ensure_ra(core.token, management, ra_cert)
    return Forwarder(core.journal, cfg, protector, server_certs=load_server_certs(cfg), secret=secret,
                     lock_path=core.config.appliance.state_dir / "upstream.lock", audit=core.audit,
                     ca_certs=load_ca_certs(cfg), alarms=core.alarms)  # fmt: skip


__all__ = [
    "Forwarder",
    "ForwarderLocked",
    "HttpTransport",
    "PassResult",
    "QueueLoad",
    "Transport",
    "UpstreamError",
    "load_ca_certs",
    "load_server_certs",
    "mac_protector",
    "make_forwarder",
    "queue_status",
]
