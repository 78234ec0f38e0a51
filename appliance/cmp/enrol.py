"""Certificate requests over CMP (RFC 9483 4.1, 4.4, 5.1.1, 5.1.2): ir, cr, p10cr and kur to the issuance core,
pollReq while the upstream CA works (RA mode), certConf.

Every request goes to the one issuance core (appliance/issuance/service.py) as an IssueRequest from the label's
station, so the work-order policy, the journal and the audit log apply as to any station:
- ir / cr / p10cr: the device serial is the requested subject's serialNumber - or, when the request is signed
  with a birth certificate of the label's idevid_roots (greenfield), that certificate's; the label's issuing CA
  and profile;
- kur: the certificate being updated is the signer's (or, from a trusted RA, the one its oldCertID control
  names); the new certificate replaces it in the journal (IssueRequest.replaces), from the same CA and profile,
  for the same device serial, with a new key that the product's key policy allows.
A refused request is answered with ip / cp / kup carrying status rejection (transactions.rejection).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.error import PyAsn1Error
from pyasn1_alt_modules import rfc5280

from appliance import pyasn1_repr  # noqa: F401 - installs pyasn1's cheap schema repr (see there)
from appliance.cmp.errors import CmpError, FailInfo, fail_info_for_error
from appliance.cmp.header import TransactionState
from appliance.cmp.labels import CmpLabel, CmpSettings, device_serial_of
from appliance.cmp.model import (
    BodyType,
    CertConfBody,
    CertRepBody,
    CertReqBody,
    CertReqMessage,
    CertResponse,
    P10crBody,
    PkiConfBody,
    PKIMessage,
    PKIStatus,
    PKIStatusInfo,
    PollRepBody,
    PollRepEntry,
    PollReqBody,
    PopKind,
)
from appliance.cmp.protection import ProtectionKind
from appliance.cmp.transactions import Answer, Auth, Requested, Transaction, rejection
from appliance.cmp.trust import OwnCertificate, SignerKind, SignerTrust
from appliance.errors import BirthlineError, IssuanceFailed, IssuancePending, IssuanceRefused
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService

log = logging.getLogger(__name__)

_DER = serialization.Encoding.DER
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
RESPONSE_TYPE = {BodyType.IR: BodyType.IP, BodyType.CR: BodyType.CP, BodyType.P10CR: BodyType.CP,
                 BodyType.KUR: BodyType.KUP}  # fmt: skip
P10CR_CERT_REQ_ID = -1
"""RFC 9483 4.1.4 (RFC 9810 5.3.4): a p10cr has no certReqId; its cp and certConf use -1."""


def _requested_extensions(der: bytes | None) -> tuple[tuple[str, bool, bytes], ...]:
    if der is None:
        return ()
    try:
        value, rest = der_decoder.decode(der, asn1Spec=rfc5280.Extensions())
    except (PyAsn1Error, ValueError, TypeError):
        raise CmpError("the template's extensions do not decode as Extensions (RFC 5280)",
                       fail_info=FailInfo.BAD_CERT_TEMPLATE) from None  # fmt: skip
    if rest:
        raise CmpError("the template's extensions have trailing bytes", fail_info=FailInfo.BAD_CERT_TEMPLATE)
    return tuple((str(e["extnID"]), bool(e["critical"]), bytes(e["extnValue"])) for e in value)


def csr_subject(csr: x509.CertificateSigningRequest) -> x509.Name:
    """A p10cr's requested subject. cryptography decodes it only when asked, so a malformed one (an empty RDN,
    an undecodable string) raises here: the device's error, not ours."""
    try:
        return csr.subject
    except Exception:  # noqa: BLE001 - what cryptography raises for a device's bytes is not a stable contract
        raise CmpError("the CSR's subject does not parse", fail_info=FailInfo.BAD_DATA_FORMAT) from None


def _csr_extensions(csr: x509.CertificateSigningRequest) -> tuple[tuple[str, bool, bytes], ...]:
    """A p10cr's requested extensions, decoded here, before the core sees the CSR: one that does not decode (two
    of one type, a value that is not its type's DER) is the device's malformed request, refused with a cp
    rejection badDataFormat (RFC 9483 3.6, 4.1.4)."""
    try:
        return tuple((e.oid.dotted_string, e.critical, e.value.public_bytes()) for e in csr.extensions)
    except Exception:  # noqa: BLE001 - as in csr_subject (two of one type: DuplicateExtension)
        raise CmpError("the CSR's requested extensions do not decode: each extension type at most once, its value"
                       " the DER of that type (RFC 2986, RFC 5280)", fail_info=FailInfo.BAD_DATA_FORMAT) from None  # fmt: skip


@dataclass(frozen=True)
class _Prepared:
    issue: IssueRequest
    ca: str
    cert_req_id: int
    requested: Requested


class Enroller:
    """The certificate-request side of the CMP server (see the module docstring)."""

    def __init__(
        self,
        services: Mapping[str, IssueService],
        default_ca: str,
        trust: SignerTrust,
        settings: CmpSettings,
        *,
        clock: Callable[[], float] = time.time,
        on_revoked: Callable[[], None] | None = None,
    ) -> None:
        self.services = dict(services)
        self.default_ca = default_ca
        self.trust = trust
        self.settings = settings
        self.clock = clock
        self.on_revoked = on_revoked
        self.stats = {"issued": 0, "confirmed": 0}

    def chain(self, ca: str) -> tuple[x509.Certificate, ...]:
        return tuple(x509.load_der_x509_certificate(c) for c in self.services[ca].chain)

    def label_ca(self, label: CmpLabel) -> str:
        return label.issuing_ca or self.default_ca

    def _default_profile(self, label: CmpLabel) -> str:
        return self.services[self.label_ca(label)].default_profile

    # -- a request ----------------------------------------------------------------------------------------------
    async def certify(
        self, label: CmpLabel, msg: PKIMessage, body: CertReqBody | P10crBody, auth: Auth, pending_count: int
    ) -> Answer:
        rep_type = RESPONSE_TYPE[msg.body_type]
        req_id = P10CR_CERT_REQ_ID
        if isinstance(body, CertReqBody):
            req_id = body.requests[0].cert_req_id if body.requests else 0
        try:
            if pending_count >= self.settings.max_pending:
                raise CmpError("too many transactions await certConf; try again later",
                               fail_info=FailInfo.SYSTEM_UNAVAIL)  # fmt: skip
            request_id = f"cmp:{label.name}:{(msg.header.transaction_id or b'').hex()}"
            asked = msg.header.cert_profile
            if (
                asked
                and msg.body_type is not BodyType.KUR
                and asked[0] != (label.profile or self._default_profile(label))
            ):
                raise CmpError(f"certificate profile {asked[0][:64]!r} is not issued on label {label.name!r}",
                               fail_info=FailInfo.BAD_CERT_TEMPLATE)  # fmt: skip
            if isinstance(body, P10crBody):
                prepared = self._p10cr(label, body, auth, request_id)
            elif msg.body_type is BodyType.KUR:
                prepared = await self._kur(label, body, auth, request_id)
            else:
                prepared = self._cr(label, body, auth, request_id)
            pending = Transaction(
                label.name, TransactionState(msg.header.transaction_id or b"", b""), prepared.cert_req_id, None,
                "", self.clock() + self.settings.confirm_wait_s, hashlib.sha256(msg.der).digest(),
                auth.credential, prepared.ca, issue=prepared.issue, rep_type=rep_type,
                mac=auth.credential.kind in (ProtectionKind.PBM, ProtectionKind.PBMAC1),
                implicit=msg.header.implicit_confirm and label.implicit_confirm, requested=prepared.requested,
            )  # fmt: skip
            return await self.issue(pending)
        except (BirthlineError, ValueError) as exc:
            return rejection(rep_type, req_id, exc)

    def _p10cr(self, label: CmpLabel, body: P10crBody, auth: Auth, request_id: str) -> _Prepared:
        subject = csr_subject(body.csr)
        extensions = _csr_extensions(body.csr)  # decoded whole before the core sees the CSR
        device = self._device_serial(subject, auth)
        issue = IssueRequest(device, body.csr.public_bytes(_DER), label.station, request_id, label.profile,
                             front_end="cmp")  # fmt: skip
        return _Prepared(issue, self.label_ca(label), P10CR_CERT_REQ_ID, Requested(subject, extensions))

    def _one(self, body: CertReqBody, what: str) -> CertReqMessage:
        if len(body.requests) != 1:
            raise CmpError(f"exactly one CertReqMsg per {what} is accepted (RFC 9483 4.1)")
        (req,) = body.requests
        if req.cert_req_id != 0:
            raise CmpError(f"certReqId must be 0, not {req.cert_req_id} (RFC 9483 4.1.1)")
        if req.template.public_key_der is None:
            raise CmpError("the certificate template has no public key", fail_info=FailInfo.BAD_CERT_TEMPLATE)
        return req

    def _check_pop(self, label: CmpLabel, req: CertReqMessage, auth: Auth) -> None:
        if req.pop is PopKind.RA_VERIFIED:
            signer = auth.signer
            if not (
                label.accept_ra_verified and signer and signer.kind in (SignerKind.RA, SignerKind.STATION)
            ):
                # RFC 9483 4.1.1 / 5.2.3.2: only a PKI management entity the CA trusts may vouch for the POP.
                raise CmpError("proof of possession raVerified is accepted only from a trusted RA",
                               fail_info=FailInfo.NOT_AUTHORIZED)  # fmt: skip
            return
        req.verify_pop()  # absent, keyEncipherment, ... and a wrong signature: badPOP

    def _device_serial(self, subject: x509.Name | None, auth: Auth) -> str:
        """The requested subject's serialNumber; with a birth-certificate signer (greenfield), that certificate's,
        and a requested serialNumber must be the same."""
        signer = auth.signer
        if signer is None or signer.kind is not SignerKind.DEVICE:
            return device_serial_of(subject)
        try:
            device = device_serial_of(signer.certificate.subject)
        except CmpError:
            raise CmpError("the birth certificate that signed the request carries no device serial",
                           fail_info=FailInfo.NOT_AUTHORIZED) from None  # fmt: skip
        asked = [] if subject is None else subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)
        if any(a.value != device for a in asked):
            raise CmpError(f"the request is for another device than the birth certificate's ({device})",
                           fail_info=FailInfo.BAD_CERT_TEMPLATE)  # fmt: skip
        return device

    def _cr(self, label: CmpLabel, body: CertReqBody, auth: Auth, request_id: str) -> _Prepared:
        req = self._one(body, "ir or cr")
        self._check_pop(label, req, auth)
        device = self._device_serial(req.template.subject, auth)
        issue = IssueRequest(device, b"", label.station, request_id, label.profile,
                             public_key_der=req.template.public_key_der, front_end="cmp")  # fmt: skip
        requested = Requested(req.template.subject, _requested_extensions(req.template.extensions_der))
        return _Prepared(issue, self.label_ca(label), 0, requested)

    async def _kur(self, label: CmpLabel, body: CertReqBody, auth: Auth, request_id: str) -> _Prepared:
        """RFC 9483 4.1.3: signed by the certificate being updated, which must be valid and not revoked; or, from
        an RA trusted with accept_ra_verified (5.2.3), on behalf of the device, naming it in oldCertID."""
        req = self._one(body, "kur")
        signer = auth.signer
        named = req.old_cert_id()
        old: OwnCertificate
        if signer is None:
            raise CmpError("a key update must be signed with the certificate it updates (RFC 9483 4.1.3)",
                           fail_info=FailInfo.WRONG_INTEGRITY)  # fmt: skip
        if signer.kind is SignerKind.OWN and signer.own is not None:
            old, old_cert = signer.own, signer.certificate
            if named is not None and (named[0] != x509.DirectoryName(old_cert.issuer)
                                      or named[1] != old_cert.serial_number):  # fmt: skip
                raise CmpError("oldCertID names another certificate than the one that signed the key update",
                               fail_info=FailInfo.BAD_CERT_ID)  # fmt: skip
        elif signer.kind in (SignerKind.RA, SignerKind.STATION) and label.accept_ra_verified:
            if named is None:
                raise CmpError("a key update forwarded by an RA must name the certificate in oldCertID",
                               fail_info=FailInfo.BAD_CERT_ID)  # fmt: skip
            issuer, serial = named
            ca = next((n for n, svc in self.services.items()
                       if isinstance(issuer, x509.DirectoryName) and svc.ca.certificate.subject == issuer.value),
                      None)  # fmt: skip
            if ca is None:
                raise CmpError("oldCertID names a CA that is not one of this appliance's",
                               fail_info=FailInfo.BAD_CERT_ID)  # fmt: skip
            old, old_cert = await self.trust.own_by_serial(ca, serial)
        else:
            raise CmpError("a key update must be signed with the certificate it updates (RFC 9483 4.1.3)",
                           fail_info=FailInfo.NOT_AUTHORIZED)  # fmt: skip
        self._check_pop(label, req, auth)
        subject = req.template.subject
        asked = [] if subject is None else subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)
        if any(a.value != old.device_serial for a in asked):
            raise CmpError(f"a key update keeps the device serial ({old.device_serial})",
                           fail_info=FailInfo.BAD_CERT_TEMPLATE)  # fmt: skip
        if req.template.public_key_der == old_cert.public_key().public_bytes(*_SPKI):
            raise CmpError("a key update needs a new key", fail_info=FailInfo.BAD_CERT_TEMPLATE)
        if old.ca not in self.services:
            raise CmpError(f"CA {old.ca} does not issue here any more", fail_info=FailInfo.NOT_AUTHORIZED)
        issue = IssueRequest(old.device_serial, b"", label.station, request_id, old.profile,
                             public_key_der=req.template.public_key_der, replaces=old.cert_serial,
                             front_end="cmp")  # fmt: skip
        requested = Requested(subject, _requested_extensions(req.template.extensions_der))
        return _Prepared(issue, old.ca, 0, requested)

    # -- the core's answer ----------------------------------------------------------------------------------------
    async def issue(self, pending: Transaction) -> Answer:
        """Ask the core (again, for a pollReq) and answer: the certificate, or "waiting" in RA mode. Raises
        CmpError when the core refuses."""
        assert pending.issue is not None
        rep_type, req_id = pending.rep_type, pending.cert_req_id
        service = self.services[pending.ca]
        try:
            result = await asyncio.shield(service.issue(pending.issue))
        except IssuancePending as exc:
            # RA mode: the upstream CA issues. The transaction stays open for pollReq (RFC 9483 4.4).
            pending.ra_request = exc.request
            pending.expires = self.clock() + self.settings.confirm_wait_s
            waiting = CertRepBody((CertResponse(req_id, PKIStatusInfo.waiting(exc.message)),))
            return Answer(rep_type, waiting, pending=pending)
        except (IssuanceRefused, IssuanceFailed) as exc:
            raise CmpError(exc.message, fail_info=fail_info_for_error(exc), code=exc.code) from None
        self.stats["issued"] += 1
        cert = x509.load_der_x509_certificate(result.certificate)
        chain = tuple(x509.load_der_x509_certificate(c) for c in result.chain)
        ca_pubs = (chain[-1],) if rep_type is BodyType.IP and pending.mac and chain else ()
        changed = pending.requested.modifications(cert)
        status = PKIStatusInfo.accepted()
        if changed:
            text = "built from the profile: " + "; ".join(changed)
            status = PKIStatusInfo(PKIStatus.GRANTED_WITH_MODS, (text[:500],))
        rep = CertRepBody((CertResponse(req_id, status, cert),), ca_pubs)
        if pending.implicit:
            await self._confirm(
                pending, result.upstream, result.issuance_id, result.cert_serial, result.certificate
            )
            return Answer(rep_type, rep, implicit=True, extra_certs=chain)
        pending.certificate, pending.cert_serial = cert, result.cert_serial
        pending.ra_request = result.issuance_id if result.upstream else None
        pending.expires = self.clock() + self.settings.confirm_wait_s
        return Answer(rep_type, rep, extra_certs=chain, pending=pending)

    async def _confirm(
        self, pending: Transaction, upstream: bool, ra_request: int | None, cert_serial: str, der: bytes
    ) -> None:
        service = self.services[pending.ca]
        if upstream and ra_request is not None:
            await service.confirm_upstream(ra_request, hashlib.sha256(der).digest())
        else:
            await service.confirm(cert_serial, hashlib.sha256(der).digest())
            if (
                pending.issue is not None
                and pending.issue.replaces is not None
                and self.on_revoked is not None
            ):
                self.on_revoked()  # a key update may have revoked the certificate it replaced
        self.stats["confirmed"] += 1

    # -- follow-ups ---------------------------------------------------------------------------------------------------
    async def poll(self, body: PollReqBody, pending: Transaction, retry_after_s: float | None) -> Answer:
        """pollReq on a transaction waiting for the upstream CA: pollRep while it still waits, else the answer
        (ip / cp with the certificate, or with status rejection when the upstream refused)."""
        if body.cert_req_ids != (pending.cert_req_id,):
            raise CmpError(f"pollReq names certReqId(s) {list(body.cert_req_ids)}, this transaction has"
                           f" {pending.cert_req_id}", fail_info=FailInfo.BAD_CERT_ID)  # fmt: skip
        try:
            answer = await self.issue(pending)
        except CmpError as exc:
            return rejection(pending.rep_type, pending.cert_req_id, exc)
        if isinstance(answer.body, CertRepBody) and answer.body.responses[0].certificate is None:
            after = max(1, round(retry_after_s or 5.0))
            entry = PollRepEntry(pending.cert_req_id, after, ("the upstream CA has not issued yet",))
            return Answer(BodyType.POLLREP, PollRepBody((entry,)), pending=answer.pending)
        return answer

    async def cert_conf(self, body: CertConfBody, pending: Transaction) -> Answer:
        """RFC 9483 4.1.1 / 5.1.2: one CertStatus for the certificate of this transaction."""
        if len(body.statuses) != 1:
            raise CmpError("certConf must carry exactly one CertStatus", fail_info=FailInfo.BAD_REQUEST)
        (status,) = body.statuses
        assert (
            pending.certificate is not None
        )  # the responder routes certConf only to a certificate's transaction
        if status.cert_req_id != pending.cert_req_id:
            raise CmpError(f"certReqId {status.cert_req_id} was not issued in this transaction (it has"
                           f" {pending.cert_req_id})", fail_info=FailInfo.BAD_CERT_ID)  # fmt: skip
        info = status.status_info
        if status.accepted and info is not None and info.fail_info:
            raise CmpError("certConf says accepted and carries a failInfo: which is it?",
                           fail_info=FailInfo.BAD_REQUEST)  # fmt: skip
        if not status.matches(pending.certificate):
            raise CmpError("certHash does not match the issued certificate", fail_info=FailInfo.BAD_CERT_ID)
        if status.accepted:
            der = pending.certificate.public_bytes(_DER)
            await self._confirm(pending, pending.ra_request is not None, pending.ra_request, pending.cert_serial,
                                der)  # fmt: skip
        else:
            log.warning("CMP client rejected certificate %s (label %s); it stays unconfirmed",
                        pending.cert_serial, pending.label)  # fmt: skip
        return Answer(BodyType.PKICONF, PkiConfBody())
