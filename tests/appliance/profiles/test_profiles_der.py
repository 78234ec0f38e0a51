"""appliance.der: encodings checked against pyasn1, and the certificate split against cryptography."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pyasn1.codec.der import decoder, encoder
from pyasn1.type import char, univ

from appliance import der
from tests.appliance.profiles.profiles_support import make_ca
from tests.cpu import cpu_budget


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (0, "00"),
        (127, "7f"),
        (128, "8180"),
        (255, "81ff"),
        (256, "820100"),
        (65535, "82ffff"),
        (65536, "83010000"),
    ],
)
def test_encode_length(n: int, expected: str) -> None:
    assert der.encode_length(n).hex() == expected


def test_encode_length_refuses_negative() -> None:
    with pytest.raises(ValueError):
        der.encode_length(-1)


@pytest.mark.parametrize(
    "dotted",
    [
        "1.3.6.1.5.5.7.8.4",
        "2.5.4.5",
        "1.3.6.1.4.1.37244.2.1",
        "2.999.3",
        "0.39",
        "1.2.840.113549.1.1.11",
        "2.25.1" + "0" * 38,
    ],
)
def test_oid_matches_pyasn1(dotted: str) -> None:
    assert der.oid(dotted) == encoder.encode(univ.ObjectIdentifier(dotted))


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "1",
        "1.",
        ".1",
        "1..2",
        "3.1",
        "1.40",
        "1.02",
        "1.2.-3",
        "1.2.a",
        "1.2.٣",
        "1.2 .3",
        "2." + "1." * 40 + "1",
    ],
)
def test_oid_rejects(bad: str) -> None:
    with pytest.raises(ValueError):
        der.oid(bad)


def test_oid_with_huge_arc_is_rejected_quickly() -> None:
    with cpu_budget(0.5), pytest.raises(ValueError):
        der.oid("1.2." + "9" * 100_000)


def test_strings_match_pyasn1() -> None:
    assert der.octet_string(b"\x00\x01") == encoder.encode(univ.OctetString(b"\x00\x01"))
    assert der.ia5_string("https://masa.example.com") == encoder.encode(
        char.IA5String("https://masa.example.com")
    )
    assert der.utf8_string("Grüße") == encoder.encode(char.UTF8String("Grüße"))
    assert der.octet_string(b"x" * 300) == encoder.encode(univ.OctetString(b"x" * 300))
    seq = der.sequence(der.oid("2.5.4.5"), der.octet_string(b"abc"))
    decoded, rest = decoder.decode(seq)
    assert rest == b""
    assert str(decoded[0]) == "2.5.4.5"


def test_ia5_rejects_non_ascii() -> None:
    with pytest.raises(ValueError):
        der.ia5_string("https://mäsa.example")


def test_bit_string() -> None:
    assert der.bit_string(b"\xff\x80", unused=7) == bytes.fromhex("030307ff80")
    assert der.bit_string(b"") == bytes.fromhex("030100")
    with pytest.raises(ValueError):
        der.bit_string(b"", unused=1)
    with pytest.raises(ValueError):
        der.bit_string(b"\x00", unused=8)


@pytest.mark.parametrize("n", [0, 1, 0x7F, 0x80, 0xFF, 0x100, 0xFFFF, 0x10000, 0x123456])
def test_tlv_header_is_the_tag_and_encode_length_at_every_length_boundary(n: int) -> None:
    """tlv writes the short lengths' header itself (speed); it must be what encode_length would give, and
    pyasn1 must read the element back whole."""
    content = bytes(n)
    element = der.tlv(der.TAG_OCTET_STRING, content)
    assert element == bytes((der.TAG_OCTET_STRING,)) + der.encode_length(n) + content
    value, rest = decoder.decode(element, asn1Spec=univ.OctetString())
    assert rest == b"" and bytes(value) == content


def test_tlv_refuses_high_tag_numbers() -> None:
    with pytest.raises(ValueError):
        der.tlv(0x1F, b"")


def _certs() -> list[bytes]:
    ca = make_ca()
    out = [ca.cert.public_bytes(serialization.Encoding.DER)]
    for key in (
        rsa.generate_private_key(65537, 2048),
        ed25519.Ed25519PrivateKey.generate(),
        ec.generate_private_key(ec.SECP384R1()),
    ):
        sub = make_ca("sub")
        builder = (
            x509.CertificateBuilder()
            .subject_name(sub.cert.subject)
            .issuer_name(sub.cert.subject)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(sub.cert.not_valid_before_utc)
            .not_valid_after(sub.cert.not_valid_after_utc)
        )
        alg = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
        out.append(builder.sign(key, alg).public_bytes(serialization.Encoding.DER))
    return out


def test_split_then_assemble_is_identity() -> None:
    for cert_der in _certs():
        tbs, alg, sig = der.split_certificate(cert_der)
        cert = x509.load_der_x509_certificate(cert_der)
        assert tbs == cert.tbs_certificate_bytes
        assert sig == cert.signature
        assert der.assemble_certificate(tbs, alg, sig) == cert_der


@pytest.mark.parametrize(
    ("mutate", "why"),
    [
        (lambda d: d + b"\x00", "trailing byte"),
        (lambda d: d[:-1], "truncated"),
        (lambda d: b"\x31" + d[1:], "not a SEQUENCE"),
        (lambda d: d[:1] + b"\x80" + d[4:] + b"\x00\x00", "indefinite length"),
        (lambda d: d[:1] + b"\x83\x00" + d[2:], "non-minimal length"),
        (lambda d: b"", "empty"),
        (lambda d: b"\x30", "header only"),
        (lambda d: b"\x30\x84\xff\xff\xff\xff", "length beyond input"),
        (lambda d: b"\x30\x89" + b"\x01" * 9, "length of lengths"),
        (lambda d: der.sequence(der.sequence(), der.sequence()), "two elements"),
        (
            lambda d: der.sequence(der.sequence(), der.sequence(), der.octet_string(b"\x00")),
            "sig not BIT STRING",
        ),
        (lambda d: der.sequence(der.sequence(), der.sequence(), der.bit_string(b"\x80", 7)), "unused bits"),
    ],
)
def test_split_rejects(mutate: object, why: str) -> None:
    cert_der = make_ca().cert.public_bytes(serialization.Encoding.DER)
    assert callable(mutate)
    with pytest.raises(ValueError):
        der.split_certificate(mutate(cert_der))


def test_read_tlv_child_cannot_overrun_parent() -> None:
    # Inner element claims 5 bytes but the parent holds only 2 of them.
    data = bytes.fromhex("3004") + bytes.fromhex("0405") + b"ab" + b"cde"
    parent = der.read_tlv(data, 0, 6)
    with pytest.raises(ValueError):
        der.read_children(data, parent)


def test_deep_nesting_is_cheap() -> None:
    data = b"\x30\x80" * 100_000
    with cpu_budget(0.2), pytest.raises(ValueError):
        der.split_certificate(data)
