"""Typed, frozen views of CMP messages (RFC 9810 / RFC 9480 PKIMessage).

Parsed messages keep the bytes they came in (`PKIMessage.der`, `header_der`, `body_der`, each request's
`cert_request_der`, each nested item's `der`): protection and proof-of-possession are verified over those,
never over a re-encoding. Built messages carry the bytes we produced in the same fields.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from appliance.cmp import _der, oids
from appliance.cmp.errors import CmpError, FailInfo

PVNO_CMP2000 = 2
PVNO_CMP2021 = 3


class BodyType(enum.IntEnum):
    """PKIBody choice numbers (the context tag of the body)."""

    IR = 0
    IP = 1
    CR = 2
    CP = 3
    P10CR = 4
    POPDECC = 5
    POPDECR = 6
    KUR = 7
    KUP = 8
    KRR = 9
    KRP = 10
    RR = 11
    RP = 12
    CCR = 13
    CCP = 14
    CKUANN = 15
    CANN = 16
    RANN = 17
    CRLANN = 18
    PKICONF = 19
    NESTED = 20
    GENM = 21
    GENP = 22
    ERROR = 23
    CERTCONF = 24
    POLLREQ = 25
    POLLREP = 26

    @property
    def asn1_name(self) -> str:
        return _BODY_NAMES.get(self, self.name.lower())


_BODY_NAMES = {BodyType.PKICONF: "pkiconf", BodyType.CERTCONF: "certConf", BodyType.POLLREQ: "pollReq",
               BodyType.POLLREP: "pollRep"}  # fmt: skip

CERT_REQUEST_BODIES = frozenset({BodyType.IR, BodyType.CR, BodyType.KUR, BodyType.CCR, BodyType.KRR})
CERT_RESPONSE_BODIES = frozenset({BodyType.IP, BodyType.CP, BodyType.KUP, BodyType.CCP})


class PKIStatus(enum.IntEnum):
    ACCEPTED = 0
    GRANTED_WITH_MODS = 1
    REJECTION = 2
    WAITING = 3
    REVOCATION_WARNING = 4
    REVOCATION_NOTIFICATION = 5
    KEY_UPDATE_WARNING = 6


@dataclass(frozen=True)
class AlgorithmIdentifier:
    oid: str
    parameters: bytes | None = None
    """The complete DER TLV of the parameters as received, or None when absent."""


@dataclass(frozen=True)
class InfoTypeAndValue:
    oid: str
    value: bytes | None = None
    """The complete DER TLV of infoValue, or None when absent."""


@dataclass(frozen=True)
class PKIHeader:
    """PKIHeader. The generalInfo items the appliance acts on have typed fields; `general_info` holds the
    others, in order. The three typed ones are written first when a header is encoded."""

    sender: x509.GeneralName
    recipient: x509.GeneralName
    pvno: int = PVNO_CMP2000
    message_time: datetime | None = None
    protection_alg: AlgorithmIdentifier | None = None
    sender_kid: bytes | None = None
    recip_kid: bytes | None = None
    transaction_id: bytes | None = None
    sender_nonce: bytes | None = None
    recip_nonce: bytes | None = None
    free_text: tuple[str, ...] = ()
    implicit_confirm: bool = False
    confirm_wait_time: datetime | None = None
    cert_profile: tuple[str, ...] = ()
    general_info: tuple[InfoTypeAndValue, ...] = ()


@dataclass(frozen=True)
class PKIStatusInfo:
    status: PKIStatus
    status_string: tuple[str, ...] = ()
    fail_info: frozenset[FailInfo] = frozenset()

    @classmethod
    def accepted(cls) -> PKIStatusInfo:
        return cls(PKIStatus.ACCEPTED)

    @classmethod
    def waiting(cls, text: str = "") -> PKIStatusInfo:
        return cls(PKIStatus.WAITING, (text,) if text else ())

    @classmethod
    def rejection(cls, fail_info: FailInfo, text: str = "") -> PKIStatusInfo:
        return cls(PKIStatus.REJECTION, (text,) if text else (), frozenset({fail_info}))

    @classmethod
    def from_error(cls, error: CmpError) -> PKIStatusInfo:
        return cls.rejection(error.fail_info, error.message)


def _load_public_key(spki_der: bytes) -> PublicKeyTypes:
    try:
        return serialization.load_der_public_key(spki_der)
    except (ValueError, UnsupportedAlgorithm):
        raise CmpError("the public key in the request does not decode as a SubjectPublicKeyInfo of an algorithm"
                       " this appliance supports", fail_info=FailInfo.BAD_CERT_TEMPLATE) from None  # fmt: skip


@dataclass(frozen=True)
class CertTemplate:
    """The CertTemplate fields the appliance uses. `extensions_der` is kept but never trusted: certificates are
    built from the profile."""

    subject: x509.Name | None = None
    public_key_der: bytes | None = None
    """SubjectPublicKeyInfo DER (CertTemplate carries it [6] IMPLICIT; this is the universal SEQUENCE)."""
    issuer: x509.Name | None = None
    serial_number: int | None = None
    extensions_der: bytes | None = None

    def public_key(self) -> PublicKeyTypes:
        if self.public_key_der is None:
            raise CmpError("the certificate template has no public key", fail_info=FailInfo.BAD_CERT_TEMPLATE)
        return _load_public_key(self.public_key_der)


class PopKind(enum.Enum):
    NONE = "none"
    RA_VERIFIED = "raVerified"
    SIGNATURE = "signature"
    KEY_ENCIPHERMENT = "keyEncipherment"
    KEY_AGREEMENT = "keyAgreement"


@dataclass(frozen=True)
class CertReqMessage:
    """One CertReqMsg of an ir/cr/kur. `cert_request_der` is the CertRequest as received: the POP signature
    (without poposkInput) is over exactly these bytes."""

    cert_req_id: int
    template: CertTemplate
    pop: PopKind = PopKind.NONE
    pop_alg: AlgorithmIdentifier | None = None
    pop_signature: bytes | None = None
    pop_has_input: bool = False
    controls: tuple[InfoTypeAndValue, ...] = ()
    cert_request_der: bytes = b""

    def old_cert_id(self) -> tuple[x509.GeneralName, int] | None:
        """The regCtrl oldCertID control (RFC 4211 6.5, RFC 9483 4.1.3: the certificate a kur updates) as
        (issuer, serialNumber); None when absent; CmpError(badDataFormat) when malformed."""
        from appliance.cmp._names import general_name_from_der

        found = [c for c in self.controls if c.oid == oids.REG_CTRL_OLD_CERT_ID]
        if not found:
            return None
        if len(found) > 1 or found[0].value is None:
            raise CmpError("oldCertID must be given once, with a value", fail_info=FailInfo.BAD_REQUEST)
        der = found[0].value
        try:
            top = _der.read_frame(der, 0, len(der))
            parts = _der.children(der, top)
            if top.tag != 0x30 or top.end != len(der) or len(parts) != 2 or parts[1].tag != 0x02:
                raise _der.Malformed("CertId ::= SEQUENCE { issuer GeneralName, serialNumber INTEGER }")
            issuer = general_name_from_der(der[parts[0].start : parts[0].end])
            serial = _der.integer_value(der, parts[1])
        except ValueError as exc:
            detail = str(exc) if isinstance(exc, _der.Malformed) else "not a DER CertId (RFC 4211 6.5)"
            raise CmpError(f"oldCertID: {detail}", fail_info=FailInfo.BAD_DATA_FORMAT) from None
        return issuer, serial

    def verify_pop(self) -> None:
        """Check a signature POP with the template's own public key; CmpError(badPOP) otherwise.
        raVerified is NOT accepted here: whether a peer may claim it is an authorisation decision."""
        if self.pop is not PopKind.SIGNATURE or self.pop_alg is None or self.pop_signature is None:
            raise CmpError(
                f"proof of possession {self.pop.value} is not a signature", fail_info=FailInfo.BAD_POP
            )
        if self.pop_has_input:
            raise CmpError("POPOSigningKey with poposkInput is not supported", fail_info=FailInfo.BAD_POP)
        try:
            verify_signature_with(self.template.public_key(), self.pop_alg, self.pop_signature,
                                  self.cert_request_der)  # fmt: skip
        except CmpError as exc:
            raise CmpError(f"proof of possession failed: {exc.message}", fail_info=FailInfo.BAD_POP) from None


@dataclass(frozen=True)
class CertReqBody:
    """ir, cr, kur, ccr, krr: CertReqMessages."""

    requests: tuple[CertReqMessage, ...]


@dataclass(frozen=True)
class P10crBody:
    csr: x509.CertificateSigningRequest


@dataclass(frozen=True)
class CertResponse:
    cert_req_id: int
    status: PKIStatusInfo
    certificate: x509.Certificate | None = None
    rsp_info: bytes | None = None


@dataclass(frozen=True)
class CertRepBody:
    """ip, cp, kup, ccp: CertRepMessage. Encrypted certificates are refused when parsing."""

    responses: tuple[CertResponse, ...]
    ca_pubs: tuple[x509.Certificate, ...] = ()


_HASH_OIDS: dict[str, type[hashes.HashAlgorithm]] = {
    oids.SHA256: hashes.SHA256,
    oids.SHA384: hashes.SHA384,
    oids.SHA512: hashes.SHA512,
}
_OID_FOR_HASH = {"sha256": oids.SHA256, "sha384": oids.SHA384, "sha512": oids.SHA512}


def cert_hash(cert: x509.Certificate, hash_alg: AlgorithmIdentifier | None = None) -> bytes:
    """certHash of certConf (RFC 9810 5.3.18): with hashAlg if given, else the certificate's signature hash."""
    if hash_alg is not None:
        algorithm: hashes.HashAlgorithm = _hash_for(hash_alg.oid)
    else:
        sig_hash = cert.signature_hash_algorithm
        if sig_hash is None:
            raise CmpError("certificate signed without a hash (EdDSA): certConf needs hashAlg",
                           fail_info=FailInfo.BAD_ALG)  # fmt: skip
        algorithm = sig_hash
    return cert.fingerprint(algorithm)


def _hash_for(oid: str) -> hashes.HashAlgorithm:
    cls = _HASH_OIDS.get(oid)
    if cls is None:
        raise CmpError(f"hash algorithm {oid} is not supported", fail_info=FailInfo.BAD_ALG)
    return cls()


@dataclass(frozen=True)
class CertStatus:
    cert_hash: bytes
    cert_req_id: int
    status_info: PKIStatusInfo | None = None
    hash_alg: AlgorithmIdentifier | None = None

    @classmethod
    def for_certificate(
        cls, cert: x509.Certificate, cert_req_id: int = 0, status_info: PKIStatusInfo | None = None
    ) -> CertStatus:
        """certHash with the certificate's signature hash; for EdDSA certificates SHA-512 in hashAlg
        (which makes the certConf cmp2021, pvno 3)."""
        hash_alg = None
        if cert.signature_hash_algorithm is None:
            hash_alg = AlgorithmIdentifier(oids.SHA512)
        return cls(cert_hash(cert, hash_alg), cert_req_id, status_info, hash_alg)

    def matches(self, cert: x509.Certificate) -> bool:
        return cert_hash(cert, self.hash_alg) == self.cert_hash

    @property
    def accepted(self) -> bool:
        return self.status_info is None or self.status_info.status in (
            PKIStatus.ACCEPTED,
            PKIStatus.GRANTED_WITH_MODS,
        )


@dataclass(frozen=True)
class CertConfBody:
    statuses: tuple[CertStatus, ...]


@dataclass(frozen=True)
class PkiConfBody:
    pass


@dataclass(frozen=True)
class PollReqBody:
    cert_req_ids: tuple[int, ...]


@dataclass(frozen=True)
class PollRepEntry:
    cert_req_id: int
    check_after: int
    reason: tuple[str, ...] = ()


@dataclass(frozen=True)
class PollRepBody:
    entries: tuple[PollRepEntry, ...]


@dataclass(frozen=True)
class GenBody:
    """genm / genp: a sequence of InfoTypeAndValue."""

    items: tuple[InfoTypeAndValue, ...]

    def ca_certs(self) -> tuple[x509.Certificate, ...] | None:
        """The id-it-caCerts value (RFC 9480 4.3): None if the item is absent, () if it has no value
        (a genm asking for it, or a genp saying there are none)."""
        for item in self.items:
            if item.oid != oids.IT_CA_CERTS:
                continue
            if item.value is None:
                return ()
            return certificates_from_sequence(item.value, "caCerts")
        return None


@dataclass(frozen=True)
class ErrorBody:
    status: PKIStatusInfo
    error_code: int | None = None
    error_details: tuple[str, ...] = ()


@dataclass(frozen=True)
class RevDetails:
    """One revocation request (RFC 9483 4.2): the certificate by issuer and serial, and an optional reason.
    `subject` and `public_key_der`, when the template carries them, must be those of that certificate;
    `reason_count` is how many CRL reason codes crlEntryDetails held (RFC 9483 4.2: exactly one)."""

    issuer: x509.Name | None
    serial_number: int | None
    reason: x509.ReasonFlags | None = None
    subject: x509.Name | None = None
    public_key_der: bytes | None = None
    reason_count: int = field(default=0, compare=False)


@dataclass(frozen=True)
class RrBody:
    requests: tuple[RevDetails, ...]


@dataclass(frozen=True)
class RevokedCertId:
    issuer: x509.GeneralName
    serial_number: int


@dataclass(frozen=True)
class RpBody:
    statuses: tuple[PKIStatusInfo, ...]
    rev_certs: tuple[RevokedCertId, ...] = ()


@dataclass(frozen=True)
class NestedItem:
    """One inner message of a nested body: its exact bytes, and either the parsed message or why not."""

    der: bytes
    message: PKIMessage | None = None
    error: CmpError | None = field(default=None, compare=False)


@dataclass(frozen=True)
class NestedBody:
    items: tuple[NestedItem, ...]

    @classmethod
    def of(cls, *messages: PKIMessage) -> NestedBody:
        return cls(tuple(NestedItem(m.der, m) for m in messages))

    @property
    def messages(self) -> tuple[PKIMessage, ...]:
        """The inner messages that parsed (check `items` for the ones that did not)."""
        return tuple(item.message for item in self.items if item.message is not None)


@dataclass(frozen=True)
class OtherBody:
    """A body type this layer does not model (popdecc, krp, ckuann, ...): only its bytes."""

    content_der: bytes


Body = (
    CertReqBody
    | P10crBody
    | CertRepBody
    | CertConfBody
    | PkiConfBody
    | PollReqBody
    | PollRepBody
    | GenBody
    | ErrorBody
    | RrBody
    | RpBody
    | NestedBody
    | OtherBody
)

BODY_CLASS: dict[BodyType, type[Body]] = {
    **dict.fromkeys(CERT_REQUEST_BODIES, CertReqBody),
    **dict.fromkeys(CERT_RESPONSE_BODIES, CertRepBody),
    BodyType.P10CR: P10crBody,
    BodyType.CERTCONF: CertConfBody,
    BodyType.PKICONF: PkiConfBody,
    BodyType.POLLREQ: PollReqBody,
    BodyType.POLLREP: PollRepBody,
    BodyType.GENM: GenBody,
    BodyType.GENP: GenBody,
    BodyType.ERROR: ErrorBody,
    BodyType.RR: RrBody,
    BodyType.RP: RpBody,
    BodyType.NESTED: NestedBody,
}


@dataclass(frozen=True)
class PKIMessage:
    header: PKIHeader
    body_type: BodyType
    body: Body
    protection: bytes | None
    extra_certs: tuple[x509.Certificate, ...]
    der: bytes
    """The whole message: as received (parsed) or as sent (built)."""
    header_der: bytes
    body_der: bytes
    """The PKIBody TLV, including its context tag."""

    @property
    def protected_part(self) -> bytes:
        """DER of ProtectedPart ::= SEQUENCE { header, body }, from the header and body bytes as they are."""
        return _der.sequence(self.header_der, self.body_der)


@dataclass(frozen=True)
class Limits:
    """Bounds applied while parsing, before any cryptography runs."""

    max_message_size: int = 256 * 1024
    max_der_depth: int = 48
    max_nesting_depth: int = 1
    """How many nested layers may wrap a message: 1 allows an RA's nested message, not a nested in a nested."""
    max_batch_size: int = 100
    """Inner messages in one nested body."""
    max_requests: int = 100
    """CertReqMsgs in one ir/cr, statuses in one certConf, entries in pollReq/rr, and similar lists."""
    max_extra_certs: int = 16


DEFAULT_LIMITS = Limits()


def certificates_from_sequence(der: bytes, what: str) -> tuple[x509.Certificate, ...]:
    """A SEQUENCE OF Certificate given as its complete TLV."""
    try:
        top = _der.read_frame(der, 0, len(der))
        if top.tag != 0x30 or top.end != len(der):
            raise ValueError("not a single SEQUENCE")
        return tuple(x509.load_der_x509_certificate(der[c.start : c.end]) for c in _der.children(der, top))
    except ValueError:
        raise CmpError(
            f"{what}: not a SEQUENCE of DER X.509 certificates", fail_info=FailInfo.BAD_DATA_FORMAT
        ) from None


# Signature algorithms accepted for protection and POP (RFC 9481 section 3); SHA-1 is refused.
_SIGNATURE_HASH: dict[str, type[hashes.HashAlgorithm] | None] = {
    oids.ECDSA_WITH_SHA256: hashes.SHA256,
    oids.ECDSA_WITH_SHA384: hashes.SHA384,
    oids.ECDSA_WITH_SHA512: hashes.SHA512,
    oids.SHA256_WITH_RSA: hashes.SHA256,
    oids.SHA384_WITH_RSA: hashes.SHA384,
    oids.SHA512_WITH_RSA: hashes.SHA512,
    oids.ED25519: None,
    oids.ED448: None,
}
_RSA_SIGNATURES = frozenset({oids.SHA256_WITH_RSA, oids.SHA384_WITH_RSA, oids.SHA512_WITH_RSA})
_ECDSA_SIGNATURES = frozenset({oids.ECDSA_WITH_SHA256, oids.ECDSA_WITH_SHA384, oids.ECDSA_WITH_SHA512})
SIGNATURE_ALGORITHMS = frozenset(_SIGNATURE_HASH)
_NULL = _der.null()


def verify_signature_with(
    key: PublicKeyTypes, alg: AlgorithmIdentifier, signature: bytes, data: bytes
) -> None:
    """Verify `signature` over `data`; CmpError(badAlg) for an algorithm we do not accept or that does not fit
    the key, CmpError(badMessageCheck) when the signature is wrong."""
    if alg.oid not in _SIGNATURE_HASH:
        raise CmpError(f"signature algorithm {alg.oid} is not accepted", fail_info=FailInfo.BAD_ALG)
    if alg.parameters not in (None, _NULL) or (alg.parameters == _NULL and alg.oid not in _RSA_SIGNATURES):
        raise CmpError(
            f"signature algorithm {alg.oid} with unexpected parameters", fail_info=FailInfo.BAD_ALG
        )
    hash_cls = _SIGNATURE_HASH[alg.oid]
    try:
        if alg.oid in _ECDSA_SIGNATURES and isinstance(key, ec.EllipticCurvePublicKey) and hash_cls:
            key.verify(signature, data, ec.ECDSA(hash_cls()))
        elif alg.oid in _RSA_SIGNATURES and isinstance(key, rsa.RSAPublicKey) and hash_cls:
            key.verify(signature, data, padding.PKCS1v15(), hash_cls())
        elif (alg.oid == oids.ED25519 and isinstance(key, ed25519.Ed25519PublicKey)) or (
            alg.oid == oids.ED448 and isinstance(key, ed448.Ed448PublicKey)
        ):
            key.verify(signature, data)
        else:
            raise CmpError(f"signature algorithm {alg.oid} does not fit a {type(key).__name__}",
                           fail_info=FailInfo.BAD_ALG)  # fmt: skip
    except InvalidSignature:
        raise CmpError("signature does not verify", fail_info=FailInfo.BAD_MESSAGE_CHECK) from None


def hash_oid(algorithm: hashes.HashAlgorithm) -> str:
    oid = _OID_FOR_HASH.get(algorithm.name)
    if oid is None:
        raise ValueError(f"hash {algorithm.name} has no CMP identifier here")
    return oid
