"""The CMP server (RFC 9483 Lightweight CMP over RFC 9811 HTTP) on the appliance's LAN side.

    POST /.well-known/cmp[/<operation>]              the configured default label
    POST /.well-known/cmp/p/<label>[/<operation>]    a label of [cmp.labels]

A label acts AS a registered station (its `station`): requests are authorised by the work-order policy exactly
as that station's would be. Answers (docs/cmp.md "The server"):

- ir / cr / p10cr -> ip / cp with the certificate, its chain in extraCerts (and the root in caPubs for an ir
  under MAC protection, RFC 9483 4.1.1); refusals -> an error message with the failInfo of the reason code;
- certConf -> pkiConf (the certificate is confirmed in the journal); implicitConfirm is granted when asked and
  the label allows it, and the certificate is confirmed at once;
- RA mode (the work order's product is in upstream issuance mode): ir / cr / p10cr -> ip / cp with status
  "waiting"; pollReq -> pollRep (checkAfter) until the upstream CA has issued, then ip / cp with its certificate
  and chain, and certConf as above (RFC 9483 4.4);
- genm with id-it-caCerts -> genp with the issuing CA chain (RFC 9483 4.3.1);
- rr -> rp (labels with allow_rr only); nested -> nested, one answer per inner message (allow_nested only).

HTTP: 415 for another Content-Type, 413 for a body above the limit (judged from Content-Length before reading),
400 with an unprotected CMP error for bytes that are no PKIMessage, 404 for an unknown label; every other
refusal is a CMP error message with HTTP 200. Answers are protected like the request: MAC with the label's
secret, or a signature by the RA key in the HSM.

Transactions waiting for certConf are kept in memory for `confirm_wait_s`; a certificate never confirmed stays
'issued' (not 'confirmed') in the journal, as for a station that never confirmed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import hashlib
import logging
import sqlite3
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from appliance.alarms import LogOnce
from appliance.cmp import _der, oids
from appliance.cmp._names import NULL_DN
from appliance.cmp.build import Protector, build_message
from appliance.cmp.errors import CmpError, FailInfo, fail_info_for_error
from appliance.cmp.header import TransactionState, check_request, new_nonce, response_header
from appliance.cmp.model import (
    DEFAULT_LIMITS,
    PVNO_CMP2000,
    Body,
    BodyType,
    CertConfBody,
    CertRepBody,
    CertReqBody,
    CertResponse,
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
    PollRepBody,
    PollRepEntry,
    PollReqBody,
    PopKind,
    RevokedCertId,
    RpBody,
    RrBody,
)
from appliance.cmp.parse import parse_message
from appliance.cmp.protection import (
    MacProtector,
    ProtectionKind,
    SignatureProtector,
    VerifiedProtection,
    protection_kind,
    verify_protection,
)
from appliance.config import CmpSection
from appliance.errors import (
    BirthlineError,
    ConfigError,
    IssuanceFailed,
    IssuancePending,
    IssuanceRefused,
    Problem,
)
from appliance.httpbody import read_limited
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink, IssueRequest
from appliance.issuance.service import IssueService
from appliance.va.revocation import Reason, RevocationError, Source, revoke_in_transaction

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/pkixcmp"
RA_KEY_LABEL = "cmp-ra"

_DER = serialization.Encoding.DER
_SHA256 = hashes.SHA256()
_REASONS: dict[x509.ReasonFlags, Reason] = {
    x509.ReasonFlags.unspecified: Reason.UNSPECIFIED,
    x509.ReasonFlags.key_compromise: Reason.KEY_COMPROMISE,
    x509.ReasonFlags.ca_compromise: Reason.CA_COMPROMISE,
    x509.ReasonFlags.affiliation_changed: Reason.AFFILIATION_CHANGED,
    x509.ReasonFlags.superseded: Reason.SUPERSEDED,
    x509.ReasonFlags.cessation_of_operation: Reason.CESSATION_OF_OPERATION,
    x509.ReasonFlags.privilege_withdrawn: Reason.PRIVILEGE_WITHDRAWN,
}


@dataclass(frozen=True)
class CmpLabel:
    """One /.well-known/cmp/p/<label>: who it acts as, how its peers authenticate, what they may do."""

    name: str
    station: str
    """The registered station whose line and work orders authorise this label's requests."""
    profile: str | None = None
    secret: bytes | None = field(default=None, repr=False)
    """The MAC secret (read from the label's secret_file); None: no MAC accepted."""
    kid: bytes = b""
    """The senderKID that names the secret; the label's name when empty."""
    station_signature: bool = False
    """Accept a signature by the station's own TLS certificate (management CA, checked by fingerprint)."""
    trusted_cas: tuple[x509.Certificate, ...] = ()
    """Accept a signature by a certificate issued directly by one of these CAs."""
    allow_rr: bool = False
    allow_nested: bool = False
    implicit_confirm: bool = True
    accept_ra_verified: bool = False
    """Accept cr/ir with POP raVerified (RFC 9483 5.2.3.2) when the message is signed by a trusted RA (a signer
    issued by one of trusted_cas, or the station's certificate): a downstream Birthline's forwarder."""

    @property
    def sender_kid(self) -> bytes:
        return self.kid or self.name.encode()


@dataclass(frozen=True)
class CmpSettings:
    max_message_bytes: int = DEFAULT_LIMITS.max_message_size
    confirm_wait_s: float = 300.0
    max_pending: int = 10_000
    default_label: str = ""


@dataclass
class _Pending:
    """An open transaction: awaiting certConf for `certificate`, or (RA mode, certificate None) awaiting the
    upstream CA, re-asked with `issue` at each pollReq."""

    label: str
    state: TransactionState
    cert_req_id: int
    certificate: x509.Certificate | None
    cert_serial: str
    expires: float
    request_sha256: bytes = b""
    issue: IssueRequest | None = None
    rep_type: BodyType = BodyType.CP
    ra_request: int | None = None
    mac: bool = False
    implicit: bool = False  # implicitConfirm asked in the request and allowed by the label


@dataclass
class _Answer:
    body_type: BodyType
    body: Body
    implicit: bool = False
    extra_certs: tuple[x509.Certificate, ...] = ()
    pending: _Pending | None = None


def _error(exc: BaseException) -> _Answer:
    text = exc.message if isinstance(exc, BirthlineError) else "internal error"
    return _Answer(BodyType.ERROR, ErrorBody(PKIStatusInfo.rejection(fail_info_for_error(exc), text)))


def csr_subject(csr: x509.CertificateSigningRequest) -> x509.Name:
    """A p10cr's requested subject. cryptography decodes it only when asked, so a malformed one (an empty RDN,
    an undecodable string) raises here: the device's error, not ours."""
    try:
        return csr.subject
    except Exception:  # noqa: BLE001 - what cryptography raises for a device's bytes is not a stable contract
        raise CmpError("the CSR's subject does not parse", fail_info=FailInfo.BAD_DATA_FORMAT) from None


def device_serial_of(subject: x509.Name | None) -> str:
    """The device serial: the requested subject's serialNumber attribute (exactly one)."""
    values = [] if subject is None else subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if len(values) != 1 or not isinstance(values[0].value, str) or not values[0].value:
        raise CmpError(
            "the requested subject must carry exactly one serialNumber attribute: the device serial",
            fail_info=FailInfo.BAD_CERT_TEMPLATE,
        )
    return values[0].value


def read_secret_file(path: Path) -> bytes:
    """A MAC secret from a file readable by its owner only (0600 or stricter); surrounding whitespace stripped."""
    if path.stat().st_mode & 0o077:
        raise ConfigError(
            [Problem(str(path), "a CMP secret file must be mode 0600 (readable by its owner only)")]
        )
    secret = path.read_bytes().strip()
    if not secret:
        raise ConfigError([Problem(str(path), "the CMP secret file is empty")])
    return secret


def labels_from_config(section: CmpSection) -> dict[str, CmpLabel]:
    """The configured labels with their secrets and trusted CAs read from their files."""
    labels: dict[str, CmpLabel] = {}
    for name, cfg in section.labels.items():
        trusted: tuple[x509.Certificate, ...] = ()
        if cfg.trusted_ca is not None:
            trusted = tuple(x509.load_pem_x509_certificates(cfg.trusted_ca.read_bytes()))
        labels[name] = CmpLabel(
            name, cfg.station, cfg.profile,
            secret=read_secret_file(cfg.secret_file) if cfg.secret_file is not None else None,
            kid=cfg.kid.encode(), station_signature=cfg.station_signature, trusted_cas=trusted,
            allow_rr=cfg.allow_rr, allow_nested=cfg.allow_nested, implicit_confirm=cfg.implicit_confirm,
            accept_ra_verified=cfg.accept_ra_verified,
        )  # fmt: skip
    return labels


def settings_from_config(section: CmpSection) -> CmpSettings:
    return CmpSettings(
        section.max_message_bytes, section.confirm_wait_s, section.max_pending, section.default_label
    )


class CmpResponder:
    """The protocol side of the server: bytes of a request in, bytes of the answer out."""

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
    ) -> None:
        self.service = service
        self.journal = journal
        self.audit = audit
        self.labels = dict(labels)
        self.management_ca = management_ca
        self.ra = ra
        self.settings = settings or CmpSettings()
        self.on_revoked = on_revoked
        self.clock = clock
        self.limits = Limits(max_message_size=self.settings.max_message_bytes)
        self.pending: dict[bytes, _Pending] = {}
        self._issuer_checks: dict[tuple[bytes, bytes], bool] = {}
        self.chain = tuple(x509.load_der_x509_certificate(c) for c in service.chain)
        self.stats = {"requests": 0, "errors": 0, "issued": 0, "confirmed": 0, "revoked": 0}
        self._defects = LogOnce(300.0)

    # -- entry point ---------------------------------------------------------------------------------------------
    async def handle(self, label_name: str, data: bytes) -> tuple[int, bytes]:
        """(HTTP status, PKIMessage DER) for one request body addressed to `label_name` (which must exist)."""
        label = self.labels[label_name]
        self.stats["requests"] += 1
        try:
            msg = await asyncio.to_thread(parse_message, data, limits=self.limits)
        except CmpError as exc:
            self.stats["errors"] += 1
            return 400, self._unparsed_error(exc).der
        answer = await self._respond(label, msg, outer=True)
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
        checked: VerifiedProtection | BirthlineError | ValueError | None = None,
    ) -> PKIMessage:
        """`checked`: the protection and signer already checked by the caller (the inner messages of a nested
        message are checked together, in one thread hop), or why they failed."""
        protector = self._protector_for(label, msg)
        try:
            self._purge()
            if checked is None:
                verified = await asyncio.to_thread(self._verify, label, msg)
                self._check_signer(label, await self._station_row(label), verified)
            elif isinstance(checked, VerifiedProtection):
                verified = checked
            else:
                raise checked
            tid = msg.header.transaction_id or b""
            pending = self.pending.get(tid)
            follow_up = msg.body_type in (BodyType.CERTCONF, BodyType.POLLREQ)
            if follow_up and (pending is None or pending.label != label.name):
                raise CmpError(f"no transaction of this label awaits a {msg.body_type.asn1_name}")
            if follow_up and pending and (msg.body_type is BodyType.POLLREQ) != (pending.certificate is None):
                raise CmpError(f"this transaction does not await a {msg.body_type.asn1_name}")
            check_request(msg, pending.state if follow_up and pending else None)
            if not follow_up and pending is not None:
                if pending.request_sha256 != hashlib.sha256(msg.der).digest():
                    raise CmpError("transactionID is in use", fail_info=FailInfo.TRANSACTION_ID_IN_USE)
                # The same request again (a forwarder's retry after a lost answer): answer it again; the core
                # answers a retry of the same device and key with the stored certificate.
                del self.pending[tid]
            answer = await self._dispatch(label, msg, outer=outer, ra_signed=verified.signer is not None)
        except (BirthlineError, ValueError) as exc:
            answer = _error(exc)
        except Exception as exc:  # noqa: BLE001 - answered (systemFailure) and logged below; never escapes
            # A defect some input hits: a client could send that input in a loop, so its traceback is logged
            # once per exception type and 5 minutes, not once per request.
            self._defects.log(
                log, logging.ERROR, type(exc).__name__, "CMP request on label %s failed: %s", label.name,
                "".join(traceback.format_exception(exc)).rstrip(),
            )  # fmt: skip
            answer = _error(exc)
        if answer.body_type is BodyType.ERROR:
            self.stats["errors"] += 1
            log.info("CMP %s on label %s refused: %s", msg.body_type.asn1_name, label.name,
                     answer.body.status.status_string if isinstance(answer.body, ErrorBody) else "")  # fmt: skip
        out = await asyncio.to_thread(self._build, msg, answer, protector)
        if answer.pending is not None and out.header.sender_nonce is not None:
            tid = msg.header.transaction_id or b""
            answer.pending.state = TransactionState(tid, out.header.sender_nonce)
            self.pending[tid] = answer.pending
        return out

    def _build(self, msg: PKIMessage, answer: _Answer, protector: Protector | None) -> PKIMessage:
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
        """Protect the answer as the request was: MAC with the label's secret, else a signature by the RA."""
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
        for tid in [t for t, p in self.pending.items() if p.expires <= now]:
            expired = self.pending.pop(tid)
            log.info("CMP transaction on label %s expired without certConf: certificate %s stays unconfirmed",
                     expired.label, expired.cert_serial)  # fmt: skip

    # -- authentication ------------------------------------------------------------------------------------------
    def _verify(self, label: CmpLabel, msg: PKIMessage) -> VerifiedProtection:
        secret = label.secret

        def secret_for(kid: bytes) -> bytes | None:
            return secret if kid == label.sender_kid else None

        verified = verify_protection(
            msg,
            secret_for=secret_for if secret else None,
            allow_signature=label.station_signature or bool(label.trusted_cas),
        )
        if verified.signer is not None:
            self._check_signer_validity(verified.signer)
        return verified

    def _check_signer_validity(self, signer: x509.Certificate) -> None:
        now = self._now()
        if not signer.not_valid_before_utc <= now <= signer.not_valid_after_utc:
            raise CmpError("the signer's certificate is not valid now", fail_info=FailInfo.SIGNER_NOT_TRUSTED)

    def _issued_by(self, cert: x509.Certificate, ca: x509.Certificate) -> bool:
        # The answer never changes for a pair of certificates (the CAs are fixed for the server's life), and
        # a downstream RA signs every message with the same certificate: verify once per pair.
        key = (cert.fingerprint(_SHA256), ca.fingerprint(_SHA256))
        known = self._issuer_checks.get(key)
        if known is None:
            try:
                cert.verify_directly_issued_by(ca)
                known = True
            except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):  # not issued by it
                known = False
            if len(self._issuer_checks) >= 4096:
                self._issuer_checks.clear()
            self._issuer_checks[key] = known
        return known

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

    def _check_signer(self, label: CmpLabel, fingerprint: bytes | None, verified: VerifiedProtection) -> None:
        """A signer is the station's own TLS certificate (by fingerprint, issued by the management CA) or is
        issued by one of the label's trusted CAs."""
        signer = verified.signer
        if signer is None:
            return
        if any(self._issued_by(signer, ca) for ca in label.trusted_cas):
            return
        if (
            label.station_signature
            and self.management_ca is not None
            and fingerprint is not None
            and hashlib.sha256(signer.public_bytes(_DER)).digest() == fingerprint
            and self._issued_by(signer, self.management_ca)
        ):
            return
        raise CmpError(
            f"the signer is not trusted for label {label.name!r}", fail_info=FailInfo.SIGNER_NOT_TRUSTED
        )

    # -- the bodies ---------------------------------------------------------------------------------------------------
    async def _dispatch(
        self, label: CmpLabel, msg: PKIMessage, *, outer: bool, ra_signed: bool = False
    ) -> _Answer:
        body = msg.body
        if isinstance(body, CertReqBody) and msg.body_type in (BodyType.IR, BodyType.CR):
            return await self._certify(label, msg, body, ra_signed=ra_signed)
        if isinstance(body, P10crBody):
            return await self._certify(label, msg, body)
        if isinstance(body, CertConfBody):
            return await self._cert_conf(msg, body)
        if isinstance(body, PollReqBody):
            return await self._poll(msg, body)
        if isinstance(body, GenBody) and msg.body_type is BodyType.GENM:
            return self._general(body)
        if isinstance(body, RrBody):
            return await self._revoke(label, body)
        if isinstance(body, NestedBody) and outer:
            return await self._nested(label, body)
        raise CmpError(f"{msg.body_type.asn1_name} is not served here", fail_info=FailInfo.BAD_REQUEST)

    async def _certify(
        self, label: CmpLabel, msg: PKIMessage, body: CertReqBody | P10crBody, *, ra_signed: bool = False
    ) -> _Answer:
        tid = msg.header.transaction_id or b""
        if len(self.pending) >= self.settings.max_pending:
            raise CmpError("too many transactions await certConf; try again later",
                           fail_info=FailInfo.SYSTEM_UNAVAIL)  # fmt: skip
        request_id = f"cmp:{label.name}:{tid.hex()}"
        if isinstance(body, P10crBody):
            req_id = 0
            issue = IssueRequest(device_serial_of(csr_subject(body.csr)), body.csr.public_bytes(_DER), label.station,
                                 request_id, label.profile)  # fmt: skip
        else:
            if len(body.requests) != 1:
                raise CmpError("exactly one certificate request per message is accepted")
            (req,) = body.requests
            if not (req.pop is PopKind.RA_VERIFIED and label.accept_ra_verified and ra_signed):
                req.verify_pop()  # raVerified (unless from a trusted RA) and absent POP are refused (badPOP)
            req_id = req.cert_req_id
            issue = IssueRequest(device_serial_of(req.template.subject), b"", label.station, request_id,
                                 label.profile, public_key_der=req.template.public_key_der)  # fmt: skip
        rep_type = {BodyType.IR: BodyType.IP}.get(msg.body_type, BodyType.CP)
        mac = protection_kind(msg.header) in (ProtectionKind.PBM, ProtectionKind.PBMAC1)
        pending = _Pending(label.name, TransactionState(tid, b""), req_id, None, "",
                           self.clock() + self.settings.confirm_wait_s, hashlib.sha256(msg.der).digest(),
                           issue=issue, rep_type=rep_type, mac=mac,
                           implicit=msg.header.implicit_confirm and label.implicit_confirm)  # fmt: skip
        return await self._issue(pending)

    async def _issue(self, pending: _Pending) -> _Answer:
        """Ask the core (again, for a pollReq) and answer: the certificate, or "waiting" in RA mode."""
        assert pending.issue is not None
        rep_type, req_id = pending.rep_type, pending.cert_req_id
        try:
            result = await asyncio.shield(self.service.issue(pending.issue))
        except IssuancePending as exc:
            # RA mode: the upstream CA issues. The transaction stays open for pollReq (RFC 9483 4.4).
            pending.ra_request = exc.request
            pending.expires = self.clock() + self.settings.confirm_wait_s
            waiting = CertRepBody((CertResponse(req_id, PKIStatusInfo.waiting(exc.message)),))
            return _Answer(rep_type, waiting, pending=pending)
        except (IssuanceRefused, IssuanceFailed) as exc:
            raise CmpError(exc.message, fail_info=fail_info_for_error(exc), code=exc.code) from None
        self.stats["issued"] += 1
        cert = x509.load_der_x509_certificate(result.certificate)
        chain = (
            tuple(x509.load_der_x509_certificate(c) for c in result.chain) if result.upstream else self.chain
        )
        ca_pubs = (chain[-1],) if rep_type is BodyType.IP and pending.mac and chain else ()
        rep = CertRepBody((CertResponse(req_id, PKIStatusInfo.accepted(), cert),), ca_pubs)
        if pending.implicit:
            await self._confirm(result.upstream, result.issuance_id, result.cert_serial, result.certificate)
            self.stats["confirmed"] += 1
            return _Answer(rep_type, rep, implicit=True, extra_certs=chain)
        pending.certificate, pending.cert_serial = cert, result.cert_serial
        pending.ra_request = result.issuance_id if result.upstream else None
        pending.expires = self.clock() + self.settings.confirm_wait_s
        return _Answer(rep_type, rep, extra_certs=chain, pending=pending)

    async def _confirm(self, upstream: bool, ra_request: int | None, cert_serial: str, der: bytes) -> None:
        if upstream and ra_request is not None:
            await self.service.confirm_upstream(ra_request, hashlib.sha256(der).digest())
        else:
            await self.service.confirm(cert_serial, hashlib.sha256(der).digest())

    async def _poll(self, msg: PKIMessage, body: PollReqBody) -> _Answer:
        """pollReq on a transaction waiting for the upstream CA: pollRep while it still waits, else the answer."""
        pending = self.pending.pop(msg.header.transaction_id or b"")
        if body.cert_req_ids != (pending.cert_req_id,):
            raise CmpError(f"pollReq names certReqId(s) {list(body.cert_req_ids)}, this transaction has"
                           f" {pending.cert_req_id}", fail_info=FailInfo.BAD_CERT_ID)  # fmt: skip
        answer = await self._issue(pending)
        if isinstance(answer.body, CertRepBody) and answer.body.responses[0].certificate is None:
            after = max(1, round(self.service.upstream_retry_s or 5.0))
            entry = PollRepEntry(pending.cert_req_id, after, ("the upstream CA has not issued yet",))
            return _Answer(BodyType.POLLREP, PollRepBody((entry,)), pending=answer.pending)
        return answer

    def _general(self, body: GenBody) -> _Answer:
        """genm: id-it-caCerts is answered with the issuing CA chain; other info types are not served."""
        if body.ca_certs() is None:
            names = ", ".join(i.oid for i in body.items) or "none"
            raise CmpError(f"general message info type(s) {names} are not served; id-it-caCerts is",
                           fail_info=FailInfo.BAD_REQUEST)  # fmt: skip
        value = _der.sequence(*(c.public_bytes(_DER) for c in self.chain))
        return _Answer(BodyType.GENP, GenBody((InfoTypeAndValue(oids.IT_CA_CERTS, value),)))

    async def _cert_conf(self, msg: PKIMessage, body: CertConfBody) -> _Answer:
        tid = msg.header.transaction_id or b""
        pending = self.pending.pop(tid)  # the transaction ends here, whatever the outcome
        if len(body.statuses) != 1:
            raise CmpError("certConf must carry exactly one CertStatus", fail_info=FailInfo.BAD_REQUEST)
        (status,) = body.statuses
        assert pending.certificate is not None  # _respond routes certConf only to a certificate's transaction
        if status.cert_req_id != pending.cert_req_id:
            raise CmpError(f"certReqId {status.cert_req_id} was not issued in this transaction",
                           fail_info=FailInfo.BAD_CERT_ID)  # fmt: skip
        if not status.matches(pending.certificate):
            raise CmpError("certHash does not match the issued certificate", fail_info=FailInfo.BAD_CERT_ID)
        if status.accepted:
            der = pending.certificate.public_bytes(_DER)
            await self._confirm(pending.ra_request is not None, pending.ra_request, pending.cert_serial, der)
            self.stats["confirmed"] += 1
        else:
            log.warning("CMP client rejected certificate %s (label %s); it stays unconfirmed",
                        pending.cert_serial, pending.label)  # fmt: skip
        return _Answer(BodyType.PKICONF, PkiConfBody())

    async def _revoke(self, label: CmpLabel, body: RrBody) -> _Answer:
        if not label.allow_rr:
            raise CmpError(f"label {label.name!r} may not revoke", fail_info=FailInfo.NOT_AUTHORIZED)
        if len(body.requests) != 1:
            raise CmpError("rr must carry exactly one RevDetails (RFC 9483 4.2)")
        (details,) = body.requests
        issuer = self.chain[0].subject
        if details.serial_number is None or details.issuer is None:
            raise CmpError("rr needs the issuer and serialNumber of the certificate",
                           fail_info=FailInfo.BAD_CERT_TEMPLATE)  # fmt: skip
        reason = _REASONS.get(details.reason or x509.ReasonFlags.unspecified)
        if reason is None:
            raise CmpError("this revocation reason is not offered (revocation is final)")
        serial = format(details.serial_number, "x")
        actor = f"cmp:{label.name}"

        def txn(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT cert_serial, ca, device_serial, state FROM issuance WHERE cert_serial=? AND ca=?",
                (serial, self.service.ca.name),
            ).fetchone()
            if (
                details.issuer != issuer
                or row is None
                or row[3] not in ("issued", "confirmed", "reworked", "scrapped")
            ):
                raise CmpError("no certificate with this issuer and serial was issued here",
                               fail_info=FailInfo.BAD_CERT_ID)  # fmt: skip
            result = revoke_in_transaction(conn, self.audit, actor, [(str(row[0]), str(row[1]), str(row[2]))],
                                           reason, Source.CMP, now=self.clock(),
                                           selector={"cmp_label": label.name})  # fmt: skip
            return bool(result.changed)

        try:
            changed = await self.journal.atransaction(txn, f"revoking {serial} over CMP")
        except CmpError as exc:
            return _Answer(BodyType.RP, RpBody((PKIStatusInfo.from_error(exc),)))
        except RevocationError as exc:
            status = PKIStatusInfo.rejection(FailInfo.CERT_REVOKED, exc.message)
            return _Answer(BodyType.RP, RpBody((status,)))
        if not changed:
            status = PKIStatusInfo.rejection(FailInfo.CERT_REVOKED, "the certificate is already revoked")
            return _Answer(BodyType.RP, RpBody((status,)))
        self.stats["revoked"] += 1
        if self.on_revoked is not None:
            self.on_revoked()
        rev = RevokedCertId(x509.DirectoryName(issuer), details.serial_number)
        return _Answer(BodyType.RP, RpBody((PKIStatusInfo.accepted(),), (rev,)))

    async def _nested(self, label: CmpLabel, body: NestedBody) -> _Answer:
        """RFC 9483 5.2.2: the outer protection (verified already) authenticates the downstream RA; each inner
        message is verified and authorised on its own, against the same label, and answered on its own."""
        if not label.allow_nested:
            raise CmpError(
                f"label {label.name!r} accepts no nested messages", fail_info=FailInfo.NOT_AUTHORIZED
            )
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

        def check_all() -> list[VerifiedProtection | BirthlineError | ValueError]:
            out: list[VerifiedProtection | BirthlineError | ValueError] = []
            for _, msg in together:
                try:
                    verified = self._verify(label, msg)
                    self._check_signer(label, fingerprint, verified)
                    out.append(verified)
                except (BirthlineError, ValueError) as exc:
                    out.append(exc)
            return out

        # Checked together (one thread hop), so the requests then reach the core together.
        checks = await asyncio.to_thread(check_all)
        results = await asyncio.gather(
            *(
                self._respond(label, msg, outer=False, checked=c)
                for (_, msg), c in zip(together, checks, strict=True)
            )
        )
        for (i, _), answer in zip(together, results, strict=True):
            answers[i] = answer
        for i, msg in later:
            answers[i] = await self._respond(label, msg, outer=False)
        done = [a for a in answers if a is not None]
        return _Answer(BodyType.NESTED, NestedBody(tuple(NestedItem(m.der, m) for m in done)))


# -- HTTP ------------------------------------------------------------------------------------------------------------
RESPONDER_KEY: web.AppKey[CmpResponder] = web.AppKey("cmp", CmpResponder)


async def cmp_post(request: web.Request) -> web.StreamResponse:
    responder = request.app[RESPONDER_KEY]
    label = request.match_info.get("label", responder.settings.default_label)
    if not label or label not in responder.labels:
        return web.Response(status=404, text="no such CMP label\n")
    if request.content_type != CONTENT_TYPE:
        response = web.Response(status=415, text=f"Content-Type must be {CONTENT_TYPE}\n")
        response.force_close()
        return response
    data = await read_limited(request, responder.settings.max_message_bytes)
    if data is None:
        response = web.Response(status=413, text="CMP message too large\n")
        response.force_close()  # the rest of the body is never read
        return response
    status, answer = await responder.handle(label, data)
    return web.Response(status=status, body=answer, content_type=CONTENT_TYPE)


def make_cmp_app(responder: CmpResponder) -> web.Application:
    """The CMP server's HTTP application; serve it with appliance.va.http.VaServer (any app on host:port)."""
    app = web.Application(client_max_size=responder.settings.max_message_bytes + 1)
    app[RESPONDER_KEY] = responder
    for path in ("/.well-known/cmp", "/.well-known/cmp/{operation}", "/.well-known/cmp/p/{label}",
                 "/.well-known/cmp/p/{label}/{operation}"):  # fmt: skip
        app.router.add_post(path, cmp_post)
    return app
