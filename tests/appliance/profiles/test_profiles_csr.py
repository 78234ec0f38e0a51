"""validate_csr: every bad CSR is refused with the right reason code and a clean message."""

from __future__ import annotations

import hashlib
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from appliance import der
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.profiles import Profile, builtin_profiles, validate_csr
from tests.appliance.profiles.profiles_support import make_csr

IDEVID = builtin_profiles()["idevid"]
ALL_ALGS = Profile(
    name="all",
    key_algorithms=frozenset({"ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"}),
)


def refused(data: bytes, profile: Profile = IDEVID, **kw: int) -> IssuanceRefused:
    with pytest.raises(IssuanceRefused) as info:
        validate_csr(data, profile, **kw)
    return info.value


def _integer(value: int) -> bytes:
    return der.tlv(der.TAG_INTEGER, value.to_bytes(value.bit_length() // 8 + 1, "big"))


def hand_csr(spki: bytes, sign: Callable[[bytes], bytes], sig_alg: bytes) -> bytes:
    """A PKCS#10 request built byte by byte, for keys cryptography refuses to create."""
    name = der.sequence(der.tlv(der.TAG_SET, der.sequence(der.oid("2.5.4.3"), der.utf8_string("x"))))
    info = der.sequence(_integer(0), name, spki, b"\xa0\x00")
    return der.sequence(info, sig_alg, der.bit_string(sign(info)))


def rsa_csr_with_exponent(exponent: int) -> bytes:
    key = rsa.generate_private_key(65537, 2048)
    n = key.public_key().public_numbers().n
    rsa_alg = der.sequence(der.oid("1.2.840.113549.1.1.1"), b"\x05\x00")
    spki = der.sequence(rsa_alg, der.bit_string(der.sequence(_integer(n), _integer(exponent))))
    return hand_csr(
        spki,
        lambda tbs: key.sign(tbs, padding.PKCS1v15(), hashes.SHA256()),
        der.sequence(der.oid("1.2.840.113549.1.1.11"), b"\x05\x00"),
    )


# --- accepted --------------------------------------------------------------------------------------


def test_p256_der_accepted(p256_csr: bytes, p256_key: ec.EllipticCurvePrivateKey) -> None:
    result = validate_csr(p256_csr, IDEVID)
    assert result.key_algorithm == "ec-p256"
    spki = p256_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert result.public_key_sha256 == hashlib.sha256(spki).digest()
    assert result.der_sha256 == hashlib.sha256(p256_csr).digest()
    assert result.public_key == p256_key.public_key()


def test_pem_accepted_and_hashed_as_der(p256_csr: bytes) -> None:
    pem = x509.load_der_x509_csr(p256_csr).public_bytes(serialization.Encoding.PEM)
    assert validate_csr(pem, IDEVID).der_sha256 == hashlib.sha256(p256_csr).digest()


@pytest.mark.parametrize(
    ("make_key", "hash_alg", "name"),
    [
        (lambda: ec.generate_private_key(ec.SECP384R1()), hashes.SHA384(), "ec-p384"),
        (lambda: rsa.generate_private_key(65537, 2048), hashes.SHA256(), "rsa-2048"),
        (lambda: rsa.generate_private_key(65537, 3072), hashes.SHA256(), "rsa-3072"),
        (ed25519.Ed25519PrivateKey.generate, None, "ed25519"),
    ],
)
def test_allowed_algorithms(
    make_key: Callable[[], object], hash_alg: hashes.HashAlgorithm | None, name: str
) -> None:
    result = validate_csr(make_csr(make_key(), hash_alg=hash_alg), ALL_ALGS)  # type: ignore[arg-type]
    assert result.key_algorithm == name


# --- BAD_CSR ---------------------------------------------------------------------------------------


def test_oversize_refused_before_parsing() -> None:
    err = refused(b"\x30" * 9000)
    assert err.code == ReasonCode.BAD_CSR
    assert "9000 bytes" in err.message
    assert refused(b"\x30" * 101, max_bytes=100).code == ReasonCode.BAD_CSR


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"garbage\x1b[31m\xe2\x80\xae not a csr",
        b"\x30\x80\x00\x00",
        b"\x30\x82\x00\x05abcde",
        b"\x30\x03\x02\x01\x00",
        b"-----BEGIN CERTIFICATE REQUEST-----\n!!!\n-----END CERTIFICATE REQUEST-----\n",
        b"-----BEGIN CERTIFICATE-----\nMAA=\n-----END CERTIFICATE-----\n",
        b"-----BEGIN CERTIFICATE REQUEST-----\n\xff\n-----END CERTIFICATE REQUEST-----\n",
    ],
)
def test_garbage_is_bad_csr_with_clean_message(data: bytes) -> None:
    err = refused(data)
    assert err.code == ReasonCode.BAD_CSR
    assert err.message.isascii() and err.message.isprintable()
    assert "garbage" not in err.message


def test_truncated(p256_csr: bytes) -> None:
    for cut in (1, 10, len(p256_csr) // 2, len(p256_csr) - 1):
        assert refused(p256_csr[:cut]).code == ReasonCode.BAD_CSR


def test_trailing_bytes(p256_csr: bytes) -> None:
    assert refused(p256_csr + b"\x00").code == ReasonCode.BAD_CSR
    pem = x509.load_der_x509_csr(p256_csr).public_bytes(serialization.Encoding.PEM)
    assert refused(pem + b"extra text\n").code == ReasonCode.BAD_CSR
    assert refused(pem + pem).code == ReasonCode.BAD_CSR


# --- BAD_POP ---------------------------------------------------------------------------------------


def test_flipped_signature_byte(p256_csr: bytes) -> None:
    bad = bytearray(p256_csr)
    bad[-5] ^= 0x01
    assert refused(bytes(bad)).code == ReasonCode.BAD_POP


def test_signature_by_another_key(p256_key: ec.EllipticCurvePrivateKey) -> None:
    other = ec.generate_private_key(ec.SECP256R1())
    spki = p256_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    data = hand_csr(
        spki,
        lambda tbs: other.sign(tbs, ec.ECDSA(hashes.SHA256())),
        der.sequence(der.oid("1.2.840.10045.4.3.2")),
    )
    assert refused(data).code == ReasonCode.BAD_POP


def test_sha1_signature_is_no_proof() -> None:
    # cryptography 50 no longer signs CSRs with SHA-1, so sign the bytes ourselves.
    key = rsa.generate_private_key(65537, 2048)
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    data = hand_csr(
        spki,
        lambda tbs: key.sign(tbs, padding.PKCS1v15(), hashes.SHA1()),  # noqa: S303
        der.sequence(der.oid("1.2.840.113549.1.1.5"), b"\x05\x00"),
    )
    err = refused(data)
    assert err.code == ReasonCode.BAD_POP
    assert "sha1" in err.message


# --- KEY_POLICY ------------------------------------------------------------------------------------


def test_rsa_1024() -> None:
    err = refused(make_csr(rsa.generate_private_key(65537, 1024), hash_alg=hashes.SHA256()))  # noqa: S505
    assert err.code == ReasonCode.KEY_POLICY
    assert "rsa-1024" in err.message


def test_rsa_4096_only_when_allowed() -> None:
    data = make_csr(rsa.generate_private_key(65537, 4096), hash_alg=hashes.SHA256())
    assert refused(data).code == ReasonCode.KEY_POLICY
    assert validate_csr(data, ALL_ALGS).key_algorithm == "rsa-4096"


def test_rsa_exponent_3() -> None:
    err = refused(make_csr(rsa.generate_private_key(3, 2048), hash_alg=hashes.SHA256()), ALL_ALGS)
    assert err.code == ReasonCode.KEY_POLICY
    assert "exponent 3" in err.message


@pytest.mark.parametrize("exponent", [1, 4, 65536, 2**100 + 1])
def test_rsa_odd_exponents(exponent: int) -> None:
    err = refused(rsa_csr_with_exponent(exponent), ALL_ALGS)
    assert err.code == ReasonCode.KEY_POLICY
    assert "65537" in err.message


@pytest.mark.parametrize("curve", [ec.SECP224R1(), ec.SECP256K1(), ec.SECP521R1()])
def test_curves_not_allowed(curve: ec.EllipticCurve) -> None:
    err = refused(make_csr(ec.generate_private_key(curve), hash_alg=hashes.SHA256()), ALL_ALGS)
    assert err.code == ReasonCode.KEY_POLICY
    assert curve.name in err.message


def test_p384_not_in_matter_profile() -> None:
    data = make_csr(ec.generate_private_key(ec.SECP384R1()), hash_alg=hashes.SHA384())
    assert refused(data, builtin_profiles()["matter-dac"]).code == ReasonCode.KEY_POLICY


def test_ed25519_only_when_allowed() -> None:
    data = make_csr(ed25519.Ed25519PrivateKey.generate())
    err = refused(data)
    assert err.code == ReasonCode.KEY_POLICY
    assert "ed25519" in err.message


def test_explicit_curve_parameters(tmp_path: Path) -> None:
    # cryptography 50 loads these and reports secp256r1, so only our own SPKI check stops them.
    key = tmp_path / "k.pem"
    subprocess.run(
        [
            "openssl",
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-param_enc",
            "explicit",
            "-noout",
            "-out",
            key,
        ],
        check=True,
        capture_output=True,
    )
    data = subprocess.run(
        ["openssl", "req", "-new", "-key", key, "-subj", "/CN=x", "-outform", "DER"],
        check=True,
        capture_output=True,
    ).stdout
    assert x509.load_der_x509_csr(data).is_signature_valid  # the premise: it is otherwise a fine CSR
    err = refused(data)
    assert err.code == ReasonCode.KEY_POLICY
    assert "named curve" in err.message


def test_ec_key_without_parameters(p256_key: ec.EllipticCurvePrivateKey) -> None:
    point = p256_key.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    spki = der.sequence(der.sequence(der.oid("1.2.840.10045.2.1")), der.bit_string(point))
    data = hand_csr(
        spki,
        lambda tbs: p256_key.sign(tbs, ec.ECDSA(hashes.SHA256())),
        der.sequence(der.oid("1.2.840.10045.4.3.2")),
    )
    assert refused(data).code == ReasonCode.KEY_POLICY


def test_details_are_structured() -> None:
    err = refused(make_csr(rsa.generate_private_key(65537, 1024), hash_alg=hashes.SHA256()))  # noqa: S505
    assert err.details["key_algorithm"] == "rsa-1024"
    assert "ec-p256" in err.details["allowed"]
