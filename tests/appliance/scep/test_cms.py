"""The pure CMS layer of SCEP (appliance/scep/cms.py): what it reads, what it refuses, and that `openssl cms`
reads what it builds and the other way round."""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from appliance.scep import client, cms
from appliance.scep.algorithms import (
    AES128,
    AES192,
    AES256,
    DES,
    DES3,
    MD5,
    SHA1,
    SHA256,
    SHA512,
    AlgorithmPolicy,
)
from appliance.scep.errors import FailInfo, ScepError
from appliance.scep.oids import MessageType

STRICT = AlgorithmPolicy()
LEGACY = AlgorithmPolicy(frozenset({"des", "3des", "sha1", "md5"}))


def _cert(key: rsa.RSAPrivateKey, cn: str) -> x509.Certificate:
    return client.self_signed(key, cn)


@pytest.fixture(scope="module")
def ra() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key, _cert(key, "test RA")


@pytest.fixture(scope="module")
def device() -> tuple[rsa.RSAPrivateKey, x509.Certificate, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-1")]))
        .add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, b"secret")
        .sign(key, hashes.SHA256())
    )
    return key, _cert(key, "device"), csr.public_bytes(serialization.Encoding.DER)


def _open(data: bytes, ra: tuple[rsa.RSAPrivateKey, x509.Certificate], policy: AlgorithmPolicy) -> bytes:
    message = cms.read_signed(data, policy)
    assert message.content is not None
    envelope = cms.read_envelope(message.content, ra[1], policy)
    return cms.decrypt_content(envelope, ra[0].decrypt(envelope.encrypted_key, padding.PKCS1v15()))


@pytest.mark.parametrize("cipher", [AES128, AES192, AES256, DES3, DES], ids=lambda c: c.name)
@pytest.mark.parametrize("digest", [SHA256, SHA512, SHA1, MD5], ids=lambda d: d.name)
def test_round_trip(ra, device, cipher, digest) -> None:  # type: ignore[no-untyped-def]
    key, cert, csr = device
    data = client.request(MessageType.PKCS_REQ, csr, signer=cert, key=key, ra=ra[1], transaction_id="tx-1",
                          sender_nonce=b"n" * 16, cipher=cipher, digest=digest)  # fmt: skip
    message = cms.read_signed(data, LEGACY)
    assert (message.message_type, message.transaction_id, message.sender_nonce) == (19, "tx-1", b"n" * 16)
    assert message.signer == cert and message.digest is digest
    assert _open(data, ra, LEGACY) == csr
    if cipher.legacy or digest.legacy:
        with pytest.raises(ScepError) as info:
            _open(data, ra, STRICT)
        assert info.value.fail_info is FailInfo.BAD_ALG
        if digest.legacy:  # refused while reading the message, but addressed: answered with a CertRep FAILURE
            assert info.value.transaction_id == "tx-1"
        assert (cipher.legacy or digest.legacy) and "refused on this label" in info.value.message


def test_signature_is_verified_over_the_bytes_received(ra, device) -> None:  # type: ignore[no-untyped-def]
    key, cert, csr = device
    data = client.request(19, csr, signer=cert, key=key, ra=ra[1], transaction_id="tx-2")
    cms.read_signed(data, STRICT)
    tid = data.index(b"tx-2")
    for where, why in ((len(data) - 10, "the signature"), (120, "the envelope: messageDigest"),
                       (tid, "a signed attribute")):  # fmt: skip
        mutated = bytearray(data)
        mutated[where] ^= 0x01
        with pytest.raises(ScepError) as info:
            cms.read_signed(bytes(mutated), STRICT)
        assert info.value.fail_info is FailInfo.BAD_MESSAGE_CHECK, why
        assert info.value.transaction_id is not None, why


def test_another_signer_or_a_missing_attribute_is_refused(ra, device) -> None:  # type: ignore[no-untyped-def]
    key, cert, csr = device
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # Signed with one key, carrying another's certificate.
    envelope = cms.envelope(csr, ra[1], AES128, key=b"k" * 16, iv=b"i" * 16)
    attrs = cms.attribute_values(19, "tx-3", content=envelope, digest=SHA256, sender_nonce=b"n" * 16)
    forged = cms.signed_data(envelope, attrs, other.sign(attrs, padding.PKCS1v15(), hashes.SHA256()), cert,
                             SHA256, [cert])  # fmt: skip
    with pytest.raises(ScepError) as info:
        cms.read_signed(forged, STRICT)
    assert info.value.fail_info is FailInfo.BAD_MESSAGE_CHECK and info.value.transaction_id == "tx-3"
    # No transactionID: nobody to answer (HTTP 400).
    attrs = cms.attribute_values(19, "x", content=envelope, digest=SHA256, sender_nonce=b"n" * 16)
    no_tid = attrs.replace(
        b"\x06\x0a\x60\x86\x48\x01\x86\xf8\x45\x01\x09\x07",
        b"\x06\x0a\x60\x86\x48\x01\x86\xf8\x45\x01\x09\x08",
    )
    data = cms.signed_data(envelope, no_tid, key.sign(no_tid, padding.PKCS1v15(), hashes.SHA256()), cert, SHA256,
                           [cert])  # fmt: skip
    with pytest.raises(ScepError) as info:
        cms.read_signed(data, STRICT)
    assert info.value.transaction_id is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\x30\x80" + b"\x00" * 10,  # indefinite length
        b"\x30\x84\xff\xff\xff\xff",  # a length far beyond the input
        b"\x30" * 5000,  # nesting with no end
        (b"\x30\x82\x4e\x20" * 5000)[:20000],
        b"\x30\x03\x02\x01\x01\x00",  # trailing byte
        b"\x30\x00",
        b"\x06\x03\x55\x04\x03",
    ],
    ids=["empty", "indefinite", "huge-length", "deep", "deep-long", "trailing", "empty-seq", "oid"],
)
def test_hostile_framing_is_refused_quickly(data: bytes) -> None:
    started = time.process_time()
    with pytest.raises(ScepError) as info:
        cms.read_signed(data, STRICT)
    assert info.value.transaction_id is None
    assert time.process_time() - started < 5.0  # a deadlock guard, not a speed target


def test_deep_nesting_in_the_envelope_is_refused(ra, device) -> None:  # type: ignore[no-untyped-def]
    """The envelope is framed separately (it is an OCTET STRING's content): nested 60 deep, it is refused before
    pyasn1 sees it."""
    key, cert, _ = device
    nested = b"\x30\x00"
    for _ in range(60):
        nested = (
            b"\x30"
            + (bytes([len(nested)]) if len(nested) < 128 else b"\x82" + len(nested).to_bytes(2, "big"))
            + nested
        )
    envelope = b"\x30" + b"\x82" + len(nested).to_bytes(2, "big") + nested
    attrs = cms.attribute_values(19, "deep", content=envelope, digest=SHA256, sender_nonce=b"n" * 16)
    data = cms.signed_data(
        envelope, attrs, key.sign(attrs, padding.PKCS1v15(), hashes.SHA256()), cert, SHA256, [cert]
    )
    message = cms.read_signed(data, STRICT)
    assert message.content == envelope
    with pytest.raises(ScepError, match="does not decode"):
        cms.read_envelope(envelope, ra[1], STRICT)


def test_envelope_for_someone_else_and_bad_padding(ra, device) -> None:  # type: ignore[no-untyped-def]
    key, cert, csr = device
    stranger = _cert(rsa.generate_private_key(public_exponent=65537, key_size=2048), "stranger")
    data = client.request(19, csr, signer=cert, key=key, ra=stranger, transaction_id="tx-4")
    message = cms.read_signed(data, STRICT)
    assert message.content is not None
    with pytest.raises(ScepError) as info:
        cms.read_envelope(message.content, ra[1], STRICT)
    assert info.value.fail_info is FailInfo.BAD_MESSAGE_CHECK
    data = client.request(19, csr, signer=cert, key=key, ra=ra[1], transaction_id="tx-5")
    message = cms.read_signed(data, STRICT)
    assert message.content is not None
    envelope = cms.read_envelope(message.content, ra[1], STRICT)
    with pytest.raises(ValueError, match=r"padding|length"):
        cms.decrypt_content(envelope, b"w" * envelope.cipher.key_size)  # a wrong key shows as bad padding
    with pytest.raises(ValueError):
        cms.decrypt_content(envelope, b"short")


def test_an_ec_recipient_cannot_get_an_envelope(device) -> None:  # type: ignore[no-untyped-def]
    ec_key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(ScepError) as info:
        cms.envelope(b"x", client.self_signed(ec_key), AES256, key=b"k" * 32, iv=b"i" * 16)
    assert info.value.fail_info is FailInfo.BAD_ALG


def test_capabilities_say_what_is_accepted() -> None:
    assert STRICT.capabilities(renewal=True) == ("AES", "POSTPKIOperation", "SCEPStandard", "SHA-256", "SHA-512",
                                                 "Renewal")  # fmt: skip
    legacy = LEGACY.capabilities(renewal=False)
    assert "DES3" in legacy and "SHA-1" in legacy and "Renewal" not in legacy
    with pytest.raises(ValueError):
        AlgorithmPolicy(frozenset({"rc2"}))


# -- openssl as the peer ---------------------------------------------------------------------------------------------
pytestmark_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


def _pem_files(tmp: Path, key: rsa.RSAPrivateKey, cert: x509.Certificate, name: str) -> tuple[Path, Path]:
    k, c = tmp / f"{name}.key", tmp / f"{name}.pem"
    k.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption()))  # fmt: skip
    c.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return k, c


@pytestmark_openssl
def test_openssl_reads_what_we_build(tmp_path: Path, ra, device) -> None:  # type: ignore[no-untyped-def]
    key, cert, csr = device
    ra_key, ra_pem = _pem_files(tmp_path, *ra, "ra")
    for cipher in (AES256, DES3):
        data = client.request(19, csr, signer=cert, key=key, ra=ra[1], transaction_id="tx", cipher=cipher)
        (tmp_path / "msg.der").write_bytes(data)
        subprocess.run(["openssl", "cms", "-verify", "-noverify", "-inform", "DER", "-in", tmp_path / "msg.der",
                        "-binary", "-out", tmp_path / "env.der"], check=True, capture_output=True)  # fmt: skip
        out = subprocess.run(["openssl", "cms", "-decrypt", "-inform", "DER", "-in", tmp_path / "env.der", "-inkey",
                              ra_key, "-recip", ra_pem, "-binary"], check=True, capture_output=True)  # fmt: skip
        assert out.stdout == csr


@pytestmark_openssl
def test_we_read_what_openssl_builds(tmp_path: Path, ra, device) -> None:  # type: ignore[no-untyped-def]
    """openssl cms makes the envelope and signs it (SHA-256, its own attributes: contentType, signingTime,
    messageDigest, SMIMECapabilities): the signature verifies over its bytes and the envelope opens. It adds no
    SCEP attributes, so the message is refused for want of a transactionID: nobody to answer."""
    key, cert, csr = device
    dev_key, dev_pem = _pem_files(tmp_path, key, cert, "dev")
    _, ra_pem = _pem_files(tmp_path, *ra, "ra")
    (tmp_path / "csr.der").write_bytes(csr)
    subprocess.run(["openssl", "cms", "-encrypt", "-binary", "-aes256", "-outform", "DER", "-in", tmp_path / "csr.der",
                    "-out", tmp_path / "env.der", ra_pem], check=True, capture_output=True)  # fmt: skip
    subprocess.run(["openssl", "cms", "-sign", "-binary", "-nodetach", "-md", "sha256", "-inform", "DER", "-outform",
                    "DER", "-in", tmp_path / "env.der", "-signer", dev_pem, "-inkey", dev_key, "-out",
                    tmp_path / "msg.der"], check=True, capture_output=True)  # fmt: skip
    with pytest.raises(ScepError, match="transactionID") as info:
        cms.read_signed((tmp_path / "msg.der").read_bytes(), STRICT)
    assert info.value.transaction_id is None
    envelope = cms.read_envelope((tmp_path / "env.der").read_bytes(), ra[1], STRICT)
    assert cms.decrypt_content(envelope, ra[0].decrypt(envelope.encrypted_key, padding.PKCS1v15())) == csr


@pytestmark_openssl
def test_openssl_verifies_a_cert_rep(tmp_path: Path, ra) -> None:  # type: ignore[no-untyped-def]
    ra_key, ra_cert = ra
    _, ra_pem = _pem_files(tmp_path, ra_key, ra_cert, "ra")
    issued = x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(ra_cert.subject).public_key(
        ra_key.public_key()).serial_number(7).not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(
        dt.datetime(2030, 1, 1)).sign(ra_key, hashes.SHA256())  # fmt: skip
    for content in (cms.certs_only([issued]), b""):
        attrs = cms.attribute_values(3, "tx", content=content, digest=SHA256, sender_nonce=b"s" * 16,
                                     recipient_nonce=b"r" * 16, pki_status=0)  # fmt: skip
        sig = ra_key.sign(attrs, padding.PKCS1v15(), hashes.SHA256())
        (tmp_path / "rep.der").write_bytes(cms.signed_data(content, attrs, sig, ra_cert, SHA256, [ra_cert]))
        out = subprocess.run(["openssl", "cms", "-verify", "-inform", "DER", "-in", tmp_path / "rep.der", "-CAfile",
                              ra_pem, "-binary", "-purpose", "any"], check=False, capture_output=True)  # fmt: skip
        assert out.returncode == 0, out.stderr.decode()
        assert out.stdout == content


def test_an_envelope_that_is_no_enveloped_data_is_refused_in_the_clients_terms(ra) -> None:  # type: ignore[no-untyped-def]
    """The decoder's own text (its ASN.1 internals) never reaches the client's failInfoText (an outside test saw
    "<TagSet object, tags 0:32:16> not in asn1Spec")."""
    for content in (
        b"\x30\x03\x02\x01\x05",  # a SEQUENCE, but no ContentInfo
        b"\x30\x0d\x06\x09\x2a\x86\x48\x86\xf7\x0d\x01\x07\x01\xa0\x00",  # id-data, not enveloped
        b"\x31\x00",  # a SET
    ):
        with pytest.raises(ScepError) as info:
            cms.read_envelope(content, ra[1], STRICT)
        assert info.value.fail_info is FailInfo.BAD_REQUEST
        text = info.value.message
        assert text.startswith("the pkcsPKIEnvelope does not decode"), text
        assert "TagSet" not in text and "asn1Spec" not in text and "object at" not in text, text
