"""Turn a profile, a device serial and a verified public key into an unsigned certificate.

Only the public key comes from the device. Subject, validity and every extension come from the profile, so a
CSR asking for cA=TRUE, extra names or a long validity changes nothing (domain.md section 2).
"""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import AuthorityInformationAccessOID, NameOID

from appliance import der
from appliance.profiles.config import not_after_datetime
from appliance.profiles.model import (
    KEY_USAGES,
    OID_HARDWARE_MODULE_NAME,
    OID_MASA_URL,
    OID_MATTER_PID,
    OID_MATTER_VID,
    Profile,
)
from appliance.profiles.serial import validate_device_serial


def hardware_module_name(hw_type: str, hw_serial: bytes) -> x509.OtherName:
    """RFC 4108 5: HardwareModuleName ::= SEQUENCE { hwType OBJECT IDENTIFIER, hwSerialNum OCTET STRING }."""
    return x509.OtherName(
        x509.ObjectIdentifier(OID_HARDWARE_MODULE_NAME),
        der.sequence(der.oid(hw_type), der.octet_string(hw_serial)),
    )


def _subject(profile: Profile, device_serial: str) -> x509.Name:
    attrs: list[x509.NameAttribute[str]] = []
    if profile.subject_o is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, profile.subject_o))
    if profile.subject_ou is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, profile.subject_ou))
    if profile.kind == "matter-dac":
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, device_serial))
        assert profile.vendor_id is not None and profile.product_id is not None  # parse_profiles guarantees
        # Matter encodes VID/PID as UTF8String of 4 uppercase hex digits (Matter 6.2.2.2).
        attrs.append(x509.NameAttribute(x509.ObjectIdentifier(OID_MATTER_VID), profile.vendor_id))
        attrs.append(x509.NameAttribute(x509.ObjectIdentifier(OID_MATTER_PID), profile.product_id))
    else:
        if profile.subject_cn is not None:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, profile.subject_cn))
        # X.520 defines serialNumber as PrintableString; cryptography would default to UTF8String, which
        # RFC 8995 2.3.1 pledges and strict parsers do not expect.
        attrs.append(
            x509.NameAttribute(NameOID.SERIAL_NUMBER, device_serial, _type=_ASN1Type.PrintableString)
        )
    return x509.Name(attrs)


@functools.lru_cache(maxsize=64)
def _issuer_parts(issuer_cert: x509.Certificate) -> tuple[x509.Name, x509.AuthorityKeyIdentifier]:
    # Parsed from the issuer's certificate once, not once per certificate issued: ~40 us saved each.
    return issuer_cert.subject, _authority_key_identifier(issuer_cert)


@functools.lru_cache(maxsize=256)
def _fixed_extensions(profile: Profile) -> tuple[tuple[x509.ExtensionType, bool], ...]:
    """The profile's extensions that are the same in every certificate it makes, in the order they are
    added, with their criticality; built once per profile (a frozen dataclass)."""
    out: list[tuple[x509.ExtensionType, bool]] = []
    if profile.basic_constraints:
        out.append((x509.BasicConstraints(ca=False, path_length=None), True))
    if profile.key_usage:
        flags = {name: name in profile.key_usage for name in KEY_USAGES}
        out.append((x509.KeyUsage(key_cert_sign=False, crl_sign=False, **flags), profile.key_usage_critical))
    return tuple(out)


@functools.lru_cache(maxsize=256)
def _trailing_extensions(profile: Profile) -> tuple[tuple[x509.ExtensionType, bool], ...]:
    """Like _fixed_extensions, for those added after the device-specific ones."""
    out: list[tuple[x509.ExtensionType, bool]] = []
    if profile.masa_url is not None:
        masa = x509.UnrecognizedExtension(
            x509.ObjectIdentifier(OID_MASA_URL), der.ia5_string(profile.masa_url)
        )
        out.append((masa, False))
    if profile.crl_urls:
        # One distribution point: the URLs are alternative locations of the same CRL (RFC 5280 4.2.1.13).
        point = x509.DistributionPoint(
            full_name=[x509.UniformResourceIdentifier(u) for u in profile.crl_urls],
            relative_name=None,
            reasons=None,
            crl_issuer=None,
        )
        out.append((x509.CRLDistributionPoints([point]), False))
    if profile.ocsp_url is not None:
        aia = x509.AuthorityInformationAccess(
            [
                x509.AccessDescription(
                    AuthorityInformationAccessOID.OCSP, x509.UniformResourceIdentifier(profile.ocsp_url)
                )
            ]
        )
        out.append((aia, False))
    return tuple(out)


def _authority_key_identifier(issuer_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    try:
        ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        # Must still match what the issuer's own certificate would compute, so path builders find it.
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key())  # type: ignore[arg-type]
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def validity(profile: Profile, now: datetime) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) for a certificate issued at `now` (timezone-aware)."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    # X.509 times have whole seconds; truncating here keeps notBefore equal to what is encoded.
    now = now.astimezone(UTC).replace(microsecond=0)
    not_before = now - timedelta(seconds=profile.backdate_seconds)
    if profile.validity_days is not None:
        not_after = now + timedelta(days=profile.validity_days)
    else:
        assert profile.not_after is not None  # parse_profiles guarantees exactly one of the two
        not_after = not_after_datetime(profile.not_after)
    if not_after <= not_before:
        raise ValueError("profile not_after lies before the issuance time")
    return not_before, not_after


def build_certificate(
    profile: Profile,
    *,
    issuer_cert: x509.Certificate,
    device_serial: str,
    public_key: CertificatePublicKeyTypes,
    serial_number: int,
    now: datetime,
) -> x509.CertificateBuilder:
    """The unsigned certificate for one device. The caller signs it with the issuing key and verifies it."""
    validate_device_serial(profile, device_serial)
    not_before, not_after = validity(profile, now)

    issuer_name, aki = _issuer_parts(issuer_cert)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_subject(profile, device_serial))
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial_number)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )
    for extension, critical in _fixed_extensions(profile):
        builder = builder.add_extension(extension, critical=critical)
    builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    builder = builder.add_extension(aki, critical=False)
    if profile.hardware_module_name is not None:
        # Non-critical: the subject is not empty (RFC 5280 4.2.1.6).
        san = x509.SubjectAlternativeName(
            [hardware_module_name(profile.hardware_module_name, device_serial.encode("ascii"))]
        )
        builder = builder.add_extension(san, critical=False)
    for extension, critical in _trailing_extensions(profile):
        builder = builder.add_extension(extension, critical=critical)
    return builder
