"""The upstream forwarder: every record of the `outbox` journal table goes to the upstream CA over CMP, as an RA
(RFC 9483 5.2), exactly once as far as the upstream can tell (docs/cmp.md "The forwarder").

- What each record carries and how its request is built: appliance/cmp/upstream_requests.py (p10cr, cr and kur
  with POP raVerified, rr); which records are due and how a pass is recorded: appliance/cmp/outbox.py; what an
  answer decides: appliance/cmp/upstream_replies.py; how a message is POSTed: appliance/cmp/upstream_http.py.
- A request is built and protected (the RA key in the HSM, or a MAC) at its first send, stored in
  `request_der` in the same transaction that moves the row to 'sent', and from then on re-sent byte for byte
  with the same transactionID, across retries and restarts.
- Modes: `single` (one POST per request, for CAs such as EJBCA that use only the first inner message of a
  nested one) or `batched` (up to batch_max requests, or what is due after batch_wait_s, in ONE nested
  message with a fresh outer transactionID and nonce, signed by the RA: RFC 9483 5.2.2.2).
- Replies are checked (protection over the bytes received, by a trusted upstream; transactionID; recipNonce;
  the certificate's public key is the request's; status). certConf follows each certificate (unless the
  upstream granted implicitConfirm), pkiConf is checked; "waiting" is answered by pollReq after checkAfter.
- Network errors, HTTP errors, untrusted or malformed replies and systemUnavail: retried with exponential
  backoff and jitter. A refusal of the request is permanent: 'failed' with the reason. A record that cannot be
  built, whose stored bytes do not parse, or that the upstream refuses as a message (malformed, wrong key
  identifier): 'parked' with the reason; the records it shares a batch with go on. duplicateCertReq and an rr
  answered certRevoked are no-ops (done). A refused certConf is retried from the start (the stored request
  again), at most CONF_REFUSALS_MAX times in a row per record and process; then the record is parked with the
  alarm upstream.unconfirmed (_conf_refused).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import logging
import random
import sqlite3
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

from cryptography import x509

from appliance.alarms import Alarms, LogOnce
from appliance.cmp.build import Protector, build_message, build_messages, required_pvno
from appliance.cmp.errors import CmpError, FailInfo
from appliance.cmp.header import check_header, check_response, follow_up_header, request_header
from appliance.cmp.model import (
    BodyType,
    CertConfBody,
    CertStatus,
    ErrorBody,
    NestedBody,
    NestedItem,
    PKIMessage,
    PKIStatusInfo,
    PollReqBody,
)
from appliance.cmp.outbox import (
    DUE_SQL,
    OPEN_STATES,
    Outcome,
    PassResult,
    QueueLoad,
    Row,
    record_outcomes,
)
from appliance.cmp.parse import parse_message
from appliance.cmp.protection import (
    DEFAULT_MAC_POLICY,
    MacPolicy,
    ProtectionKind,
    protection_kind,
    verify_protection,
)
from appliance.cmp.upstream_http import HttpTransport, Transport, UpstreamError
from appliance.cmp.upstream_replies import (
    anchored_chain,
    describe,
    issued_by,
    issuer_chain,
    judge,
    status_text,
    text,
    waiting_cert_req_id,
)
from appliance.cmp.upstream_requests import RequestBuilder, revocation_reasons, upstream_certificates
from appliance.config import UpstreamSection
from appliance.crashpoints import crash_point
from appliance.errors import BirthlineError
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.lifecycle import PollingTask
from appliance.outbox import queue_status

log = logging.getLogger(__name__)


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
        self.builder = RequestBuilder(protector, self.sender, self.recipient, settings.implicit_confirm)
        self.load = QueueLoad(0, None)
        self._lock_file: IO[bytes] | None = None
        self.stats = {"passes": 0, "messages": 0, "done": 0, "retried": 0, "failed": 0, "parked": 0}
        self._conf_refusals: dict[int, int] = {}
        """Row id -> certConfs the upstream refused in a row for it (this process): see _conf_refused."""

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
    ALARM_UNCONFIRMED = "upstream.unconfirmed"
    CONF_REFUSALS_MAX = 3
    """A record whose certConf the upstream refuses this many times in a row is parked (_conf_refused)."""

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
            # Two queries: each is served by its partial index of open rows (together, MIN(created_at) would
            # read every open row from the table: about a second per pass with 100,000 queued).
            conn = self.journal.conn
            (count,) = conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE state IN ('queued', 'sent', 'waiting')"
            ).fetchone()
            (oldest,) = conn.execute(
                "SELECT MIN(created_at) FROM outbox WHERE state IN ('queued', 'sent', 'waiting')"
            ).fetchone()
            return QueueLoad(int(count), oldest)

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
    async def _due(self, limit: int) -> list[Row]:
        now = self.clock()

        def q() -> list[Row]:
            rows = self.journal.conn.execute(DUE_SQL, (now, limit)).fetchall()
            return [Row.from_row(r) for r in rows]

        return await self.journal.acall(q)

    async def run_pass(self, *, force: bool = False) -> PassResult:
        """Send what is due: in batched mode one nested message per batch_max rows, waiting up to batch_wait_s
        for a batch to fill unless `force`. Returns what happened."""
        self.stats["passes"] += 1
        result = PassResult()
        batched = self.settings.mode == "batched"
        size = self.settings.batch_max if batched else 1
        # Batched: enough rows for two rounds of batches_in_flight nested messages, so that the slots stay busy
        # until the last round of the pass.
        in_flight = self.settings.batches_in_flight
        rows = await self._due(size * max(4, 2 * in_flight) if batched else 32)
        if rows and batched and not force and len(rows) < size:
            oldest = min(r.created_at for r in rows)
            if self.clock() - oldest < self.settings.batch_wait_s:
                return result
        chunks = [rows[start : start + size] for start in range(0, len(rows), size)]
        # Batched: up to batches_in_flight nested messages at once (their rows are disjoint), so building and
        # checking one overlaps with the upstream working on another. Single mode sends one request at a time.
        slots = asyncio.Semaphore(in_flight if batched else 1)

        async def one(chunk: list[Row]) -> PassResult:
            async with slots:
                return await self._chunk(chunk)

        for part in await asyncio.gather(*(one(c) for c in chunks)):
            result.merge(part)
            for key in ("done", "retried", "failed", "parked"):
                self.stats[key] += getattr(part, key)
        if rows:
            await self.refresh_load()
        return result

    async def _chunk(self, rows: list[Row]) -> PassResult:
        result = PassResult()
        prepared = await self._materialise(rows)
        outgoing: list[tuple[Row, PKIMessage]] = []
        outcomes: dict[int, Outcome] = {}
        for row, msg_or_outcome in prepared:
            if isinstance(msg_or_outcome, Outcome):
                outcomes[row.id] = msg_or_outcome
            else:
                outgoing.append((row, msg_or_outcome))
        vouched: set[int] = set()
        answers = await self._exchange(outgoing, result, vouched)
        crash_point("after-forward-send")
        confirms: list[tuple[Row, PKIMessage, Outcome]] = []
        for row, request in outgoing:
            outcome = self._judge(row, request, answers.get(row.id), vouched=row.id in vouched)
            if outcome.action == "confirm":
                confirms.append((row, request, outcome))
            else:
                outcomes[row.id] = outcome
        if confirms:
            outcomes.update(await self._confirm(confirms, result))
            crash_point("after-forward-confirm")
        await self._record(rows, outcomes, result)
        crash_point("after-forward-record")
        return result

    # -- building ----------------------------------------------------------------------------------------------
    async def _materialise(self, rows: list[Row]) -> list[tuple[Row, PKIMessage | Outcome]]:
        """The message to send for each row: its stored request (built and stored now at the first send), or a
        pollReq for a waiting row. A row whose request cannot be built, or whose stored bytes no longer parse, is
        parked here with the reason: one such record never holds up the others it would share a batch with."""
        context = await self.journal.acall(self._build_context, rows)
        fresh = [r for r in rows if r.request_der is None]
        built: dict[int, PKIMessage | Outcome] = {}
        if fresh:
            built = await asyncio.to_thread(self.builder.build, fresh, *context)
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
        parsed = await asyncio.to_thread(
            lambda: {r.id: _parsed(r.request_der, "stored request") for r in resend}
        )
        requests: dict[int, PKIMessage | Outcome] = {**built, **parsed}
        out: list[tuple[Row, PKIMessage | Outcome]] = []
        for r in rows:
            b = requests.get(r.id)
            if isinstance(b, Outcome):
                out.append((r, b))
                continue
            if r.state == "waiting" and r.last_response_der is not None:
                waiting = _parsed(r.last_response_der, "stored answer")
                if isinstance(waiting, Outcome):
                    out.append((r, waiting))
                    continue
                # The certReqId the upstream used: 0 for cr and kur, and for p10cr -1 (RFC 9810 5.3.4) or 0
                # (openssl 3.0's mock server, EJBCA): whatever its waiting answer said.
                req_id = waiting_cert_req_id(waiting)
                poll = await asyncio.to_thread(
                    self._follow_up, waiting, BodyType.POLLREQ, PollReqBody((req_id,))
                )
                out.append((r, poll))
            else:
                assert b is not None
                out.append((r, b))
        return out

    def _build_context(self, rows: list[Row]) -> tuple[dict[int, bytes], dict[str, x509.ReasonFlags]]:
        """What building needs from the journal (read on its thread): upstream certificates, rr reasons."""
        return upstream_certificates(self.journal.conn, rows), revocation_reasons(self.journal.conn, rows)

    def _follow_up(self, received: PKIMessage, body_type: BodyType, body: Any) -> PKIMessage:
        header = follow_up_header(received.header, sender=self.sender, pvno=required_pvno(body_type, body))
        return build_message(header, body_type, body, protection=self.protector)

    # -- sending -----------------------------------------------------------------------------------------------
    async def _exchange(
        self, outgoing: list[tuple[Row, PKIMessage]], result: PassResult, vouched: set[int] | None = None
    ) -> dict[int, PKIMessage | Exception]:
        """Send the messages (one POST each, or one nested message) and return each row's answer, or why there is
        none. The nested answer is matched to the rows by transactionID; a second answer for one is ignored.

        `vouched` gets the rows whose inner answer is signed by the very certificate whose signature over the
        nested reply was verified: that signature covers the inner answer's exact bytes, so _check does not
        verify the inner one's again (two verifications per record, about a fifth of the drain's CPU). Any other
        inner answer is verified on its own."""
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
            signer = self._check(reply, outer)
            if not isinstance(reply.body, NestedBody):
                raise CmpError(describe(reply), fail_info=FailInfo.BAD_REQUEST)
        except (UpstreamError, CmpError) as exc:
            return {row.id: exc for row, _ in outgoing}
        by_tid = {msg.header.transaction_id: row for row, msg in outgoing}
        unmatched: list[PKIMessage] = []
        for item in reply.body.items:
            if item.message is None:
                continue
            if item.message.header.transaction_id is None and isinstance(item.message.body, ErrorBody):
                unmatched.append(item.message)  # the upstream could not read an inner message to answer it
                continue
            match = by_tid.get(item.message.header.transaction_id)
            if match is None or match.id in answers:
                log.warning("upstream: ignoring an unexpected or duplicate answer in a nested reply")
                continue
            answers[match.id] = item.message
            if vouched is not None and _signed_by(item.message, signer):
                vouched.add(match.id)
        missing = [row for row, _ in outgoing if row.id not in answers]
        if unmatched and len(unmatched) == len(missing):
            # As many requests without an answer as answers saying "could not read it": those requests are
            # malformed for this upstream, and resending the same bytes would not change that.
            for row, error in zip(missing, unmatched, strict=True):
                assert isinstance(error.body, ErrorBody)
                answers[row.id] = Unreadable("the upstream could not read this request: "
                                             + status_text(error.body.status))  # fmt: skip
        for row, _ in outgoing:
            answers.setdefault(row.id, CmpError("the upstream's nested reply has no answer for this request"))
        return answers

    async def _post(self, der: bytes) -> PKIMessage:
        data = await self.transport.post(der)
        return await asyncio.to_thread(parse_message, data)

    def _check(
        self, reply: PKIMessage, request: PKIMessage, *, vouched: bool = False
    ) -> x509.Certificate | None:
        """The reply is protected by a trusted upstream (over the bytes received) and answers `request`. Returns
        the certificate whose signature was verified (None for a MAC). `vouched`: an inner answer of a nested
        reply whose verified signature covers it, by the same certificate (see _exchange): its own protection is
        not verified again, everything else is checked."""
        if vouched:
            check_response(reply, request.header)
            return reply.extra_certs[0]
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
            if not any(signer == c or issued_by(signer, c) for c in self.server_certs):
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
            return verified.signer
        check_response(reply, request.header)
        return verified.signer

    # -- judging -----------------------------------------------------------------------------------------------
    def _judge(
        self, row: Row, request: PKIMessage, answer: PKIMessage | Exception | None, *, vouched: bool = False
    ) -> Outcome:
        if isinstance(answer, Unreadable):
            return Outcome("park", str(answer)[:300])

        def check(reply: PKIMessage, req: PKIMessage) -> None:
            self._check(reply, req, vouched=vouched)

        return judge(row, request, answer, check=check, ca_certs=self.ca_certs,
                     backoff_base_s=self.settings.backoff_base_s)  # fmt: skip

    async def _confirm(
        self, items: list[tuple[Row, PKIMessage, Outcome]], result: PassResult
    ) -> dict[int, Outcome]:
        """certConf for each certificate received; the certificate is recorded once pkiConf is checked. A failed
        confirmation is retried from the start (the upstream answers the same request with the same certificate)."""

        def build() -> list[tuple[Row, PKIMessage]]:
            specs = []
            for _, _, outcome in items:
                assert outcome.response is not None and outcome.cert is not None
                status = CertStatus.for_certificate(
                    outcome.cert, outcome.cert_req_id, PKIStatusInfo.accepted()
                )
                body = CertConfBody((status,))
                header = follow_up_header(
                    outcome.response.header, sender=self.sender, pvno=required_pvno(BodyType.CERTCONF, body)
                )
                specs.append((header, BodyType.CERTCONF, body))
            # Signed together: one HSM call for the batch's certConfs, as for its requests.
            messages = build_messages(specs, protection=self.protector)
            return [(row, msg) for (row, _, _), msg in zip(items, messages, strict=True)]

        conf = await asyncio.to_thread(build)
        vouched: set[int] = set()
        answers = await self._exchange(conf, result, vouched)
        outcomes: dict[int, Outcome] = {}
        for (row, msg), (_, _, outcome) in zip(conf, items, strict=True):
            answer = answers.get(row.id)
            if isinstance(answer, PKIMessage):
                try:
                    self._check(answer, msg, vouched=row.id in vouched)
                except CmpError as exc:
                    outcomes[row.id] = Outcome("retry", f"pkiConf rejected: {exc}"[:300])
                    continue
                if answer.body_type is BodyType.PKICONF:
                    self._conf_refusals.pop(row.id, None)
                    outcomes[row.id] = Outcome("done", cert=outcome.cert, chain=outcome.chain)
                elif isinstance(answer.body, ErrorBody):
                    outcomes[row.id] = self._conf_refused(row, outcome, status_text(answer.body.status))
                else:
                    outcomes[row.id] = Outcome("retry", f"certConf answered by {answer.body_type.asn1_name}")
            else:
                outcomes[row.id] = Outcome("retry", text(answer) if answer else "no answer to certConf")
        return outcomes

    def _conf_refused(self, row: Row, outcome: Outcome, why: str) -> Outcome:
        """The upstream refused the certConf for the certificate it issued. Retried from the start (the same
        request bytes: the upstream answers them with the same certificate and a new confirmation) up to
        CONF_REFUSALS_MAX times in a row; then the record is parked with the alarm upstream.unconfirmed. An
        upstream that takes every message twice and loses the first answer refuses the copy of a certConf it
        has just accepted, every time: without the limit that record was retried for ever, and every retry
        put the request before the upstream again."""
        n = self._conf_refusals.get(row.id, 0) + 1
        if n < self.CONF_REFUSALS_MAX:
            self._conf_refusals[row.id] = n
            return Outcome("retry", f"certConf refused ({n} of {self.CONF_REFUSALS_MAX}): {why}"[:300])
        self._conf_refusals.pop(row.id, None)
        cert = outcome.cert
        assert cert is not None  # only a certificate is confirmed
        reason = (f"the upstream issued certificate serial {cert.serial_number:x} and refused its certConf {n}"
                  f" times in a row (last: {why[:120]}); it may have accepted an earlier copy")  # fmt: skip
        self.alarms.raise_alarm(
            self.ALARM_UNCONFIRMED,
            f"upstream record {row.id} ({row.kind} {row.cert_serial}) parked: {reason}",
            "check at the upstream CA whether that certificate is confirmed and valid; birthline upstream status"
            " lists the parked records with their reasons. The forwarder does not send them again",
            severity="warning",
            details={"outbox": row.id, "cert_serial": f"{cert.serial_number:x}"},
        )
        return Outcome("park", reason[:300])

    # -- recording ---------------------------------------------------------------------------------------------
    def _backoff(self, attempts: int) -> float:
        s = self.settings
        delay: float = min(s.backoff_cap_s, s.backoff_base_s * 2.0 ** min(attempts - 1, 30))
        return delay * (0.5 + 0.5 * self.jitter())

    async def _record(self, rows: list[Row], outcomes: dict[int, Outcome], result: PassResult) -> None:
        now = self.clock()

        def txn(conn: sqlite3.Connection) -> None:
            record_outcomes(conn, rows, outcomes, result, now=now, backoff=self._backoff, audit=self.audit)

        if outcomes:
            await self.journal.atransaction(txn, "recording upstream results")
        for row_id, o in outcomes.items():
            if o.action in ("done", "fail", "park"):
                self._conf_refusals.pop(row_id, None)  # closed: its count of refused certConfs goes too
            if o.action == "retry":
                log.info("upstream: will retry: %s", o.text)
            elif o.action == "fail":
                log.warning("upstream: permanently failed: %s", o.text)
            elif o.action == "park":
                log.warning("upstream: parked (set aside, not sent again): %s", o.text)

    # -- draining (birthline upstream sync) ---------------------------------------------------------------------
    async def drain(self, *, once: bool = False, timeout_s: float = 600.0) -> bool:
        """Run passes until nothing is open (or one pass with `once`), sleeping until the next row is due, for at
        most `timeout_s`. True when everything open went and nothing failed or was parked in this run."""
        deadline = time.monotonic() + timeout_s
        failed = 0
        while True:
            result = await self.run_pass(force=True)
            failed += result.failed + result.parked
            if once:
                break
            # A pass that took rows refreshed the load as it ended: counting the open rows again would double
            # the journal thread's share of each pass.
            took = result.done + result.retried + result.failed + result.parked + result.waiting
            load = self.load if took else await self.refresh_load()
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


def _signed_by(message: PKIMessage, signer: x509.Certificate | None) -> bool:
    """`message` claims a signature by `signer` itself (its first extraCert is that certificate, as RFC 9483 3.3
    requires of the protection certificate): the only inner answers a verified outer signature vouches for."""
    return (
        signer is not None
        and protection_kind(message.header) is ProtectionKind.SIGNATURE
        and message.protection is not None
        and bool(message.extra_certs)
        and message.extra_certs[0] == signer
    )


def _parsed(der: bytes | None, what: str) -> PKIMessage | Outcome:
    try:
        return parse_message(der or b"")
    except CmpError as exc:
        return Outcome("park", f"the {what} does not parse: {exc}"[:300])


class Unreadable(CmpError):
    """A nested reply said, for this request, that the upstream could not read it."""


__all__ = [
    "DUE_SQL",
    "OPEN_STATES",
    "Forwarder",
    "ForwarderLocked",
    "HttpTransport",
    "PassResult",
    "QueueLoad",
    "Transport",
    "UpstreamError",
    "anchored_chain",
    "issuer_chain",
    "queue_status",
]
