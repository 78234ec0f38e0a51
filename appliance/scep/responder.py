"""What the SCEP server answers (RFC 8894 3.3, 3.5, 4), behind the HTTP side in appliance/scep/server.py.

Every certificate request goes to the one issuance core as an IssueRequest from the label's station, so the
work-order policy, the journal and the audit log apply as to any station (docs/architecture.md "Front ends, one
core"):
- PKCSReq: authenticated by a challenge password in the CSR (appliance/scep/challenges.py), signed with the
  CSR's own key (the proof of possession); the device serial is the challenge's device, or, for a work-order
  challenge, the one the CSR's subject names;
- RenewalReq: signed by the certificate being renewed, which must be this appliance's, current and not
  revoked; the new certificate replaces it in the journal (IssueRequest.replaces) with a new key;
- CertPoll: asks again about a request of this label and transactionID, signed with the same key (RA mode: the
  upstream CA issues, and the answer is PENDING until it has).
SCEP has no confirmation message: a certificate answered SUCCESS counts as delivered (confirmed) when it is
answered, as a CMP certificate with implicitConfirm does. A client that lost the answer sends the same request
again and gets the same certificate.

Answers: SUCCESS with the issued certificate in an envelope for the signer's key (with the request's own content
cipher; the chain is GetCACert's), FAILURE with failInfo and failInfoText, PENDING; a request that cannot be addressed (no
transactionID or senderNonce to answer to) is HTTP 400; a refusal the client should retry (the HSM, the journal,
a paused station) is HTTP 503 with Retry-After. Nothing a peer sends escapes as an exception.

Unauthenticated peers (docs/scep.md "Unauthenticated peers"): a PKIOperation from the network is admitted against
its peer's budget and the shared one (appliance/admission.py, [scep]'s keys) before anything is done for it: its
signature verified (with a key appliance/signerkeys.py accepts), its envelope decrypted with the RA key in the
HSM, its FAILURE answer signed there. The unit it took is given back once it has authenticated: a PKCSReq's
challenge password claimed, a renewal's signer found to be a current certificate of this appliance, a CertPoll
found signed by the key that made the request. At most `checks_in_flight` signature verifications and HSM
decryptions run at once. Refusals are counted (`stats`), audited within a budget per label and failInfo
(issuance/refusals.py) and logged once per label, failInfo and minute, never once per request. GetCACaps and
GetCACert are served from memory and are not budgeted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import os
import sqlite3
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import AttributeOID, NameOID

from appliance.admission import Admission, AdmissionLimits, Ticket
from appliance.alarms import LogOnce
from appliance.der import read_children, read_tlv, split_certificates
from appliance.errors import BirthlineError, IssuanceFailed, IssuancePending, IssuanceRefused, ReasonCode
from appliance.issuance.items import IssueResult
from appliance.issuance.policy import AuditSink, IssueRequest
from appliance.issuance.refusals import RefusalLimiter
from appliance.issuance.service import IssueService
from appliance.scep import challenges, cms
from appliance.scep.algorithms import AES256, SHA256, Cipher
from appliance.scep.errors import RETRY_LATER, FailInfo, ScepError, fail_info_for
from appliance.scep.labels import ScepLabel
from appliance.scep.oids import MessageType, PkiStatus
from appliance.scep.ra import ScepRa
from hsm.errors import CiphertextError, HsmError

log = logging.getLogger(__name__)

_DER = serialization.Encoding.DER
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
PKI_MESSAGE = "application/x-pki-message"
TEXT_MAX = 300


def _clean(text: str) -> str:
    """Text for failInfoText, a 503 body or the audit log: printable ASCII, bounded (a peer's bytes may be in it)."""
    return "".join(ch if " " <= ch <= "~" else "?" for ch in text)[:TEXT_MAX]


def _undecryptable() -> ScepError:
    """The one answer to a pkcsPKIEnvelope that does not decrypt, or whose content is not the message's (a PKCS #10
    request, an IssuerAndSubject): which of the two a peer cannot tell (RFC 3218 2.3.2; docs/scep.md)."""
    return ScepError(
        "the pkcsPKIEnvelope does not decrypt with the RA key to this message's content (GetCACert gives the RA"
        " certificate)",
        FailInfo.BAD_MESSAGE_CHECK,
    )


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str = PKI_MESSAGE
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class _Request:
    """One pkiMessage being answered: what the answer needs from it."""

    label: ScepLabel
    message: cms.SignedMessage
    cipher: Cipher = AES256
    ticket: Ticket | None = None  # what admission took for it (None: an in-process caller, not budgeted)


class ScepResponder:
    """Answers GetCACaps, GetCACert and PKIOperation for the labels, through `service`."""

    def __init__(
        self,
        service: IssueService,
        audit: AuditSink,
        labels: Mapping[str, ScepLabel],
        ra: ScepRa,
        *,
        default_label: str = "",
        max_message_bytes: int = 64 * 1024,
        retry_after_s: int = 5,
        clock: Callable[[], float] = time.time,
        on_revoked: Callable[[], None] | None = None,
        refusal_burst: int = 60,
        refusal_window_s: float = 60.0,
        admission: AdmissionLimits | None = None,
    ) -> None:
        self.service = service
        self.journal = service.journal
        self.audit = audit
        self.labels = dict(labels)
        self.ra = ra
        self.default_label = default_label
        self.max_message_bytes = max_message_bytes
        self.retry_after_s = retry_after_s
        self.clock = clock
        self.on_revoked = on_revoked
        # GetCACert: the RA certificate and its chain (the management CA). Not the issuing CA's chain as well: a
        # client picks "the CA" as the certificate no other in the answer issued, and with two roots (management
        # and the issuing CA's) certmonger picked either, then verified the RA's signature against the wrong one.
        self.ca_certs = (ra.certificate, *ra.chain)
        self._ca_certs_der = cms.certs_only(self.ca_certs)
        self._refusals = RefusalLimiter(refusal_burst, refusal_window_s)
        self._defects = LogOnce(interval_s=300.0)
        self._refused_log = LogOnce(interval_s=60.0)
        self.admission = Admission(admission, section="scep")
        self.stats = {"issued": 0, "pending": 0, "refused": 0, "retry_later": 0, "malformed": 0}

    async def admit(self, remote: str | None, *, holding: Callable[[bool], None] | None = None) -> Ticket:
        """Admit a network peer's PKIOperation before anything is done for it (appliance/admission.py); raises
        Busy (answer HTTP 503 with Retry-After) when the peer, or all peers together, are over budget. Hand the
        ticket to `operate`: it is given back when the request authenticates."""
        return await self.admission.admit(remote, holding=holding)

    # -- GET operations -------------------------------------------------------------------------------------------
    def capabilities(self, label: str) -> bytes:
        found = self.labels[label]
        return ("\n".join(found.policy.capabilities(renewal=found.renewal)) + "\n").encode()

    def ca_certificates(self) -> bytes:
        return self._ca_certs_der

    # -- PKIOperation -----------------------------------------------------------------------------------------------
    async def operate(self, label: str, data: bytes, *, ticket: Ticket | None = None) -> Answer:
        """Answer one pkiMessage on `label`. Never raises for what a peer sends. `ticket`: what `admit` took for
        a network peer's request (None: an in-process caller, not budgeted)."""
        found = self.labels[label]
        request: _Request | None = None
        try:
            async with self.admission.slots():
                message = await asyncio.to_thread(cms.read_signed, data, found.policy)
            request = _Request(found, message, ticket=ticket)
            if message.sender_nonce is None:
                raise ScepError("the request carries no senderNonce")
            kind = message.message_type
            if kind in (MessageType.PKCS_REQ, MessageType.RENEWAL_REQ):
                return await self._success(request, await self._enrol(request))
            if kind == MessageType.CERT_POLL:
                return await self._success(request, await self._poll(request))
            if kind in (MessageType.GET_CERT, MessageType.GET_CRL):
                raise ScepError(f"{MessageType(kind).name} is not offered here", FailInfo.BAD_REQUEST)
            raise ScepError(f"messageType {kind} is not a request this server answers", FailInfo.BAD_REQUEST)
        except IssuancePending:
            assert request is not None
            self.stats["pending"] += 1
            return await self._reply(request, PkiStatus.PENDING)
        except ScepError as exc:
            return await self._refused(found, request, exc)
        except (IssuanceRefused, IssuanceFailed) as exc:
            if exc.code in RETRY_LATER:
                self.stats["retry_later"] += 1
                text = _clean(
                    f"{exc.code.name} ({int(exc.code)}): {exc.message}; send the same request again"
                )
                return Answer(503, (text + "\n").encode(), "text/plain",
                              {"Retry-After": str(self.retry_after_s)})  # fmt: skip
            if request is None:
                return await self._refused(found, None, ScepError(exc.message, fail_info_for(exc), exc.code))
            self.stats["refused"] += 1
            return await self._reply(request, PkiStatus.FAILURE, fail_info_for(exc), exc)
        except Exception as exc:  # noqa: BLE001 - a defect answers this request, never the next one
            self._defects.log(log, logging.ERROR, type(exc).__name__, "SCEP request on label %s failed: %s",
                              label, "".join(traceback.format_exception(exc)).rstrip())  # fmt: skip
            error = ScepError("internal error", FailInfo.BAD_REQUEST, ReasonCode.INTERNAL)
            return await self._refused(found, request, error)

    async def _refused(self, label: ScepLabel, request: _Request | None, exc: ScepError) -> Answer:
        """A refusal of this layer: FAILURE when the request can be answered, else HTTP 400. Audited per label
        within a budget (issuance/refusals.py) and logged once per label, failInfo and minute; the core audits
        its own refusals."""
        code = exc.fail_info.asn1_name
        self._refused_log.log(log, logging.INFO, f"{label.name}:{code}", "SCEP request on label %s refused (%s):"
                              " %s", label.name, code, _clean(exc.message))  # fmt: skip
        await self._audit_refusal(label, request, exc)
        if request is None and exc.transaction_id is not None and exc.sender_nonce is not None:
            return await self._failure_to(
                label, exc
            )  # it was read, but failed a check: answered all the same
        if request is None:
            self.stats["malformed"] += 1
            return Answer(400, (_clean(exc.message) + "\n").encode(), "text/plain")
        self.stats["refused"] += 1
        return await self._reply(request, PkiStatus.FAILURE, exc.fail_info, exc)

    async def _audit_refusal(self, label: ScepLabel, request: _Request | None, exc: ScepError) -> None:
        now = self.clock()
        code = exc.fail_info.asn1_name
        entries: list[tuple[str, str, dict[str, Any]]] = []
        if self._refusals.admit(label.name, code, now):
            tid = request.message.transaction_id if request is not None else exc.transaction_id
            entries.append((label.name, "scep.refused", {"label": label.name, "fail_info": code,
                            "code": exc.code.name, "reason": _clean(exc.message), "transaction_id": tid}))  # fmt: skip
        # A summary is of its own label's window, whichever label's refusal closed it.
        entries += [
            (str(s["label"]), "scep.refusals-suppressed", s) for s in self._refusals.due(now, key="label")
        ]
        if not entries:
            return

        def txn(conn: sqlite3.Connection) -> None:
            for name, event, data in entries:
                self.audit.append(conn, f"scep:{name}", event, data)

        try:
            await self.journal.atransaction(txn, "auditing a SCEP refusal")
        except BirthlineError as exc2:
            log.warning("SCEP refusal not audited: %s", exc2.message)

    async def flush_refusals(self) -> None:
        """At shutdown: the summaries of the windows still open."""
        summaries = self._refusals.due(self.clock(), all_windows=True, key="label")
        if summaries:

            def txn(conn: sqlite3.Connection) -> None:
                for summary in summaries:
                    self.audit.append(conn, f"scep:{summary['label']}", "scep.refusals-suppressed", summary)

            await self.journal.atransaction(txn, "auditing SCEP refusals")

    # -- requests ----------------------------------------------------------------------------------------------------
    def _request_id(self, label: ScepLabel, transaction_id: str) -> str:
        return f"scep:{label.name}:{hashlib.sha256(transaction_id.encode()).hexdigest()[:32]}"

    async def _open(self, request: _Request) -> bytes:
        """The request's pkcsPKIEnvelope, decrypted with the RA key in the HSM. A content key that does not
        decrypt is replaced by a random one (RFC 3218 2.3.2): a bad key-transport padding and a wrong content key
        then fail alike, at the content, so no answer tells a peer which it was (no padding oracle)."""
        message = request.message
        if not isinstance(message.signer.public_key(), rsa.RSAPublicKey):
            raise ScepError(
                "the answer is encrypted to the signer's key, which must be RSA", FailInfo.BAD_ALG
            )
        if message.content is None:
            raise ScepError("the request carries no pkcsPKIEnvelope")
        envelope = cms.read_envelope(message.content, self.ra.certificate, request.label.policy)
        request.cipher = envelope.cipher
        try:
            async with self.admission.slots():
                key = await self.ra.key.adecrypt(envelope.encrypted_key, padding.PKCS1v15())
        except CiphertextError:
            key = b""
        except HsmError as exc:
            raise IssuanceFailed(f"HSM: {exc.message}", ReasonCode.HSM_UNAVAILABLE) from None
        if len(key) != envelope.cipher.key_size:
            key = os.urandom(envelope.cipher.key_size)
        try:
            return cms.decrypt_content(envelope, key)
        except ValueError:
            raise _undecryptable() from None

    def _csr(self, payload: bytes) -> x509.CertificateSigningRequest:
        try:
            return x509.load_der_x509_csr(payload)
        except ValueError:
            # The same answer as a content that does not decrypt: the content is CBC without integrity, so a
            # peer that alters a recorded request's ciphertext would otherwise learn from the answer whether its
            # padding came out right (a padding oracle on the content, which holds the challenge password).
            raise _undecryptable() from None

    @staticmethod
    def _challenge(csr: x509.CertificateSigningRequest) -> bytes:
        try:
            value = csr.attributes.get_attribute_for_oid(AttributeOID.CHALLENGE_PASSWORD).value
        except x509.AttributeNotFound:
            raise ScepError("a PKCSReq needs a challengePassword (birthline scep challenge add makes one)",
                            FailInfo.BAD_REQUEST, ReasonCode.NOT_AUTHORISED) from None  # fmt: skip
        except Exception:  # noqa: BLE001 - what cryptography raises for a device's bytes is not a stable contract
            raise ScepError(
                "the CSR's attributes do not decode", FailInfo.BAD_REQUEST, ReasonCode.BAD_CSR
            ) from None
        return value if isinstance(value, bytes) else str(value).encode()

    @staticmethod
    def _named(csr: x509.CertificateSigningRequest, attribute: str) -> str | None:
        oid = NameOID.COMMON_NAME if attribute == "commonName" else NameOID.SERIAL_NUMBER
        try:
            values = csr.subject.get_attributes_for_oid(oid)
        except Exception:  # noqa: BLE001 - as in _challenge
            raise ScepError(
                "the CSR's subject does not decode", FailInfo.BAD_REQUEST, ReasonCode.BAD_CSR
            ) from None
        if not values:
            return None
        if len(values) > 1 or not isinstance(values[0].value, str) or not values[0].value:
            raise ScepError(f"the CSR's subject must carry at most one {attribute}, naming the device",
                            FailInfo.BAD_REQUEST, ReasonCode.BAD_DEVICE_SERIAL)  # fmt: skip
        return values[0].value

    async def _enrol(self, request: _Request) -> IssueResult:
        label, message = request.label, request.message
        csr = self._csr(await self._open(request))
        key_sha256 = cms.spki_sha256(csr)
        # A RenewalReq, or a PKCSReq signed by another key than the CSR's: by the certificate it renews (RFC 8894
        # 2.3 lets a requester sign with a certificate it holds; certmonger re-keys that way).
        renewal = (
            message.message_type == MessageType.RENEWAL_REQ or cms.spki_sha256(message.signer) != key_sha256
        )
        if renewal and not label.renewal:
            raise ScepError("renewal is not offered on this label; a PKCSReq is signed with its CSR's key",
                            FailInfo.BAD_REQUEST)  # fmt: skip
        own = await self._own(message.signer) if renewal else None
        request_id = self._request_id(label, message.transaction_id)
        await self._transaction_free(label, request_id, key_sha256)
        named = self._named(csr, label.device_serial_from)
        claim: challenges.Claim | None = None
        if own is None:
            secret = self._challenge(csr)
            now = self.clock()
            claim = await self.journal.atransaction(
                lambda conn: challenges.claim_txn(
                    conn, self.audit, label.name, secret, key_sha256, named, now
                ),
                "using a SCEP challenge",
            )
            self.admission.authenticated(request.ticket)  # the challenge password was the device's
            try:
                csr_der, key_der = self._material(csr, claim.device_serial)
            except ScepError as exc:
                await self._release(label, claim, key_sha256, exc.code.name)
                raise
            issue = IssueRequest(claim.device_serial, csr_der, label.station, request_id, label.profile,
                                 public_key_der=key_der, work_order=claim.work_order, front_end="scep")  # fmt: skip
        else:
            if cms.spki_sha256(message.signer) == key_sha256:
                raise IssuanceRefused("a renewal needs a new key pair: this appliance certifies a key once",
                                      ReasonCode.KEY_ALREADY_CERTIFIED)  # fmt: skip
            if own.revoked is not None and not (
                own.revoked == "superseded" and own.successor_key == key_sha256
            ):
                # Revoked, unless by this very renewal (its product revokes what a renewal replaces): a client that
                # lost the answer asks again with the old certificate and gets the same new one.
                raise ScepError(f"certificate {own.cert_serial} is revoked ({own.revoked})", FailInfo.BAD_REQUEST,
                                ReasonCode.NOT_AUTHORISED)  # fmt: skip
            self.admission.authenticated(request.ticket)  # signed by a current certificate of this appliance
            if (
                named is not None
                and label.device_serial_from == "serialNumber"
                and named != own.device_serial
            ):
                raise ScepError(f"a renewal keeps the device serial ({own.device_serial})", FailInfo.BAD_REQUEST,
                                ReasonCode.BAD_DEVICE_SERIAL)  # fmt: skip
            csr_der, key_der = self._material(csr, own.device_serial)
            issue = IssueRequest(own.device_serial, csr_der, label.station, request_id, own.profile,
                                 public_key_der=key_der, replaces=own.cert_serial, front_end="scep")  # fmt: skip
        # Shielded: a client that hangs up must not cancel a request the core has already queued.
        try:
            result = await asyncio.shield(self.service.issue(issue))
        except IssuanceRefused as exc:
            await self._release(label, claim, key_sha256, exc.code.name)
            raise
        await self._delivered(result, replaced=issue.replaces is not None)
        return result

    async def _release(
        self, label: ScepLabel, claim: challenges.Claim | None, key_sha256: bytes, reason: str
    ) -> None:
        """The request that bound a device challenge to its key was refused: nothing was issued for that key, so the
        device's next request (with a key and CSR the appliance takes) may use the challenge, rather than need a
        supervisor to make a new one."""
        if claim is None or not claim.bound:
            return
        bound = claim

        def release(conn: sqlite3.Connection) -> None:
            challenges.release_txn(conn, self.audit, label.name, bound, key_sha256, reason)

        await self.journal.atransaction(release, "releasing a SCEP challenge")

    async def _transaction_free(self, label: ScepLabel, request_id: str, key_sha256: bytes) -> None:
        """A transactionID names one request on its label (RFC 8894 3.2.1.1): a PKCSReq that reuses one another key
        asked with is refused, before it can use a challenge or take the transaction's CertPoll from its owner."""

        def q(conn: sqlite3.Connection) -> bytes | None:
            for sql in (
                "SELECT public_key_sha256 FROM issuance WHERE station=? AND request_id=? AND state != 'burned'"
                " ORDER BY id DESC LIMIT 1",
                "SELECT public_key_sha256 FROM ra_request WHERE station=? AND request_id=? ORDER BY id DESC LIMIT 1",
            ):
                row = conn.execute(sql, (label.station, request_id)).fetchone()
                if row is not None and row[0] is not None:
                    return bytes(row[0])
            return None

        # On the journal's reader connection, as a station's ENROLL looks its request id up: a lookup on the
        # request's path must not wait behind the commits queued on the journal thread (issuance/reader.py).
        taken = await self.journal.aread(q)
        if taken is not None and taken != key_sha256:
            raise ScepError("this transactionID was used on this label by a request for another key: each request"
                            " needs a transactionID of its own", FailInfo.BAD_REQUEST)  # fmt: skip

    @staticmethod
    def _material(csr: x509.CertificateSigningRequest, device: str) -> tuple[bytes, bytes | None]:
        """What the core gets: the CSR when its subject's serialNumber is the device's, else only its key (its
        proof of possession checked here), so that what goes upstream names the device: a p10cr with the device's
        own CSR, or a cr with the subject the profile built (docs/cmp.md "The outbox"). A SCEP client's CSR often
        names nothing useful (micromdm's scepclient: CN=scepclient, O=scep-client, ...)."""
        try:
            names = [a.value for a in csr.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)]
        except Exception:  # noqa: BLE001 - _named read the subject already; a defect here is the CSR's
            names = []
        if names == [device]:
            return csr.public_bytes(_DER), None
        if not csr.is_signature_valid:
            raise ScepError("the CSR's signature does not verify (no proof of possession)",
                            FailInfo.BAD_MESSAGE_CHECK, ReasonCode.BAD_POP)  # fmt: skip
        return b"", csr.public_key().public_bytes(*_SPKI)

    async def _own(self, signer: x509.Certificate) -> _Own:
        """The journal row of the certificate that signed a renewal."""
        ca = self.service.ca.certificate
        try:
            signer.verify_directly_issued_by(ca)
        except (ValueError, TypeError, Exception):  # noqa: BLE001 - InvalidSignature, or another key type
            raise ScepError("a request is signed with its CSR's key (a self-signed certificate), or, to renew, by the"
                            " certificate it renews, which this appliance issued", FailInfo.BAD_MESSAGE_CHECK,
                            ReasonCode.NOT_AUTHORISED) from None  # fmt: skip
        now = dt.datetime.fromtimestamp(self.clock(), dt.UTC)
        if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
            raise ScepError("the certificate being renewed is not valid now", FailInfo.BAD_TIME,
                            ReasonCode.NOT_AUTHORISED)  # fmt: skip
        serial = format(signer.serial_number, "x")
        der = signer.public_bytes(_DER)

        def q() -> tuple[Any, ...] | None:
            row = self.journal.conn.execute(
                "SELECT i.cert_serial, i.device_serial, i.profile, i.state, i.cert_der, r.reason, n.public_key_sha256"
                " FROM issuance i LEFT JOIN revocation r ON r.cert_serial = i.cert_serial"
                " LEFT JOIN issuance n ON n.id = i.updated_by WHERE i.cert_serial = ? AND i.ca = ?",
                (serial, self.service.ca.name),
            ).fetchone()
            return None if row is None else tuple(row)

        row = await self.journal.acall(q)
        if row is None or row[4] is None or bytes(row[4]) != der:
            raise ScepError(f"certificate {serial} is not one this appliance issued", FailInfo.BAD_MESSAGE_CHECK,
                            ReasonCode.NOT_AUTHORISED)  # fmt: skip
        return _Own(str(row[0]), str(row[1]), str(row[2]), str(row[3]), row[5], row[6])

    async def _delivered(self, result: IssueResult, *, replaced: bool) -> None:
        """SCEP has no confirmation: the certificate counts as delivered once it is answered."""
        digest = hashlib.sha256(result.certificate).digest()
        if result.upstream:
            await self.service.confirm_upstream(result.issuance_id, digest)
            return
        await self.service.confirm(result.cert_serial, digest)
        if replaced and self.on_revoked is not None:
            self.on_revoked()  # the product may revoke the certificate a renewal replaced

    async def _poll(self, request: _Request) -> IssueResult:
        """CertPoll (RFC 8894 3.3.3): the request of this label and transactionID, asked by the same key."""
        payload = await self._open(request)
        try:
            top = read_tlv(payload)
            names = read_children(payload, top)
            if (
                top.tag != 0x30
                or top.end != len(payload)
                or len(names) != 2
                or any(n.tag != 0x30 for n in names)
            ):
                raise ValueError("not SEQUENCE { issuer Name, subject Name }")
        except ValueError:
            raise _undecryptable() from None  # as in _csr: no padding oracle
        label, message = request.label, request.message
        request_id = self._request_id(label, message.transaction_id)
        signer_key = cms.spki_sha256(message.signer)
        signer_der = message.signer.public_bytes(_DER)

        def q() -> tuple[Any, ...] | None:
            conn = self.journal.conn
            row = conn.execute(
                "SELECT 'local', n.id, n.state, n.cert_serial, n.device_serial, n.cert_der, n.public_key_sha256,"
                " o.cert_der, NULL, NULL FROM issuance n LEFT JOIN issuance o ON o.id = n.updates"
                " WHERE n.station=? AND n.request_id=? AND n.state IN ('issued', 'confirmed')"
                " ORDER BY n.id DESC LIMIT 1",
                (label.station, request_id),
            ).fetchone()
            if row is None:
                row = conn.execute(
                    "SELECT 'ra', id, state, cert_serial, device_serial, cert_der, public_key_sha256, NULL, chain_der,"
                    " failure FROM ra_request WHERE station=? AND request_id=? ORDER BY id DESC LIMIT 1",
                    (label.station, request_id),
                ).fetchone()
            return None if row is None else tuple(row)

        row = await self.journal.acall(q)
        if row is None:
            raise ScepError("no request with this transactionID on this label", FailInfo.BAD_CERT_ID)
        kind, row_id, state, cert_serial, device, cert_der, key_sha256, replaced_der, chain_der, failure = row
        if bytes(key_sha256) != signer_key and (replaced_der is None or bytes(replaced_der) != signer_der):
            raise ScepError(
                "the CertPoll is not signed by the key that made the request", FailInfo.BAD_CERT_ID
            )
        self.admission.authenticated(request.ticket)  # the key of a request this label took
        if kind == "ra":
            if state == "pending":
                raise IssuancePending("the upstream CA has not issued this certificate yet", 5.0, int(row_id))
            if state == "failed":
                raise IssuanceRefused(f"the upstream CA refused this request: {failure}",
                                      ReasonCode.UPSTREAM_REJECTED)  # fmt: skip
            result = IssueResult(bytes(cert_der), split_certificates(bytes(chain_der or b"")), str(cert_serial),
                                 str(device), int(row_id), True, upstream=True)  # fmt: skip
        else:
            result = IssueResult(bytes(cert_der), self.service.chain, str(cert_serial), str(device), int(row_id),
                                 True)  # fmt: skip
        await self._delivered(result, replaced=replaced_der is not None)
        return result

    # -- answers -------------------------------------------------------------------------------------------------------
    async def _success(self, request: _Request, result: IssueResult) -> Answer:
        self.stats["issued"] += 1
        # The issued certificate alone: certificates-only is a SET, so an order is not kept, and clients take the
        # first one they find (micromdm's scepclient does). The chain is GetCACert's.
        content = cms.certs_only([x509.load_der_x509_certificate(result.certificate)])
        cipher = request.cipher
        envelope = cms.envelope(content, request.message.signer, cipher, key=os.urandom(cipher.key_size),
                                iv=os.urandom(cipher.block_size))  # fmt: skip
        return await self._reply(request, PkiStatus.SUCCESS, content=envelope)

    async def _reply(
        self, request: _Request, status: PkiStatus, fail_info: FailInfo | None = None,
        error: BirthlineError | None = None, *, content: bytes | None = None,
    ) -> Answer:  # fmt: skip
        message = request.message
        return await self._cert_rep(message.transaction_id, message.sender_nonce or b"", status, fail_info, error,
                                    b"" if content is None else content)  # fmt: skip

    async def _failure_to(self, label: ScepLabel, exc: ScepError) -> Answer:
        assert exc.transaction_id is not None and exc.sender_nonce is not None
        self.stats["refused"] += 1
        return await self._cert_rep(exc.transaction_id, exc.sender_nonce, PkiStatus.FAILURE, exc.fail_info, exc,
                                    b"")  # fmt: skip

    async def _cert_rep(
        self, transaction_id: str, recipient_nonce: bytes, status: PkiStatus, fail_info: FailInfo | None,
        error: BirthlineError | None, content: bytes,
    ) -> Answer:  # fmt: skip
        """A CertRep. A FAILURE or PENDING has no pkcsPKIEnvelope (RFC 8894 3.3.2) but carries an empty eContent
        all the same: certmonger (OpenSSL's PKCS7_verify) cannot verify a SignedData without content."""
        text = None
        if error is not None:
            text = _clean(f"{error.code.name} ({int(error.code)}): {error.message}")
        attributes = cms.attribute_values(
            3, transaction_id, content=content, digest=SHA256, sender_nonce=os.urandom(16),
            recipient_nonce=recipient_nonce or None, pki_status=int(status),
            fail_info=int(fail_info) if status is PkiStatus.FAILURE and fail_info is not None else None,
            fail_info_text=text,
        )  # fmt: skip
        try:
            (signature,) = await self.ra.key.asign_many([attributes])
        except HsmError as exc:
            self.stats["retry_later"] += 1
            text = _clean(f"HSM_UNAVAILABLE (12): HSM: {exc.message}; send the same request again") + "\n"
            return Answer(503, text.encode(), "text/plain", {"Retry-After": str(self.retry_after_s)})
        body = cms.signed_data(
            content, attributes, signature, self.ra.certificate, SHA256, [self.ra.certificate]
        )
        return Answer(200, body)


@dataclass(frozen=True)
class _Own:
    """The journal row of a certificate of this appliance that signed a RenewalReq."""

    cert_serial: str
    device_serial: str
    profile: str
    state: str
    revoked: str | None
    successor_key: bytes | None
