"""The CSR attributes of a label (RFC 7030 4.5, ASN.1 as RFC 8951 4 corrects it), built from its profile: what a
client should put in its CSR for this appliance to issue. Pure code; the structures are pyasn1-alt-modules'
(rfc7030.CsrAttrs, rfc5652.Attribute), not hand-rolled.

    CsrAttrs ::= SEQUENCE SIZE (0..MAX) OF AttrOrOID
    AttrOrOID ::= CHOICE { oid OBJECT IDENTIFIER, attribute Attribute }

In order:
- challengePassword (OID), when the label requires channel binding: the tls-unique or tls-exporter value goes
  there (RFC 7030 3.5);
- serialNumber (OID): the subject attribute that names the device (the profile builds the rest of the subject);
- the key types the profile accepts: an id-ecPublicKey attribute whose values are the allowed curves, an
  rsaEncryption attribute whose values are the allowed sizes (INTEGER), id-Ed25519 (OID);
- the signature algorithms a CSR of those keys may be signed with (OIDs): ecdsa-with-SHA256 / SHA384,
  sha256WithRSAEncryption.
Extensions are not asked for: the profile builds every extension, and what a CSR requests is ignored.
"""

from __future__ import annotations

from typing import Final

from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_alt_modules import rfc5652, rfc7030

from appliance.profiles import Profile

CHALLENGE_PASSWORD: Final = "1.2.840.113549.1.9.7"  # noqa: S105 - the attribute's OID
SERIAL_NUMBER: Final = "2.5.4.5"
ID_EC_PUBLIC_KEY: Final = "1.2.840.10045.2.1"
RSA_ENCRYPTION: Final = "1.2.840.113549.1.1.1"
ID_ED25519: Final = "1.3.101.112"
CURVES: Final = {"ec-p256": "1.2.840.10045.3.1.7", "ec-p384": "1.3.132.0.34"}
RSA_SIZES: Final = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}
ECDSA_WITH_SHA256: Final = "1.2.840.10045.4.3.2"
ECDSA_WITH_SHA384: Final = "1.2.840.10045.4.3.3"
SHA256_WITH_RSA: Final = "1.2.840.113549.1.1.11"


def _oid(dotted: str) -> rfc7030.AttrOrOID:
    item = rfc7030.AttrOrOID()
    item["oid"] = univ.ObjectIdentifier(dotted)
    return item


def _attribute(dotted: str, values: list[univ.Asn1Item]) -> rfc7030.AttrOrOID:
    attr = rfc5652.Attribute()
    attr["attrType"] = univ.ObjectIdentifier(dotted)
    for i, value in enumerate(values):
        attr["attrValues"][i] = univ.Any(der_encoder.encode(value))
    item = rfc7030.AttrOrOID()
    item["attribute"] = attr
    return item


def csr_attributes(profile: Profile, *, channel_binding: bool) -> bytes:
    """The CsrAttrs DER for a label issuing with `profile` (see the module docstring)."""
    algorithms = profile.key_algorithms
    items = [_oid(CHALLENGE_PASSWORD)] if channel_binding else []
    items.append(_oid(SERIAL_NUMBER))
    curves = [CURVES[a] for a in sorted(CURVES) if a in algorithms]
    if curves:
        items.append(_attribute(ID_EC_PUBLIC_KEY, [univ.ObjectIdentifier(c) for c in curves]))
    sizes = [RSA_SIZES[a] for a in sorted(RSA_SIZES, key=RSA_SIZES.__getitem__) if a in algorithms]
    if sizes:
        items.append(_attribute(RSA_ENCRYPTION, [univ.Integer(n) for n in sizes]))
    if "ed25519" in algorithms:
        items.append(_oid(ID_ED25519))
    signatures = [ECDSA_WITH_SHA256] if "ec-p256" in algorithms else []
    signatures += [ECDSA_WITH_SHA384] if "ec-p384" in algorithms else []
    signatures += [SHA256_WITH_RSA] if sizes else []
    items.extend(_oid(s) for s in signatures)
    attrs = rfc7030.CsrAttrs()
    attrs.extend(items)
    encoded: bytes = der_encoder.encode(attrs)
    return encoded
