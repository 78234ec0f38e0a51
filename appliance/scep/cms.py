"""The CMS of SCEP (RFC 8894 3.1, RFC 5652): reading a pkiMessage and its pkcsPKIEnvelope, building CertRep.

Pure: bytes in, objects out; no I/O and no clock. Nothing here holds a private key: the callers decrypt the
envelope's key and sign the answer's attributes (in the HSM) between the steps.

Reading a pkiMessage (`read_signed`), in one pass and strictly:
- the framing of the whole input first (definite lengths, bounded depth, nothing after the end:
  appliance.cmp._der.scan), then strict DER (minimal lengths) while walking ContentInfo -> SignedData ->
  the one SignerInfo by hand, which keeps every element's exact bytes;
- the signed attributes are read from the bytes received, and the signature is verified over exactly those
  bytes (with the SET OF tag, RFC 5652 5.4), never over a re-encoding; messageDigest must be the digest of the
  eContent received;
- certificates and PKCS #10 requests are parsed by `cryptography`; pyasn1-alt-modules (rfc5652) reads the
  EnvelopedData and builds the answers. Certificates-only messages (GetCACert, the issued certificate) and AES
  envelopes come from `cryptography`'s PKCS #7 support; envelopes with the legacy ciphers, which it does not
  offer, are built from the rfc5652 structures.

Every error is ValueError or ScepError; the responder turns them into one answer at its boundary.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher as CryptoCipher
from cryptography.hazmat.primitives.ciphers import algorithms, modes
from cryptography.hazmat.primitives.serialization import pkcs7
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1Error
from pyasn1.type import char, univ
from pyasn1_alt_modules import rfc5280, rfc5652

from appliance import pyasn1_repr  # noqa: F401 - installs pyasn1's cheap schema repr (see there)
from appliance.cmp._der import oid_value, scan
from appliance.der import Tlv, read_children, read_tlv
from appliance.scep import oids
from appliance.scep.algorithms import (
    AES128,
    AES256,
    RSA_ENCRYPTION,
    SIGNATURE_DIGEST,
    AlgorithmPolicy,
    Cipher,
    Digest,
)
from appliance.scep.errors import FailInfo, ScepError
from appliance.signerkeys import signer_key_accepted

MAX_DEPTH = 32
MAX_CERTIFICATES = 8
MAX_ATTRIBUTES = 32
MAX_RECIPIENTS = 8
MAX_TRANSACTION_ID = 128
NONCE_SIZES = range(8, 65)  # RFC 8894 says 16 bytes; a little leeway either way, nothing absurd

_DER = serialization.Encoding.DER
_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
_PRINTABLE = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")


def _malformed(text: str) -> ScepError:
    return ScepError(text, FailInfo.BAD_REQUEST)


# -- reading, by hand where the exact bytes matter --------------------------------------------------------------------
def _kids(data: bytes, t: Tlv, tag: int, what: str) -> list[Tlv]:
    if t.tag != tag:
        raise ValueError(f"{what}: expected tag 0x{tag:02x}, found 0x{t.tag:02x}")
    return read_children(data, t)


def _only(data: bytes, t: Tlv, tag: int, what: str) -> Tlv:
    kids = _kids(data, t, tag, what)
    if len(kids) != 1:
        raise ValueError(f"{what}: expected one element, found {len(kids)}")
    return kids[0]


def _algorithm(data: bytes, t: Tlv, what: str) -> tuple[str, bytes | None]:
    """AlgorithmIdentifier: the OID and the parameters' bytes (None when absent)."""
    kids = _kids(data, t, 0x30, what)
    if not 1 <= len(kids) <= 2:
        raise ValueError(f"{what}: not an AlgorithmIdentifier")
    params = data[kids[1].start : kids[1].end] if len(kids) == 2 else None
    return oid_value(data, kids[0]), params


def _printable(value: bytes, what: str) -> str:
    t = read_tlv(value)
    if t.end != len(value) or t.tag != 0x13:
        raise ValueError(f"{what} is not a PrintableString")
    content = value[t.content : t.end]
    if not content or not set(content) <= _PRINTABLE:
        raise ValueError(f"{what} is empty or holds characters a PrintableString cannot")
    return content.decode("ascii")


def _octets(value: bytes, what: str) -> bytes:
    t = read_tlv(value)
    if t.end != len(value) or t.tag != 0x04:
        raise ValueError(f"{what} is not an OCTET STRING")
    return value[t.content : t.end]


def _utf8(value: bytes, what: str) -> str:
    t = read_tlv(value)
    if t.end != len(value) or t.tag != 0x0C:
        raise ValueError(f"{what} is not a UTF8String")
    return value[t.content : t.end].decode("utf-8")


def _oid(value: bytes) -> str:
    t = read_tlv(value)
    if t.end != len(value):
        raise ValueError("trailing bytes after an OBJECT IDENTIFIER")
    return oid_value(value, t)


def _number(value: bytes, what: str) -> int:
    text = _printable(value, what)
    if not text.isdigit() or len(text) > 3:
        raise ValueError(f"{what} is not a number")
    return int(text)


@dataclass(frozen=True)
class SignedMessage:
    """A pkiMessage whose signature verified (RFC 8894 3.2)."""

    message_type: int
    transaction_id: str
    sender_nonce: bytes | None
    recipient_nonce: bytes | None
    pki_status: int | None
    fail_info: int | None
    fail_info_text: str | None
    signer: x509.Certificate
    certificates: tuple[x509.Certificate, ...]
    digest: Digest
    content: bytes | None
    """The eContent: the pkcsPKIEnvelope (DER of a ContentInfo), or None when the message carries none."""


def _attributes(data: bytes, t: Tlv) -> dict[str, bytes]:
    """The signed attributes as {type: the one value's DER}; each type at most once, with exactly one value."""
    found: dict[str, bytes] = {}
    kids = read_children(data, t)
    if not kids or len(kids) > MAX_ATTRIBUTES:
        raise ValueError(f"between 1 and {MAX_ATTRIBUTES} signed attributes are accepted")
    for attribute in kids:
        parts = _kids(data, attribute, 0x30, "an attribute")
        if len(parts) != 2:
            raise ValueError("an attribute is not SEQUENCE { type, values }")
        kind = oid_value(data, parts[0])
        values = _kids(data, parts[1], 0x31, f"attribute {kind}")
        if len(values) != 1:
            raise ValueError(f"attribute {kind} must carry exactly one value")
        if kind in found:
            raise ValueError(f"attribute {kind} appears twice")
        found[kind] = data[values[0].start : values[0].end]
    return found


def _find_signer(
    data: bytes, sid: Tlv, version: int, certificates: Sequence[x509.Certificate]
) -> x509.Certificate:
    if version == 1:
        issuer_t, serial_t = _kids(data, sid, 0x30, "issuerAndSerialNumber")
        issuer = data[issuer_t.start : issuer_t.end]
        serial = read_tlv(data[serial_t.start : serial_t.end])
        raw = data[serial_t.start : serial_t.end][serial.content :]
        if serial.tag != 0x02 or not raw:
            raise ValueError("the signer's serial number is not an INTEGER")
        number = int.from_bytes(raw, "big", signed=True)
        for cert in certificates:
            if cert.serial_number == number and cert.issuer.public_bytes() == issuer:
                return cert
    elif version == 3:
        if sid.tag != 0x80:
            raise ValueError("a version 3 SignerInfo names its signer by subjectKeyIdentifier [0]")
        ski = data[sid.content : sid.end]
        for cert in certificates:
            try:
                if cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest == ski:
                    return cert
            except x509.ExtensionNotFound:
                continue
    else:
        raise ValueError(f"SignerInfo version {version} is not 1 or 3")
    raise ScepError("the signer's certificate is not in the message", FailInfo.BAD_MESSAGE_CHECK)


def _verify(
    signer: x509.Certificate, signature: bytes, signed: bytes, digest: Digest, algorithm: str
) -> None:
    kind = "rsa" if algorithm == RSA_ENCRYPTION else None
    if kind is None:
        kind, named = SIGNATURE_DIGEST.get(algorithm, (None, None))
        if kind is None:
            raise ScepError(f"signature algorithm {algorithm} is not supported", FailInfo.BAD_ALG)
        if named != digest.name:
            raise ScepError(
                f"signature algorithm {algorithm} does not use the digest algorithm {digest.name}",
                FailInfo.BAD_ALG,
            )
    try:
        key = signer.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise ScepError("the signer certificate's public key is not one this appliance can use",
                        FailInfo.BAD_ALG) from None  # fmt: skip
    # Bounded before anything is verified with it: the cost of a verification is the key's, and the peer chose
    # it (appliance/signerkeys.py). SCEP signers are RSA (the answer is encrypted to the key) or EC.
    if not signer_key_accepted(key, edwards=False):
        raise ScepError(f"the signer's key is not accepted: {SCEP_SIGNER_KEYS_TEXT}", FailInfo.BAD_ALG)
    try:
        if kind == "rsa" and isinstance(key, rsa.RSAPublicKey):
            key.verify(signature, signed, padding.PKCS1v15(), digest.algorithm)
        elif kind == "ecdsa" and isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, signed, ec.ECDSA(digest.algorithm))
        else:
            raise ScepError("the signature algorithm does not fit the signer's key", FailInfo.BAD_ALG)
    except (InvalidSignature, UnsupportedAlgorithm, ValueError):
        raise ScepError("the message signature does not verify", FailInfo.BAD_MESSAGE_CHECK) from None


SCEP_SIGNER_KEYS_TEXT = "RSA 2048, 3072 or 4096 bits with exponent 65537, EC P-256, P-384 or P-521"


def read_signed(data: bytes, policy: AlgorithmPolicy) -> SignedMessage:
    """Read and verify a pkiMessage. A ScepError without transaction_id means there is nobody to answer."""
    try:
        scan(data, MAX_DEPTH)
        info = _kids(data, read_tlv(data), 0x30, "ContentInfo")
        if len(info) != 2 or oid_value(data, info[0]) != oids.ID_SIGNED_DATA:
            raise ValueError("not a CMS SignedData")
        parts = _kids(data, _only(data, info[1], 0xA0, "the SignedData"), 0x30, "SignedData")
        if len(parts) < 4:
            raise ValueError("SignedData is missing fields")
        encap = _kids(data, parts[2], 0x30, "encapContentInfo")
        signer_infos = _kids(data, parts[-1], 0x31, "signerInfos")
        optional = parts[3:-1]
        if not 1 <= len(encap) <= 2 or oid_value(data, encap[0]) != oids.ID_DATA:
            raise ValueError("the encapsulated content is not id-data")
        content = None
        if len(encap) == 2:
            inner = _only(data, encap[1], 0xA0, "eContent")
            if inner.tag != 0x04:
                raise ValueError("eContent is not a primitive OCTET STRING")
            content = data[inner.content : inner.end]
        if len(signer_infos) != 1:
            raise ValueError(f"exactly one SignerInfo is accepted, found {len(signer_infos)}")
        fields = _kids(data, signer_infos[0], 0x30, "SignerInfo")
        if len(fields) not in (6, 7) or fields[3].tag != 0xA0:
            raise ValueError("the SignerInfo has no signed attributes")
        attrs = _attributes(data, fields[3])
    except ValueError as exc:
        raise _malformed(f"not a SCEP pkiMessage: {exc}"[:200]) from None
    try:
        tid = _printable(attrs[oids.TRANSACTION_ID], "transactionID")
        nonce = _octets(attrs[oids.SENDER_NONCE], "senderNonce") if oids.SENDER_NONCE in attrs else None
    except KeyError:
        raise _malformed("the signed attributes carry no transactionID") from None
    except ValueError as exc:
        raise _malformed(f"no usable transactionID and senderNonce: {exc}"[:200]) from None
    if len(tid) > MAX_TRANSACTION_ID:
        raise _malformed(f"transactionID longer than {MAX_TRANSACTION_ID} characters")
    if nonce is not None and len(nonce) not in NONCE_SIZES:
        raise _malformed(f"senderNonce of {len(nonce)} bytes (16 expected)")
    try:
        return _read_rest(data, parts, optional, fields, attrs, tid, nonce, content, policy)
    except ScepError as exc:
        raise exc.addressed(tid, nonce or b"") from None
    except ValueError as exc:
        raise _malformed(f"not a SCEP pkiMessage: {exc}"[:200]).addressed(tid, nonce or b"") from None


def _read_rest(
    data: bytes, parts: list[Tlv], optional: list[Tlv], fields: list[Tlv], attrs: dict[str, bytes],
    tid: str, nonce: bytes | None, content: bytes | None, policy: AlgorithmPolicy,
) -> SignedMessage:  # fmt: skip
    certificates: list[x509.Certificate] = []
    for t in optional:
        if t.tag == 0xA0:
            for c in read_children(data, t):
                if c.tag != 0x30:
                    raise ValueError("only X.509 certificates are accepted in SignedData.certificates")
                if len(certificates) == MAX_CERTIFICATES:
                    raise ValueError(f"more than {MAX_CERTIFICATES} certificates")
                certificates.append(x509.load_der_x509_certificate(data[c.start : c.end]))
        elif t.tag != 0xA1:  # crls: not used by SCEP requests, ignored
            raise ValueError(f"unexpected SignedData field 0x{t.tag:02x}")
    version_t, sid, digest_t, signed_t, sigalg_t, signature_t = fields[:6]
    version_raw = data[version_t.content : version_t.end]
    if version_t.tag != 0x02 or len(version_raw) != 1:
        raise ValueError("SignerInfo version is not a small INTEGER")
    digest_oid, _ = _algorithm(data, digest_t, "digestAlgorithm")
    digest = policy.digest(digest_oid)
    signature_alg, _ = _algorithm(data, sigalg_t, "signatureAlgorithm")
    if signature_t.tag != 0x04:
        raise ValueError("the signature is not an OCTET STRING")
    signer = _find_signer(data, sid, version_raw[0], certificates)
    message_type = _number(attrs[oids.MESSAGE_TYPE], "messageType") if oids.MESSAGE_TYPE in attrs else None
    if message_type is None:
        raise ValueError("no messageType attribute")
    if oids.CONTENT_TYPE not in attrs or _oid(attrs[oids.CONTENT_TYPE]) != oids.ID_DATA:
        raise ValueError("the contentType attribute is not id-data")
    if oids.MESSAGE_DIGEST not in attrs:
        raise ValueError("no messageDigest attribute")
    h = hashes.Hash(digest.algorithm)
    h.update(content or b"")
    if not hmac.compare_digest(h.finalize(), _octets(attrs[oids.MESSAGE_DIGEST], "messageDigest")):
        raise ScepError("messageDigest is not the digest of the content", FailInfo.BAD_MESSAGE_CHECK)
    signed = b"\x31" + data[signed_t.start + 1 : signed_t.end]  # RFC 5652 5.4: the SET OF tag, same bytes
    _verify(signer, data[signature_t.content : signature_t.end], signed, digest, signature_alg)
    recipient_nonce = (
        _octets(attrs[oids.RECIPIENT_NONCE], "recipientNonce") if oids.RECIPIENT_NONCE in attrs else None
    )
    status = _number(attrs[oids.PKI_STATUS], "pkiStatus") if oids.PKI_STATUS in attrs else None
    fail_info = _number(attrs[oids.FAIL_INFO], "failInfo") if oids.FAIL_INFO in attrs else None
    text = _utf8(attrs[oids.FAIL_INFO_TEXT], "failInfoText") if oids.FAIL_INFO_TEXT in attrs else None
    return SignedMessage(message_type, tid, nonce, recipient_nonce, status, fail_info, text, signer,
                         tuple(certificates), digest, content)  # fmt: skip


# -- the envelope -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Envelope:
    """A pkcsPKIEnvelope for one of our recipients, not yet decrypted."""

    cipher: Cipher
    iv: bytes
    encrypted_key: bytes
    ciphertext: bytes


def _issuer_and_serial(cert: x509.Certificate) -> rfc5652.IssuerAndSerialNumber:
    ias = rfc5652.IssuerAndSerialNumber()
    ias["issuer"] = der_decoder.decode(cert.issuer.public_bytes(), asn1Spec=rfc5280.Name())[0]
    ias["serialNumber"] = cert.serial_number
    return ias


def _names(cert: x509.Certificate, rid: rfc5652.RecipientIdentifier) -> bool:
    if rid.getName() == "issuerAndSerialNumber":
        ias = rid["issuerAndSerialNumber"]
        return bool(
            int(ias["serialNumber"]) == cert.serial_number
            and der_encoder.encode(ias["issuer"]) == cert.issuer.public_bytes()
        )
    try:
        ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return False
    return bytes(rid["subjectKeyIdentifier"]) == ski


def read_envelope(content: bytes, recipient: x509.Certificate, policy: AlgorithmPolicy) -> Envelope:
    """The EnvelopedData (RFC 5652 6) of a request, addressed to `recipient` by key transport."""
    try:
        scan(content, MAX_DEPTH)
        info, rest = der_decoder.decode(content, asn1Spec=rfc5652.ContentInfo())
        if rest or info["contentType"] != rfc5652.id_envelopedData:
            raise ValueError("the pkcsPKIEnvelope is not an EnvelopedData")
        env, rest = der_decoder.decode(info["content"], asn1Spec=rfc5652.EnvelopedData())
        if rest:
            raise ValueError("trailing bytes after the EnvelopedData")
    except ValueError as exc:  # ours: says what is wrong
        raise ScepError(f"the pkcsPKIEnvelope does not decode: {exc}"[:200], FailInfo.BAD_REQUEST) from None
    except (PyAsn1Error, TypeError):  # the decoder's: its text names its internals, not the client's mistake
        raise ScepError("the pkcsPKIEnvelope does not decode: not DER of a CMS ContentInfo holding an EnvelopedData"
                        " (RFC 8894 3.2.2)", FailInfo.BAD_REQUEST) from None  # fmt: skip
    recipients = env["recipientInfos"]
    if len(recipients) > MAX_RECIPIENTS:
        raise ScepError(f"more than {MAX_RECIPIENTS} recipients", FailInfo.BAD_REQUEST)
    ours = None
    for info in recipients:
        if info.getName() == "ktri" and _names(recipient, info["ktri"]["rid"]):
            ours = info["ktri"]
            break
    if ours is None:
        raise ScepError(
            "the envelope is not encrypted to this appliance's RA certificate (GetCACert gives it)",
            FailInfo.BAD_MESSAGE_CHECK,
        )
    if str(ours["keyEncryptionAlgorithm"]["algorithm"]) != oids.RSA_ENCRYPTION:
        raise ScepError(
            "the content key must be encrypted with rsaEncryption (PKCS #1 v1.5)", FailInfo.BAD_ALG
        )
    eci = env["encryptedContentInfo"]
    if eci["contentType"] != rfc5652.id_data:
        raise ScepError("the encrypted content is not id-data", FailInfo.BAD_REQUEST)
    cipher = policy.cipher(str(eci["contentEncryptionAlgorithm"]["algorithm"]))
    params = eci["contentEncryptionAlgorithm"]["parameters"]
    try:
        iv_t = der_decoder.decode(bytes(params), asn1Spec=univ.OctetString())
        iv = bytes(iv_t[0])
        if iv_t[1]:
            raise ValueError("trailing bytes")
    except (PyAsn1Error, ValueError, TypeError):
        raise ScepError("the content encryption parameters are not an IV", FailInfo.BAD_REQUEST) from None
    ciphertext = bytes(eci["encryptedContent"]) if eci["encryptedContent"].isValue else b""
    if len(iv) != cipher.block_size or not ciphertext or len(ciphertext) % cipher.block_size:
        raise ScepError("the IV or the encrypted content has the wrong length", FailInfo.BAD_REQUEST)
    return Envelope(cipher, iv, bytes(ours["encryptedKey"]), ciphertext)


def _crypto(cipher: Cipher, key: bytes) -> algorithms.AES | TripleDES:
    if cipher.legacy is None:
        return algorithms.AES(key)
    return TripleDES(key * 3 if len(key) == 8 else key)  # DES is 3DES with one key three times


def decrypt_content(envelope: Envelope, key: bytes) -> bytes:
    """The content, with `key` the content-encryption key the recipient's private key recovered. ValueError when
    it does not decrypt (a wrong key shows as a bad padding)."""
    cipher = envelope.cipher
    if len(key) != cipher.key_size:
        raise ValueError("the content key has the wrong length")
    decryptor = CryptoCipher(_crypto(cipher, key), modes.CBC(envelope.iv)).decryptor()
    plain = decryptor.update(envelope.ciphertext) + decryptor.finalize()
    pad = plain[-1]
    if not 1 <= pad <= cipher.block_size or plain[-pad:] != bytes([pad]) * pad:
        raise ValueError("bad padding")
    return plain[:-pad]


# -- building -----------------------------------------------------------------------------------------------------------
def certs_only(certificates: Sequence[x509.Certificate]) -> bytes:
    """A degenerate certificates-only SignedData (RFC 8894 3.4): GetCACert, and what an envelope carries."""
    return pkcs7.serialize_certificates(list(certificates), _DER)


def _content_info(kind: univ.ObjectIdentifier, content: bytes) -> bytes:
    info = rfc5652.ContentInfo()
    info["contentType"] = kind
    info["content"] = univ.Any(content)
    return bytes(der_encoder.encode(info))


def envelope(content: bytes, recipient: x509.Certificate, cipher: Cipher, *, key: bytes, iv: bytes) -> bytes:
    """An EnvelopedData of `content` for `recipient`'s RSA key (PKCS #1 v1.5 key transport). AES-128 and AES-256
    through cryptography's PKCS7EnvelopeBuilder (its own key and IV); the others from the rfc5652 structures with
    `key` and `iv`."""
    public = recipient.public_key()
    if not isinstance(public, rsa.RSAPublicKey):
        raise ScepError(
            "the envelope is encrypted to the requester's key, which must be RSA", FailInfo.BAD_ALG
        )
    if cipher in (AES128, AES256):
        builder = pkcs7.PKCS7EnvelopeBuilder().set_data(content).add_recipient(recipient)
        builder = builder.set_content_encryption_algorithm(
            algorithms.AES128 if cipher is AES128 else algorithms.AES256
        )
        return builder.encrypt(_DER, [pkcs7.PKCS7Options.Binary])
    if len(key) != cipher.key_size or len(iv) != cipher.block_size:
        raise ValueError("key or IV of the wrong length")
    pad = cipher.block_size - len(content) % cipher.block_size
    encryptor = CryptoCipher(_crypto(cipher, key), modes.CBC(iv)).encryptor()
    ciphertext = encryptor.update(content + bytes([pad]) * pad) + encryptor.finalize()
    ktri = rfc5652.KeyTransRecipientInfo()
    ktri["version"] = 0
    ktri["rid"]["issuerAndSerialNumber"] = _issuer_and_serial(recipient)
    ktri["keyEncryptionAlgorithm"]["algorithm"] = univ.ObjectIdentifier(oids.RSA_ENCRYPTION)
    ktri["keyEncryptionAlgorithm"]["parameters"] = univ.Any(der_encoder.encode(univ.Null("")))
    ktri["encryptedKey"] = public.encrypt(key, padding.PKCS1v15())
    env = rfc5652.EnvelopedData()
    env["version"] = 0
    info = rfc5652.RecipientInfo()
    info["ktri"] = ktri
    env["recipientInfos"].append(info)
    eci = env["encryptedContentInfo"]
    eci["contentType"] = rfc5652.id_data
    eci["contentEncryptionAlgorithm"]["algorithm"] = univ.ObjectIdentifier(cipher.oid)
    eci["contentEncryptionAlgorithm"]["parameters"] = univ.Any(der_encoder.encode(univ.OctetString(iv)))
    eci["encryptedContent"] = ciphertext
    return _content_info(rfc5652.id_envelopedData, der_encoder.encode(env))


def attribute_values(
    message_type: int, transaction_id: str, *, content: bytes | None, digest: Digest,
    sender_nonce: bytes | None = None, recipient_nonce: bytes | None = None, pki_status: int | None = None,
    fail_info: int | None = None, fail_info_text: str | None = None,
) -> bytes:  # fmt: skip
    """The DER SET OF signed attributes of a pkiMessage (what its signature covers): contentType, messageDigest
    of `content`, and the SCEP attributes given."""
    h = hashes.Hash(digest.algorithm)
    h.update(content or b"")
    values: list[tuple[str, univ.Asn1Item]] = [
        (oids.CONTENT_TYPE, rfc5652.id_data),
        (oids.MESSAGE_DIGEST, univ.OctetString(h.finalize())),
        (oids.MESSAGE_TYPE, char.PrintableString(str(message_type))),
        (oids.TRANSACTION_ID, char.PrintableString(transaction_id)),
    ]
    if sender_nonce is not None:
        values.append((oids.SENDER_NONCE, univ.OctetString(sender_nonce)))
    if recipient_nonce is not None:
        values.append((oids.RECIPIENT_NONCE, univ.OctetString(recipient_nonce)))
    if pki_status is not None:
        values.append((oids.PKI_STATUS, char.PrintableString(str(pki_status))))
    if fail_info is not None:
        values.append((oids.FAIL_INFO, char.PrintableString(str(fail_info))))
    if fail_info_text is not None:
        values.append((oids.FAIL_INFO_TEXT, char.UTF8String(fail_info_text)))
    attrs = rfc5652.SignedAttributes()
    for kind, value in values:
        attribute = rfc5652.Attribute()
        attribute["attrType"] = univ.ObjectIdentifier(kind)
        attribute["attrValues"].append(univ.Any(der_encoder.encode(value)))
        attrs.append(attribute)
    return bytes(der_encoder.encode(attrs))


def signature_algorithm(key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey, digest: Digest) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return RSA_ENCRYPTION
    return next(
        oid for oid, (kind, name) in SIGNATURE_DIGEST.items() if kind == "ecdsa" and name == digest.name
    )


def signed_data(
    content: bytes | None, attributes: bytes, signature: bytes, signer: x509.Certificate, digest: Digest,
    certificates: Sequence[x509.Certificate],
) -> bytes:  # fmt: skip
    """A pkiMessage: the SignedData around `content` (the envelope, or None), with `attributes` (from
    attribute_values) and their `signature` by `signer`'s key."""
    public = signer.public_key()
    if not isinstance(public, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        raise ValueError("the signer's key must be RSA or EC")
    info = rfc5652.SignerInfo()
    info["version"] = 1
    info["sid"]["issuerAndSerialNumber"] = _issuer_and_serial(signer)
    info["digestAlgorithm"]["algorithm"] = univ.ObjectIdentifier(digest.oid)
    parsed, rest = der_decoder.decode(attributes, asn1Spec=rfc5652.SignedAttributes())
    if rest:
        raise ValueError("trailing bytes after the signed attributes")
    info["signedAttrs"].extend(list(parsed))
    info["signatureAlgorithm"]["algorithm"] = univ.ObjectIdentifier(signature_algorithm(public, digest))
    if isinstance(public, rsa.RSAPublicKey):
        info["signatureAlgorithm"]["parameters"] = univ.Any(der_encoder.encode(univ.Null("")))
    info["signature"] = signature
    sd = rfc5652.SignedData()
    sd["version"] = 1
    algorithm = rfc5280.AlgorithmIdentifier()
    algorithm["algorithm"] = univ.ObjectIdentifier(digest.oid)
    sd["digestAlgorithms"].append(algorithm)
    sd["encapContentInfo"]["eContentType"] = rfc5652.id_data
    if content is not None:
        sd["encapContentInfo"]["eContent"] = content
    for cert in certificates:
        choice = rfc5652.CertificateChoices()
        choice["certificate"] = der_decoder.decode(cert.public_bytes(_DER), asn1Spec=rfc5280.Certificate())[0]
        sd["certificates"].append(choice)
    sd["signerInfos"].append(info)
    out = _content_info(rfc5652.id_signedData, der_encoder.encode(sd))
    if b"\xa0" + attributes[1:] not in out:  # what was signed must be what the message carries
        raise ValueError("the encoder changed the signed attributes")
    return out


def spki_sha256(cert_or_csr: x509.Certificate | x509.CertificateSigningRequest) -> bytes:
    h = hashes.Hash(hashes.SHA256())
    h.update(cert_or_csr.public_key().public_bytes(*_SPKI))
    return h.finalize()
