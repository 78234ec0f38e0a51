"""build_certificate: every field of an issued certificate, decoded back, plus openssl as an outside judge."""

from __future__ import annotations

import dataclasses
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtensionOID, NameOID
from pyasn1.codec.der import decoder
from pyasn1_alt_modules import rfc4108

from appliance import der
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.profiles import (
    OID_HARDWARE_MODULE_NAME,
    OID_MASA_URL,
    OID_MATTER_PID,
    OID_MATTER_VID,
    Profile,
    build_certificate,
    builtin_profiles,
    new_serial_number,
    parse_profiles,
    validate_csr,
)
from tests.appliance.profiles.profiles_support import NOW, Ca, make_ca, make_csr

HW_TYPE = "1.3.6.1.4.1.99999.1.1"
MASA = "https://masa.example.com/.well-known/brski"
SERIAL = "SN-0001/A"


def _profile(**table: object) -> Profile:
    profiles, problems = parse_profiles({"test": table})
    assert problems == [], problems
    return profiles["test"]


FULL_IDEVID = _profile(
    subject_o="Example Devices",
    subject_ou="Line 3",
    hardware_module_name=HW_TYPE,
    masa_url=MASA,
    crl_urls=["http://crl.example.com/idevid.crl", "https://crl2.example.com/idevid.crl"],
    ocsp_url="http://ocsp.example.com",
)
MATTER = builtin_profiles()["matter-dac"]


def issue(
    ca: Ca, profile: Profile, public_key: ec.EllipticCurvePublicKey, serial: str = SERIAL
) -> x509.Certificate:
    builder = build_certificate(
        profile,
        issuer_cert=ca.cert,
        device_serial=serial,
        public_key=public_key,
        serial_number=new_serial_number(),
        now=NOW,
    )
    cert = builder.sign(ca.key, hashes.SHA256())
    cert.verify_directly_issued_by(ca.cert)
    return cert


@pytest.fixture(scope="module")
def idevid(ca: Ca, p256_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return issue(ca, FULL_IDEVID, p256_key.public_key())


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# --- IDevID ----------------------------------------------------------------------------------------


def test_subject_is_from_profile_with_printable_serial(idevid: x509.Certificate) -> None:
    assert [(a.oid, a.value) for a in idevid.subject] == [
        (NameOID.ORGANIZATION_NAME, "Example Devices"),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, "Line 3"),
        (NameOID.SERIAL_NUMBER, SERIAL),
    ]
    # 06 03 55 04 05 = OID 2.5.4.5, then tag 0x13 PrintableString.
    assert bytes.fromhex("0603550405") + bytes((0x13, len(SERIAL))) + SERIAL.encode() in _der(idevid)


def test_issuer_serial_and_version(idevid: x509.Certificate, ca: Ca) -> None:
    assert idevid.issuer == ca.cert.subject
    assert idevid.version == x509.Version.v3
    assert 2**64 <= idevid.serial_number < 2**127


def test_validity(idevid: x509.Certificate) -> None:
    assert idevid.not_valid_before_utc == NOW
    assert idevid.not_valid_after_utc == datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)
    data = _der(idevid)
    assert b"\x18\x0f99991231235959Z" in data  # GeneralizedTime
    assert b"\x17\x0d260301120000Z" in data  # notBefore stays UTCTime before 2050


def test_validity_days_and_backdate(ca: Ca, p256_key: ec.EllipticCurvePrivateKey) -> None:
    profile = _profile(validity_days=365, backdate_seconds=600)
    cert = issue(ca, profile, p256_key.public_key())
    assert cert.not_valid_before_utc == NOW - timedelta(seconds=600)
    assert cert.not_valid_after_utc == NOW + timedelta(days=365)


def test_microseconds_are_dropped(ca: Ca, p256_key: ec.EllipticCurvePrivateKey) -> None:
    builder = build_certificate(
        FULL_IDEVID,
        issuer_cert=ca.cert,
        device_serial=SERIAL,
        public_key=p256_key.public_key(),
        serial_number=1,
        now=NOW.replace(microsecond=999_999),
    )
    assert builder.sign(ca.key, hashes.SHA256()).not_valid_before_utc == NOW


def test_naive_now_refused(ca: Ca, p256_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError):
        build_certificate(
            FULL_IDEVID,
            issuer_cert=ca.cert,
            device_serial=SERIAL,
            public_key=p256_key.public_key(),
            serial_number=1,
            now=datetime(2026, 1, 1),
        )


def test_key_usage_and_basic_constraints(idevid: x509.Certificate) -> None:
    ku = idevid.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature
    for name in ("content_commitment", "key_encipherment", "data_encipherment", "key_agreement"):
        assert not getattr(ku.value, name)
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    bc = idevid.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False and bc.value.path_length is None


def test_key_identifiers(idevid: x509.Certificate, ca: Ca, p256_key: ec.EllipticCurvePrivateKey) -> None:
    ski = idevid.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    assert not ski.critical
    assert ski.value == x509.SubjectKeyIdentifier.from_public_key(p256_key.public_key())
    aki = idevid.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert not aki.critical
    issuer_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert aki.value.key_identifier == issuer_ski.digest
    assert aki.value.authority_cert_issuer is None and aki.value.authority_cert_serial_number is None


def test_aki_falls_back_to_issuer_key(p256_key: ec.EllipticCurvePrivateKey) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-ski")])
    bare = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(5)
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    cert = issue(Ca(key, bare), FULL_IDEVID, p256_key.public_key())
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest


def test_hardware_module_name(idevid: x509.Certificate) -> None:
    san = idevid.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert not san.critical
    (other,) = san.value
    assert isinstance(other, x509.OtherName)
    assert other.type_id.dotted_string == OID_HARDWARE_MODULE_NAME
    decoded, rest = decoder.decode(other.value, asn1Spec=rfc4108.HardwareModuleName())
    assert rest == b""
    assert str(decoded["hwType"]) == HW_TYPE
    assert bytes(decoded["hwSerialNum"]) == SERIAL.encode()


def test_masa_url(idevid: x509.Certificate) -> None:
    ext = idevid.extensions.get_extension_for_oid(x509.ObjectIdentifier(OID_MASA_URL))
    assert not ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == b"\x16" + bytes((len(MASA),)) + MASA.encode()


def test_crl_and_ocsp(idevid: x509.Certificate) -> None:
    cdp = idevid.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert not cdp.critical
    (point,) = cdp.value
    assert point.full_name is not None
    assert [n.value for n in point.full_name] == list(FULL_IDEVID.crl_urls)
    aia = idevid.extensions.get_extension_for_class(x509.AuthorityInformationAccess)
    assert not aia.critical
    assert [(d.access_method._name, d.access_location.value) for d in aia.value] == [
        ("OCSP", "http://ocsp.example.com")
    ]


def test_exact_extension_set(idevid: x509.Certificate) -> None:
    assert [e.oid for e in idevid.extensions] == [
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        x509.ObjectIdentifier(OID_MASA_URL),
        ExtensionOID.CRL_DISTRIBUTION_POINTS,
        ExtensionOID.AUTHORITY_INFORMATION_ACCESS,
    ]


def test_minimal_profile(ca: Ca, p256_key: ec.EllipticCurvePrivateKey) -> None:
    profile = _profile(key_usage=[], basic_constraints=False)
    cert = issue(ca, profile, p256_key.public_key())
    assert [e.oid for e in cert.extensions] == [
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    ]
    assert [a.oid for a in cert.subject] == [NameOID.SERIAL_NUMBER]


def test_csr_requests_are_ignored(ca: Ca, p256_key: ec.EllipticCurvePrivateKey) -> None:
    csr_der = make_csr(
        p256_key,
        hash_alg=hashes.SHA256(),
        extensions=[
            (x509.BasicConstraints(ca=True, path_length=None), True),
            (x509.SubjectAlternativeName([x509.DNSName("evil.example.com")]), False),
            (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
        ],
    )
    csr = validate_csr(csr_der, builtin_profiles()["idevid"])
    cert = issue(ca, builtin_profiles()["idevid"], csr.public_key)  # type: ignore[arg-type]
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage)
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == SERIAL
    assert b"ASKED-FOR" not in _der(cert)
    assert b"evil" not in _der(cert)


def test_bad_device_serial_refused_by_builder(ca: Ca, p256_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(IssuanceRefused) as info:
        issue(ca, FULL_IDEVID, p256_key.public_key(), serial="SN\x1b[0m")
    assert info.value.code == ReasonCode.BAD_DEVICE_SERIAL


def test_der_split_of_issued_cert(idevid: x509.Certificate) -> None:
    data = _der(idevid)
    tbs, alg, sig = der.split_certificate(data)
    assert tbs == idevid.tbs_certificate_bytes and sig == idevid.signature
    assert der.assemble_certificate(tbs, alg, sig) == data


# --- Matter DAC ------------------------------------------------------------------------------------


def test_matter_dac(ca: Ca, p256_key: ec.EllipticCurvePrivateKey) -> None:
    cert = issue(ca, MATTER, p256_key.public_key(), serial="DAC-0001")
    assert [(a.oid.dotted_string, a.value) for a in cert.subject] == [
        (NameOID.COMMON_NAME.dotted_string, "DAC-0001"),
        (OID_MATTER_VID, "FFF1"),
        (OID_MATTER_PID, "8000"),
    ]
    data = _der(cert)
    # UTF8String (0x0C) of the 4 hex digits after each OID.
    assert der.oid(OID_MATTER_VID) + b"\x0c\x04FFF1" in data
    assert der.oid(OID_MATTER_PID) + b"\x0c\x048000" in data
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature and not ku.value.key_agreement
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and not bc.value.ca
    assert not cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).critical
    assert not cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).critical
    assert len(cert.extensions) == 4
    assert cert.signature_algorithm_oid == x509.oid.SignatureAlgorithmOID.ECDSA_WITH_SHA256


# --- openssl as the outside judge ------------------------------------------------------------------


def _write(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def test_openssl_text(idevid: x509.Certificate, tmp_path: Path) -> None:
    out = subprocess.run(
        ["openssl", "x509", "-noout", "-text", "-in", _write(tmp_path / "dev.pem", idevid)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    assert "Not After : Dec 31 23:59:59 9999 GMT" in out
    assert f"serialNumber={SERIAL}" in out or f"serialNumber = {SERIAL}" in out
    assert "Digital Signature" in out
    assert "CA:FALSE" in out
    assert "URI:http://crl.example.com/idevid.crl" in out
    assert "OCSP - URI:http://ocsp.example.com" in out


@pytest.mark.parametrize("which", ["idevid", "minimal", "matter"])
def test_openssl_verify_x509_strict(which: str, tmp_path: Path, p256_key: ec.EllipticCurvePrivateKey) -> None:
    root = make_ca()
    profile = {
        "idevid": FULL_IDEVID,
        "minimal": dataclasses.replace(FULL_IDEVID, key_usage=(), basic_constraints=False, crl_urls=()),
        "matter": MATTER,
    }[which]
    cert = issue(root, profile, p256_key.public_key())
    at = str(int((NOW + timedelta(days=1)).timestamp()))
    result = subprocess.run(
        [
            "openssl",
            "verify",
            "-x509_strict",
            "-attime",
            at,
            "-CAfile",
            _write(tmp_path / "root.pem", root.cert),
            _write(tmp_path / "dev.pem", cert),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith(": OK")
