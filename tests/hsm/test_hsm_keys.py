from __future__ import annotations

import datetime
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
from cryptography.x509.oid import NameOID
from pkcs11 import Attribute, ObjectClass

from hsm.algorithms import KeyAlgorithm, default_hash, from_public_key
from hsm.errors import KeyExistsError, KeyNotFoundError, UnsupportedAlgorithmError
from hsm.keys import HsmEcPrivateKey, HsmEd25519PrivateKey, HsmPrivateKey, HsmRsaPrivateKey
from hsm.token import Token

NOW = datetime.datetime.now(datetime.UTC)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _hash_for(key: HsmPrivateKey) -> hashes.SHA256 | hashes.SHA384 | None:
    return default_hash(key.algorithm)


def self_signed(key: HsmPrivateKey) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(key.label))
        .issuer_name(_name(key.label))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    )
    return builder.sign(key, _hash_for(key))


def test_generated_key_matches_algorithm(any_key: HsmPrivateKey) -> None:
    expected = {
        KeyAlgorithm.EC_P256: HsmEcPrivateKey,
        KeyAlgorithm.EC_P384: HsmEcPrivateKey,
        KeyAlgorithm.RSA_2048: HsmRsaPrivateKey,
        KeyAlgorithm.RSA_3072: HsmRsaPrivateKey,
        KeyAlgorithm.ED25519: HsmEd25519PrivateKey,
    }[any_key.algorithm]
    assert isinstance(any_key, expected)
    assert from_public_key(any_key.public_key()) is any_key.algorithm
    if isinstance(any_key, HsmRsaPrivateKey):
        assert any_key.key_size == int(any_key.algorithm.value.split("-")[1])
        assert any_key.public_key().public_numbers().e == 65537
    if isinstance(any_key, HsmEcPrivateKey):
        assert any_key.key_size == any_key.public_key().curve.key_size


def test_key_is_sensitive_and_not_extractable(any_key: HsmPrivateKey, hsm_token: Token) -> None:
    def attrs(session: Any) -> dict[Attribute, Any]:
        priv = session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=any_key.label)
        return {
            a: priv[a] for a in (Attribute.EXTRACTABLE, Attribute.SENSITIVE, Attribute.TOKEN, Attribute.SIGN)
        }

    got = hsm_token.run(attrs)
    assert got == {
        Attribute.EXTRACTABLE: False,
        Attribute.SENSITIVE: True,
        Attribute.TOKEN: True,
        Attribute.SIGN: True,
    }
    with pytest.raises(UnsupportedAlgorithmError):
        any_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    if not isinstance(any_key, HsmEd25519PrivateKey):
        with pytest.raises(UnsupportedAlgorithmError):
            any_key.private_numbers()


def test_self_signed_certificate_verifies(any_key: HsmPrivateKey) -> None:
    cert = self_signed(any_key)
    cert.verify_directly_issued_by(cert)
    assert cert.public_key() == any_key.public_key()


def test_csr_signature_is_valid(any_key: HsmPrivateKey) -> None:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_name("device"))
        .sign(any_key, _hash_for(any_key))
    )
    assert csr.is_signature_valid


def test_crl_signature_is_valid(any_key: HsmPrivateKey) -> None:
    crl = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(_name(any_key.label))
        .last_update(NOW)
        .next_update(NOW + datetime.timedelta(days=1))
        .sign(any_key, _hash_for(any_key))
    )
    assert crl.is_signature_valid(any_key.public_key())


def test_sign_many_signatures_verify(any_key: HsmPrivateKey) -> None:
    items = [f"tbs-{i}".encode() for i in range(20)]
    sigs = any_key.sign_many(items)
    assert len(sigs) == len(items)
    pub = any_key.public_key()
    for item, sig in zip(items, sigs, strict=True):
        if isinstance(pub, ec.EllipticCurvePublicKey):
            h = default_hash(any_key.algorithm)
            assert h is not None
            pub.verify(sig, item, ec.ECDSA(h))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, item, padding.PKCS1v15(), hashes.SHA256())
        else:
            pub.verify(sig, item)


async def test_asign_many(ec_key: HsmEcPrivateKey) -> None:
    sigs = await ec_key.asign_many([b"a", b"b", b"c"])
    pub = ec_key.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    for item, sig in zip([b"a", b"b", b"c"], sigs, strict=True):
        pub.verify(sig, item, ec.ECDSA(hashes.SHA256()))


def test_ecdsa_prehashed_and_other_hash(ec_key: HsmEcPrivateKey) -> None:
    assert isinstance(ec_key, HsmEcPrivateKey)
    digest = hashes.Hash(hashes.SHA384())
    digest.update(b"payload")
    sig = ec_key.sign(digest.finalize(), ec.ECDSA(utils.Prehashed(hashes.SHA384())))
    ec_key.public_key().verify(sig, b"payload", ec.ECDSA(hashes.SHA384()))


@pytest.mark.parametrize(
    "pad",
    [
        padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.DIGEST_LENGTH),
        padding.PSS(padding.MGF1(hashes.SHA256()), padding.PSS.MAX_LENGTH),
        padding.PKCS1v15(),
    ],
    ids=["pss-digest", "pss-max", "pkcs1v15"],
)
def test_rsa_paddings(
    hsm_token: Token, pad: padding.AsymmetricPadding, new_label: Callable[[str], str]
) -> None:
    label = "test-rsa-paddings"
    key = (
        hsm_token.get_key(label)
        if hsm_token.has_key(label)
        else hsm_token.generate_key(label, KeyAlgorithm.RSA_2048)
    )
    assert isinstance(key, HsmRsaPrivateKey)
    sig = key.sign(b"hello", pad, hashes.SHA256())
    key.public_key().verify(sig, b"hello", pad, hashes.SHA256())


def test_openssl_accepts_certificate_and_csr(ec_key: HsmEcPrivateKey, tmp_path: Path) -> None:
    cert_pem = tmp_path / "cert.pem"
    cert_pem.write_bytes(self_signed(ec_key).public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(
        ["openssl", "verify", "-CAfile", str(cert_pem), str(cert_pem)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name("device")).sign(ec_key, hashes.SHA256())
    csr_pem = tmp_path / "csr.pem"
    csr_pem.write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(
        ["openssl", "req", "-verify", "-noout", "-in", str(csr_pem)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0, out.stderr


def test_key_exists_and_not_found(
    hsm_token: Token, ec_key: HsmEcPrivateKey, new_label: Callable[[str], str]
) -> None:
    with pytest.raises(KeyExistsError):
        hsm_token.generate_key(ec_key.label, KeyAlgorithm.EC_P256)
    missing = new_label("missing")
    with pytest.raises(KeyNotFoundError):
        hsm_token.get_key(missing)
    assert not hsm_token.has_key(missing)
    assert hsm_token.has_key(ec_key.label)
    assert (ec_key.label, KeyAlgorithm.EC_P256) in hsm_token.list_keys()


def test_exchange_and_unsupported_signature_algorithms_refused(ec_key: HsmEcPrivateKey) -> None:
    assert isinstance(ec_key, HsmEcPrivateKey)
    with pytest.raises(UnsupportedAlgorithmError):
        ec_key.exchange(ec.ECDH(), ec_key.public_key())


def test_ecdsa_der_is_python_pkcs11s_encoding_and_refuses_odd_lengths() -> None:
    """hsm.keys.ecdsa_der replaced pkcs11.util.ec.encode_ecdsa_signature (asn1crypto, ~10 us): same bytes for
    every curve size, leading zero octets and high bits included."""
    import os

    from pkcs11.util.ec import encode_ecdsa_signature

    from hsm.errors import SignatureVerificationError
    from hsm.verify import ecdsa_der

    for half in (32, 48, 66):
        for i in range(2000):
            raw = bytearray(os.urandom(2 * half))
            if i % 3 == 0:
                raw[: 1 + i % 9] = bytes(1 + i % 9)  # r with leading zero octets
            if i % 5 == 0:
                raw[half] |= 0x80  # s with its high bit set
            assert ecdsa_der(bytes(raw)) == encode_ecdsa_signature(bytes(raw))
    with pytest.raises(SignatureVerificationError):
        ecdsa_der(b"\x01" * 65)
