"""The client side of SCEP, small: build PKCSReq, RenewalReq and CertPoll messages and read the CertRep.

What the tests and the benchmark speak besides the real clients (micromdm's scepclient, certmonger), and a
reference for a fixture vendor: every choice a client makes is an argument here (cipher, digest, signer), so a
test can also send what a broken or hostile client would. Keys are software keys (`cryptography`).
"""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from appliance.der import sequence
from appliance.scep import cms
from appliance.scep.algorithms import AES256, LEGACY_RISKS, SHA256, AlgorithmPolicy, Cipher, Digest
from appliance.scep.oids import MessageType, PkiStatus

ClientKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
_ANY = AlgorithmPolicy(frozenset(LEGACY_RISKS))  # a client reads whatever the server chose


def self_signed(key: ClientKey, common_name: str = "SCEP client") -> x509.Certificate:
    """The throw-away certificate a client signs its first request with (RFC 8894 2.3)."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip


def issuer_and_subject(issuer: x509.Name, subject: x509.Name) -> bytes:
    """CertPoll's content (RFC 8894 3.3.3)."""
    return sequence(issuer.public_bytes(), subject.public_bytes())


def _sign(key: ClientKey, data: bytes, digest: Digest) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), digest.algorithm)
    return key.sign(data, ec.ECDSA(digest.algorithm))


def request(
    message_type: MessageType | int, payload: bytes, *, signer: x509.Certificate, key: ClientKey,
    ra: x509.Certificate, transaction_id: str, sender_nonce: bytes | None = None, cipher: Cipher = AES256,
    digest: Digest = SHA256,
) -> bytes:  # fmt: skip
    """A pkiMessage: `payload` (a CSR's DER, or IssuerAndSubject) enveloped for the RA, signed by `signer`."""
    envelope = cms.envelope(
        payload, ra, cipher, key=os.urandom(cipher.key_size), iv=os.urandom(cipher.block_size)
    )
    attributes = cms.attribute_values(
        int(message_type), transaction_id, content=envelope, digest=digest,
        sender_nonce=sender_nonce if sender_nonce is not None else os.urandom(16),
    )  # fmt: skip
    return cms.signed_data(envelope, attributes, _sign(key, attributes, digest), signer, digest, [signer])


@dataclass(frozen=True)
class Reply:
    status: PkiStatus
    fail_info: int | None
    fail_info_text: str | None
    certificates: tuple[x509.Certificate, ...]  # SUCCESS: the issued certificate first
    message: cms.SignedMessage


class ReplyError(Exception):
    """The answer is not a CertRep this client can accept."""


def read_reply(
    data: bytes, *, ra: x509.Certificate, signer: x509.Certificate, key: ClientKey, transaction_id: str,
    sender_nonce: bytes | None = None,
) -> Reply:  # fmt: skip
    """Check a CertRep as a careful client does: signed by the RA, for our transaction and nonce; decrypt the
    certificates of a SUCCESS with our key."""
    message = cms.read_signed(data, _ANY)
    if message.signer != ra:
        raise ReplyError("the answer is not signed by the RA certificate")
    if message.message_type != MessageType.CERT_REP or message.transaction_id != transaction_id:
        raise ReplyError("not a CertRep for this transaction")
    if sender_nonce is not None and message.recipient_nonce != sender_nonce:
        raise ReplyError("recipientNonce is not our senderNonce")
    status = PkiStatus(message.pki_status) if message.pki_status is not None else None
    if status is None:
        raise ReplyError("no pkiStatus")
    certificates: tuple[x509.Certificate, ...] = ()
    if status is PkiStatus.SUCCESS:
        if message.content is None or not isinstance(key, rsa.RSAPrivateKey):
            raise ReplyError("a SUCCESS without an envelope we can open")
        envelope = cms.read_envelope(message.content, signer, _ANY)
        content_key = key.decrypt(envelope.encrypted_key, padding.PKCS1v15())
        certificates = tuple(pkcs7.load_der_pkcs7_certificates(cms.decrypt_content(envelope, content_key)))
    return Reply(status, message.fail_info, message.fail_info_text, certificates, message)
