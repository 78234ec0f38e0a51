"""The protocol side of the CMP server: bytes of a request in, bytes of the answer out (docs/cmp.md "The server",
docs/cmp-conformance.md).

For each message, in this order (RFC 9483 3.5):
1. parse (appliance/cmp/parse.py; bytes that are no PKIMessage get HTTP 400 and an unprotected error);
2. protection: the MAC with the label's secret, or the signature by the first certificate of extraCerts, whose
   key senderKID must name; then who the signer is and whether the label trusts them, revocation included
   (appliance/cmp/trust.py);
3. the header (appliance/cmp/header.py) and the transaction: a certConf or pollReq continues an open
   transaction, protected as its request was, with fresh nonces; any other body opens one;
4. the body: ir / cr / p10cr / kur (appliance/cmp/enrol.py), rr (appliance/cmp/revoke.py), genm, nested.
A failure in 1-3 (or a body this server does not serve) is answered with an error message; a request refused in
4 with the response of its type carrying status rejection. Answers are protected like the request: MAC with the
label's secret, or a signature by the RA key in the HSM.

Before any of it, a network peer's request is admitted against its budget and the shared one
(appliance/admission.py: `admit`); the unit it took is given back once step 2 has authenticated it. At most
`checks_in_flight` protection checks run at once. Refusals are the peers' doing: they are counted (`stats`,
`refusals`) and logged once per label, body type and failInfo and minute, never once per request.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import logging
import time
import traceback
from collections.abc import Callable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.admission import Admission, Ticket
from appliance.alarms import LogOnce
from appliance.cmp import _der, oids
from appliance.cmp._names import NULL_DN
from appliance.cmp.build import Protector, build_message
from appliance.cmp.crls import CrlCache
from appliance.cmp.enrol import Enroller
from appliance.cmp.errors import CmpError, FailInfo
from appliance.cmp.header import TransactionState, check_header, check_request, new_nonce, response_header
from appliance.cmp.labels import CmpLabel, CmpSettings
from appliance.cmp.model import (
    PVNO_CMP2000,
    BodyType,
    CertConfBody,
    CertReqBody,
    ErrorBody,
    GenBody,
    InfoTypeAndValue,
    Limits,
    NestedBody,
    NestedItem,
    P10crBody,
    PkiConfBody,
    PKIHeader,
    PKIMessage,
    PKIStatusInfo,
    PollReqBody,
    RrBody,
)
from appliance.cmp.parse import parse_message
from appliance.cmp.protection import (
    MacPolicy,
    MacProtector,
    ProtectionKind,
    SignatureProtector,
    VerifiedProtection,
    protection_kind,
    verify_protection,
)
from appliance.cmp.revoke import Revoker
from appliance.cmp.transactions import Answer, Auth, Credential, Transaction, error_answer
from appliance.cmp.trust import SignerKind, SignerTrust, purpose_of
from appliance.errors import BirthlineError, ConfigError, Problem
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.issuance.service import IssueService

log = logging.getLogger(__name__)

_DER = serialization.Encoding.DER


class CmpResponder:
    """See the module docstring. `service` issues for [issuance] issuing_ca (the labels' default); `services`
    adds the issuance services of other issuing CAs that labels name (issuing_ca), by CA name."""

    def __init__(
        self,
        service: IssueService,
        journal: Journal,
        audit: AuditSink,
        labels: Mapping[str, CmpLabel],
        *,
        management_ca: x509.Certificate | None = None,
        ra: SignatureProtector | None = None,
        settings: CmpSettings | None = None,
        on_revoked: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
        services: Mapping[str, IssueService] | None = None,
        crls: CrlCache | None = None,
    ) -> None:
        self.service = service
        self.services = {service.ca.name: service, **(services or {})}
        missing = sorted({lb.issuing_ca for lb in labels.values() if lb.issuing_ca} - set(self.services))
        if missing:
            raise ConfigError([Problem("cmp.labels", f"issuing CA {name!r} of a label has no issuance service")
                               for name in missing])  # fmt: skip
        self.journal = journal
        self.audit = audit
        self.labels = dict(labels)
        self.management_ca = management_ca
        self.ra = ra
        self.settings = settings or CmpSettings()
        self.clock = clock
        self.limits = Limits(max_message_size=self.settings.max_message_bytes)
        self.pending: dict[bytes, Transaction] = {}
        # The open transaction a repeated request replaced, until that request is answered (_respond merges it).
        self._replaced: dict[bytes, Transaction] = {}
        # Confirmed transactions (transactionID -> the certConf's SHA-256, its label, until when), kept for
        # confirm_wait_s: a retransmission of that very certConf (both copies reached us, the client heard only
        # the second answer) is answered pkiConf again instead of "no transaction awaits a certConf", which
        # would make the client start its transaction over, and meet the same retransmission again, for ever.
        self._confirmed: dict[bytes, tuple[bytes, str, float]] = {}
        self.chain = tuple(x509.load_der_x509_certificate(c) for c in service.chain)
        issuing = {name: svc.ca.certificate for name, svc in self.services.items()}
        own_chain = [x509.load_der_x509_certificate(c) for svc in self.services.values() for c in svc.chain]
        s = self.settings
        self.trust = SignerTrust(
            journal, issuing, management_ca=management_ca, own_chain=own_chain, clock=clock, default_ca=service.ca.name,
            crls=crls or CrlCache(timeout_s=s.crl_timeout_s, max_bytes=s.crl_max_bytes, retry_s=s.crl_retry_s,
                                  refresh_s=s.crl_refresh_s, clock=clock),
        )  # fmt: skip
        self.enroller = Enroller(self.services, service.ca.name, self.trust, self.settings, clock=clock,
                                 on_revoked=on_revoked)  # fmt: skip
        self.revoker = Revoker(journal, audit, issuing, on_revoked=on_revoked, clock=clock)
        self.mac_policy = MacPolicy(max_iterations=self.settings.max_mac_iterations)
        self.admission = Admission(self.settings.admission)
        self._counts = {"requests": 0, "errors": 0, "repeated_confirmations": 0}
        self.refusals: dict[tuple[str, str, str], int] = {}
        """Error answers by (label, body type, failInfo): a peer's refusals are counted, not logged one by one."""
        self._defects = LogOnce(300.0)
        self._refused_log = LogOnce(60.0)

    @property
    def stats(self) -> dict[str, int]:
        return {**self._counts, **self.enroller.stats, **self.revoker.stats,
                **{f"admission_{k}": v for k, v in self.admission.stats.items()}}  # fmt: skip

    def snapshot(self) -> dict[str, object]:
        """The counters for the status document (docs/control-api.md): requests, error answers, what admission
        did, and the error answers by label, body type and failInfo."""
        return {
            "requests": self._counts["requests"], "errors": self._counts["errors"],
            "admission": self.admission.stats,
            "refused": [{"label": label, "body": body, "fail_info": fail, "count": n}
                        for (label, body, fail), n in sorted(self.refusals.items())],
        }  # fmt: skip

    async def admit(self, remote: str | None, *, holding: Callable[[bool], None] | None = None) -> Ticket:
        """Admit a network peer's request before anything is read or done for it (appliance/admission.py);
        raises Busy (answer HTTP 503 with Retry-After) when the peer, or all peers together, are over budget.
        Hand the ticket to `handle`: it is given back when the request authenticates. `holding(True/False)` is
        called around the time the request is held."""
        return await self.admission.admit(remote, holding=holding)

    # -- entry point ---------------------------------------------------------------------------------------------
    async def handle(
        self, label_name: str, data: bytes, *, ticket: Ticket | None = None
    ) -> tuple[int, bytes]:
        """(HTTP status, PKIMessage DER) for one request body addressed to `label_name` (which must exist).
        `ticket`: what `admit` took for a network peer's request (None: an in-process caller, not budgeted)."""
        label = self.labels[label_name]
        self._counts["requests"] += 1
        try:
            msg = await asyncio.to_thread(parse_message, data, limits=self.limits)
        except CmpError as exc:
            self._counts["errors"] += 1
            return 400, self._unparsed_error(exc).der
        answer = await self._respond(label, msg, outer=True, ticket=ticket)
        return 200, answer.der

    def _unparsed_error(self, exc: CmpError) -> PKIMessage:
        header = PKIHeader(sender=self._sender(None), recipient=NULL_DN, message_time=self._now(),
                           sender_nonce=new_nonce())  # fmt: skip
        return build_message(header, BodyType.ERROR, ErrorBody(PKIStatusInfo.from_error(exc)))

    # -- one message -----------------------------------------------------------------------------------------------
    async def _respond(
        self,
        label: CmpLabel,
        msg: PKIMessage,
        *,
        outer: bool,
        checked: Auth | BirthlineError | None = None,
        ticket: Ticket | None = None,
    ) -> PKIMessage:
        """`checked`: the protection already verified by the caller (the inner messages of a nested message are
        verified together, in one thread hop), or why it failed. `ticket`: given back once the message has
        authenticated."""
        # Until the message's protection verified, the peer has shown no secret: an answer is never MAC-protected
        # with the label's (that would name its senderKID and hand out material for offline guessing), but
        # signed by the RA key, or unprotected without one - the same way whatever senderKID the message named.
        protector: Protector | None = self.ra
        pending: Transaction | None = None
        try:
            self._purge()
            if isinstance(checked, BirthlineError):
                raise checked
            auth = checked or await self._authenticate(label, msg, await self._station_row(label), ticket)
            protector = self._protector_for(label, msg)
            if msg.body_type is BodyType.NESTED:
                # A nested message is no transaction of its own: with added protection (RFC 9483 5.2.2.1) it
                # carries the transactionID and nonces of the one message it wraps.
                check_header(msg)
                result = await self._nested(label, msg, auth, outer=outer)
                if isinstance(result, PKIMessage):
                    return result
                answer = result
            elif (repeated := self._repeated_conf(label, msg)) is not None:
                answer = repeated
            else:
                pending = self._transaction(label, msg, auth)
                answer = await self._dispatch(label, msg, auth, pending)
                if pending is not None and answer.body_type is BodyType.PKICONF:
                    self._remember_conf(label, msg)
                if (
                    pending is not None
                ):  # answered: the transaction ends, or the answer opens it again (below)
                    self.pending.pop(msg.header.transaction_id or b"", None)
        except (BirthlineError, ValueError) as exc:
            answer = error_answer(exc)
        except Exception as exc:  # noqa: BLE001 - answered (systemFailure) and logged below; never escapes
            # A defect some input hits: a client could send that input in a loop, so its traceback is logged
            # once per exception type and 5 minutes, not once per request.
            self._defects.log(
                log, logging.ERROR, type(exc).__name__, "CMP request on label %s failed: %s", label.name,
                "".join(traceback.format_exception(exc)).rstrip(),
            )  # fmt: skip
            answer = error_answer(exc)
        if answer.body_type is BodyType.ERROR:
            self._refused(label, msg, answer)
        tid = msg.header.transaction_id or b""
        replaced = self._replaced.pop(tid, None)
        try:
            out = await asyncio.to_thread(self._build, msg, answer, protector)
        finally:
            if pending is not None:
                pending.busy = False
        nonce = out.header.sender_nonce
        if pending is not None and self.pending.get(tid) is pending and nonce is not None:
            # A follow-up that passed the transaction's checks (its protection, nonces) and was refused: the
            # transaction stays open for the client's corrected one, which may echo this error's senderNonce.
            pending.nonces |= {nonce, msg.header.sender_nonce or b""}
            pending.answered.add(nonce)
        if answer.pending is not None and nonce is not None:
            answer.pending.state = TransactionState(tid, nonce)
            answer.pending.answered = {nonce}
            answer.pending.nonces |= {nonce, msg.header.sender_nonce or b""}
            if replaced is not None and replaced.cert_serial == answer.pending.cert_serial:
                # The same request came twice (a retransmission on the way: both reached us, and the client
                # may have heard either answer). Both answers carry the same stored certificate, so a certConf
                # may echo either's senderNonce; otherwise the client would retry its transaction for ever.
                answer.pending.answered |= replaced.answered
                answer.pending.nonces |= replaced.nonces
            self.pending[tid] = answer.pending
        return out

    def _refused(self, label: CmpLabel, msg: PKIMessage, answer: Answer) -> None:
        """Count an error answer; log it once per label, body type and failInfo and minute (a peer can send the
        same refused message in a loop: each one a line would let it fill the log)."""
        self._counts["errors"] += 1
        status = answer.body.status if isinstance(answer.body, ErrorBody) else None
        fail = ",".join(sorted(f.name for f in status.fail_info)) if status is not None else ""
        key = (label.name, msg.body_type.asn1_name, fail or "none")
        self.refusals[key] = self.refusals.get(key, 0) + 1
        text = "; ".join(status.status_string)[:300] if status is not None else ""
        self._refused_log.log(log, logging.INFO, ":".join(key), "CMP %s on label %s refused (%s): %s",
                              key[1], key[0], key[2], text)  # fmt: skip

    def _remember_conf(self, label: CmpLabel, msg: PKIMessage) -> None:
        tid = msg.header.transaction_id or b""
        self._confirmed.pop(tid, None)  # re-inserted last: the dict stays in expiry order for _purge
        self._confirmed[tid] = (
            hashlib.sha256(msg.der).digest(),
            label.name,
            self.clock() + self.settings.confirm_wait_s,
        )
        if len(self._confirmed) > self.settings.max_pending:
            del self._confirmed[next(iter(self._confirmed))]

    def _repeated_conf(self, label: CmpLabel, msg: PKIMessage) -> Answer | None:
        """pkiConf for a byte-identical copy of a certConf this label's transaction was confirmed with (its
        protection verified again above): RFC 9810 5.3.18 leaves a repeated certConf unspecified; answering it
        as the first one was changes nothing and lets the client finish. Any other certConf of a closed
        transaction is refused as before."""
        if msg.body_type is not BodyType.CERTCONF:
            return None
        done = self._confirmed.get(msg.header.transaction_id or b"")
        if done is None or done[1] != label.name or done[0] != hashlib.sha256(msg.der).digest():
            return None
        self._counts["repeated_confirmations"] += 1
        return Answer(BodyType.PKICONF, PkiConfBody())

    def _transaction(self, label: CmpLabel, msg: PKIMessage, auth: Auth) -> Transaction | None:
        """The open transaction a certConf / pollReq continues (checked: the same label, protected as its request
        was, fresh nonces); None for a message that opens one (checked: its transactionID is not in use)."""
        tid = msg.header.transaction_id or b""
        pending = self.pending.get(tid)
        if msg.body_type in (BodyType.CERTCONF, BodyType.POLLREQ):
            if pending is None or pending.label != label.name:
                raise CmpError(f"no transaction of this label awaits a {msg.body_type.asn1_name}")
            if (msg.body_type is BodyType.POLLREQ) != (pending.certificate is None):
                raise CmpError(f"this transaction does not await a {msg.body_type.asn1_name}")
            recip = msg.header.recip_nonce
            check_request(msg, TransactionState(tid, recip) if recip in pending.answered else pending.state)
            if auth.credential != pending.credential:
                # RFC 9483 3.2 / 4.1.1: the messages of one transaction are protected alike; a certConf signed
                # with the certificate it confirms, or by MAC after a signed request, proves nothing.
                raise CmpError(f"{msg.body_type.asn1_name} must be protected as the request was"
                               f" ({pending.credential.describe()})", fail_info=FailInfo.BAD_MESSAGE_CHECK)  # fmt: skip
            if msg.header.sender_nonce in pending.nonces:
                raise CmpError("senderNonce was used before in this transaction",
                               fail_info=FailInfo.BAD_SENDER_NONCE)  # fmt: skip
            if pending.busy:
                raise CmpError(f"another message of this transaction is being answered; send the"
                               f" {msg.body_type.asn1_name} again after its answer")  # fmt: skip
            pending.busy = True  # until answered (_respond); the answer ends the transaction or keeps it open
            return pending
        check_request(msg, None)
        if pending is not None:
            if pending.request_sha256 != hashlib.sha256(msg.der).digest():
                raise CmpError("transactionID is in use", fail_info=FailInfo.TRANSACTION_ID_IN_USE)
            # The same request again (a forwarder's retry after a lost answer): answer it again; the core
            # answers a retry of the same device and key with the stored certificate.
            self._replaced[tid] = self.pending.pop(tid)
        return None

    def _build(self, msg: PKIMessage, answer: Answer, protector: Protector | None) -> PKIMessage:
        header = response_header(
            msg.header, sender=self._sender(protector), implicit_confirm=answer.implicit, now=self._now()
        )
        if msg.header.transaction_id is None:
            header = dataclasses.replace(header, transaction_id=None, pvno=PVNO_CMP2000)
        return build_message(
            header, answer.body_type, answer.body, protection=protector, extra_certs=answer.extra_certs
        )

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    def _sender(self, protector: Protector | None) -> x509.GeneralName:
        if isinstance(protector, SignatureProtector):
            return x509.DirectoryName(protector.certificate.subject)
        return x509.DirectoryName(self.chain[0].subject)

    def _protector_for(self, label: CmpLabel, msg: PKIMessage) -> Protector | None:
        """Protect the answer to a message whose protection verified as the request was: MAC with the label's
        secret, else a signature by the RA."""
        try:
            kind = protection_kind(msg.header)
        except CmpError:
            kind = ProtectionKind.NONE
        mac_kind = ProtectionKind.PBMAC1 if kind is ProtectionKind.PBMAC1 else ProtectionKind.PBM
        if label.secret and (kind in (ProtectionKind.PBM, ProtectionKind.PBMAC1) or self.ra is None):
            return MacProtector(label.secret, label.sender_kid, kind=mac_kind)
        return self.ra

    def _purge(self) -> None:
        now = self.clock()
        while self._confirmed and next(iter(self._confirmed.values()))[2] <= now:
            del self._confirmed[next(iter(self._confirmed))]
        for tid in [t for t, p in self.pending.items() if p.expires <= now]:
            expired = self.pending.pop(tid)
            log.info("CMP transaction on label %s expired without certConf: certificate %s stays unconfirmed",
                     expired.label, expired.cert_serial)  # fmt: skip

    # -- authentication ------------------------------------------------------------------------------------------
    def _verify(self, label: CmpLabel, msg: PKIMessage) -> VerifiedProtection:
        secret = label.secret

        def secret_for(kid: bytes) -> bytes | None:
            return secret if kid == label.sender_kid else None

        # Signatures are always verified: a certificate of this appliance may sign a kur or rr for itself on any
        # label; whether another signer is trusted here is the label's (trust.py).
        return verify_protection(
            msg, secret_for=secret_for if secret else None, allow_signature=True, policy=self.mac_policy
        )

    async def _authenticate(
        self, label: CmpLabel, msg: PKIMessage, station_fp: bytes | None, ticket: Ticket | None = None
    ) -> Auth:
        async with self.admission.slots():
            verified = await asyncio.to_thread(self._verify, label, msg)
        auth = await self._trust(label, msg, verified, station_fp)
        self.admission.authenticated(ticket)
        return auth

    async def _trust(
        self, label: CmpLabel, msg: PKIMessage, verified: VerifiedProtection, station_fp: bytes | None
    ) -> Auth:
        signer = None
        if verified.signer is not None:
            purpose, revoked_ok = purpose_of(msg, verified.signer)
            signer = await self.trust.authenticate(label, verified.signer, msg.extra_certs, station_fp, purpose,
                                                   what=msg.body_type.asn1_name, revoked_ok=revoked_ok)  # fmt: skip
        return Auth(verified, Credential.of(msg, verified), signer)

    async def _station_row(self, label: CmpLabel) -> bytes | None:
        """The label's station is registered and enabled (read now: a disabled station stops at once); returns
        its TLS certificate fingerprint."""

        def q() -> tuple[int, bytes | None] | None:
            row = self.journal.conn.execute(
                "SELECT enabled, tls_fingerprint FROM stations WHERE name=?", (label.station,)
            ).fetchone()
            return None if row is None else (int(row[0]), row[1])

        row = await self.journal.acall(q)
        if row is None or not row[0]:
            raise CmpError(f"the station of label {label.name!r} is not registered or is disabled",
                           fail_info=FailInfo.NOT_AUTHORIZED)  # fmt: skip
        return row[1]

    # -- the bodies ---------------------------------------------------------------------------------------------------
    async def _dispatch(
        self, label: CmpLabel, msg: PKIMessage, auth: Auth, pending: Transaction | None
    ) -> Answer:
        body = msg.body
        if isinstance(body, CertReqBody) and msg.body_type in (BodyType.IR, BodyType.CR, BodyType.KUR):
            return await self.enroller.certify(label, msg, body, auth, len(self.pending))
        if isinstance(body, P10crBody):
            return await self.enroller.certify(label, msg, body, auth, len(self.pending))
        if isinstance(body, CertConfBody) and pending is not None:
            return await self.enroller.cert_conf(body, pending)
        if isinstance(body, PollReqBody) and pending is not None:
            return await self.enroller.poll(body, pending, self.service.upstream_retry_s)
        if isinstance(body, GenBody) and msg.body_type is BodyType.GENM:
            return self._general(label, body)
        if isinstance(body, RrBody):
            return await self.revoker.revoke(label, body, auth)
        raise CmpError(f"{msg.body_type.asn1_name} is not served here", fail_info=FailInfo.BAD_REQUEST)

    def _general(self, label: CmpLabel, body: GenBody) -> Answer:
        """genm: id-it-caCerts is answered with the label's issuing CA chain; other info types are not served."""
        if body.ca_certs() is None:
            names = ", ".join(i.oid for i in body.items) or "none"
            raise CmpError(f"general message info type(s) {names} are not served; id-it-caCerts is",
                           fail_info=FailInfo.BAD_REQUEST)  # fmt: skip
        chain = self.enroller.chain(self.enroller.label_ca(label))
        value = _der.sequence(*(c.public_bytes(_DER) for c in chain))
        return Answer(BodyType.GENP, GenBody((InfoTypeAndValue(oids.IT_CA_CERTS, value),)))

    async def _nested(
        self, label: CmpLabel, msg: PKIMessage, auth: Auth, *, outer: bool
    ) -> Answer | PKIMessage:
        """RFC 9483 5.2.2: a nested message comes from a PKI management entity and is signed by it; the outer
        protection authenticates the RA, it does not approve the inner requests: each is verified and authorised
        on its own, against the same label. One inner message with the outer transactionID is protection added
        to one request (5.2.2.1), answered with that request's own answer; several are a batch (5.2.2.2),
        answered with a nested message of their answers."""
        if not outer or not isinstance(msg.body, NestedBody):
            raise CmpError("nested message inside a nested message", fail_info=FailInfo.BAD_REQUEST)
        signer = auth.signer
        if signer is None:
            raise CmpError("a nested message must be signature-protected (RFC 9483 5.2.2)",
                           fail_info=FailInfo.BAD_MESSAGE_CHECK)  # fmt: skip
        if signer.kind not in (SignerKind.RA, SignerKind.STATION):
            raise CmpError("a nested message must be signed by a PKI management entity this label trusts",
                           fail_info=FailInfo.NOT_AUTHORIZED)  # fmt: skip
        if not label.allow_nested:
            raise CmpError(
                f"label {label.name!r} accepts no nested messages", fail_info=FailInfo.NOT_AUTHORIZED
            )
        body = msg.body
        items = body.items
        outer_h = msg.header
        if len(items) == 1 and items[0].message is not None:
            inner = items[0].message
            if inner.header.transaction_id == outer_h.transaction_id:
                # 5.2.2.1: the wrapping RA copies the transactionID and the nonces of the message it protects.
                if outer_h.sender_nonce != inner.header.sender_nonce:
                    raise CmpError("a nested message adding protection to one message carries that message's"
                                   " senderNonce (RFC 9483 5.2.2.1)", fail_info=FailInfo.BAD_SENDER_NONCE)  # fmt: skip
                if outer_h.recip_nonce != inner.header.recip_nonce:
                    raise CmpError("a nested message adding protection to one message carries that message's"
                                   " recipNonce (RFC 9483 5.2.2.1)", fail_info=FailInfo.BAD_RECIPIENT_NONCE)  # fmt: skip
                return await self._respond(label, inner, outer=False)
        # 5.2.2.2: a batch is an exchange of its own: a fresh transactionID and senderNonce, and (its first
        # message) no recipNonce.
        inner_headers = [i.message.header for i in items if i.message is not None]
        if outer_h.recip_nonce is not None:
            raise CmpError("a batch (nested message of its own transactionID) must not carry recipNonce"
                           " (RFC 9483 5.2.2.2, 3.1)", fail_info=FailInfo.BAD_RECIPIENT_NONCE)  # fmt: skip
        if any(h.transaction_id == outer_h.transaction_id for h in inner_headers):
            raise CmpError("a batch's transactionID must be fresh, not one of its inner messages' (RFC 9483"
                           " 5.2.2.2); one inner message with the same transactionID is added protection"
                           " (5.2.2.1)", fail_info=FailInfo.BAD_REQUEST)  # fmt: skip
        if any(h.sender_nonce == outer_h.sender_nonce for h in inner_headers):
            raise CmpError("a batch's senderNonce must be fresh, not one of its inner messages' (RFC 9483"
                           " 5.2.2.2)", fail_info=FailInfo.BAD_SENDER_NONCE)  # fmt: skip
        return await self._batch(label, body)

    async def _batch(self, label: CmpLabel, body: NestedBody) -> Answer:
        fingerprint = await self._station_row(label)
        answers: list[PKIMessage | None] = [None] * len(body.items)
        first: dict[bytes | None, tuple[int, PKIMessage]] = {}
        later: list[tuple[int, PKIMessage]] = []
        for i, item in enumerate(body.items):
            if item.message is None:
                error = item.error or CmpError(
                    "inner message could not be parsed", fail_info=FailInfo.BAD_DATA_FORMAT
                )
                answers[i] = self._unparsed_error(error)
            elif first.setdefault(item.message.header.transaction_id, (i, item.message))[0] != i:
                later.append((i, item.message))
        # The inner requests go to the core together, so a batch from a downstream RA shares the core's group
        # commit (one intent and one store transaction, one HSM batch) instead of one commit per request. A
        # transactionID seen twice is answered afterwards, as the transaction's next message would be.
        together = list(first.values())

        def verify_all() -> list[VerifiedProtection | BirthlineError | ValueError]:
            out: list[VerifiedProtection | BirthlineError | ValueError] = []
            for _, msg in together:
                try:
                    out.append(self._verify(label, msg))
                except (BirthlineError, ValueError) as exc:
                    out.append(exc)
            return out

        async def trusted(
            msg: PKIMessage, v: VerifiedProtection | BirthlineError | ValueError
        ) -> Auth | BirthlineError:
            if isinstance(v, ValueError):  # a library's text stays here: the peer is told what failed
                return CmpError("protection does not verify", fail_info=FailInfo.BAD_MESSAGE_CHECK)
            if isinstance(v, BirthlineError):
                return v
            try:
                return await self._trust(label, msg, v, fingerprint)
            except BirthlineError as exc:
                return exc

        # Verified together (one thread hop), so the requests then reach the core together.
        async with self.admission.slots():
            verified = await asyncio.to_thread(verify_all)
        checks = await asyncio.gather(*(trusted(m, v) for (_, m), v in zip(together, verified, strict=True)))
        results = await asyncio.gather(
            *(
                self._respond(label, m, outer=False, checked=c)
                for (_, m), c in zip(together, checks, strict=True)
            )
        )
        for (i, _), answer in zip(together, results, strict=True):
            answers[i] = answer
        for i, inner in later:
            answers[i] = await self._respond(label, inner, outer=False)
        done = [a for a in answers if a is not None]
        return Answer(BodyType.NESTED, NestedBody(tuple(NestedItem(m.der, m) for m in done)))
