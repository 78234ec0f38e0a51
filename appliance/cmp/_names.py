"""Name and GeneralName between DER and cryptography's x509 objects (the types string attributes had are kept)."""

from __future__ import annotations

import functools
import ipaddress

from cryptography import x509
from cryptography.x509.name import _ASN1Type

from appliance.cmp import _der
from appliance.der import oid_content

_STRING_TYPES: dict[int, tuple[_ASN1Type, str]] = {
    0x0C: (_ASN1Type.UTF8String, "utf-8"),
    0x12: (_ASN1Type.NumericString, "ascii"),
    0x13: (_ASN1Type.PrintableString, "ascii"),
    0x14: (_ASN1Type.T61String, "latin-1"),
    0x16: (_ASN1Type.IA5String, "ascii"),
    0x1A: (_ASN1Type.VisibleString, "ascii"),
    0x1C: (_ASN1Type.UniversalString, "utf-32-be"),
    0x1E: (_ASN1Type.BMPString, "utf-16-be"),
}
MAX_NAME_ATTRIBUTES = 64


# Every message of a conversation carries the same few sender and recipient names: building x509.Name objects
# was a tenth of the forwarder's CPU per record. x509.Name is immutable, so one object can serve every message;
# failures (ValueError) are not cached and are raised again each time.
@functools.lru_cache(maxsize=1024)
def name_from_der(der: bytes) -> x509.Name:
    """A Name (RDNSequence) from its complete DER; ValueError if it is not one we can represent."""
    top = _der.read_frame(der, 0, len(der))
    if top.tag != 0x30 or top.end != len(der):
        raise _der.Malformed("Name is not a single SEQUENCE")
    rdns: list[x509.RelativeDistinguishedName] = []
    count = 0
    for rdn in _der.children(der, top):
        if rdn.tag != 0x31:
            raise _der.Malformed("RDN is not a SET")
        attrs: list[x509.NameAttribute[str | bytes]] = []
        for atv in _der.children(der, rdn):
            count += 1
            if atv.tag != 0x30 or count > MAX_NAME_ATTRIBUTES:
                raise _der.Malformed("bad or too many name attributes")
            parts = _der.children(der, atv)
            if len(parts) != 2 or parts[0].tag != 0x06:
                raise _der.Malformed("bad AttributeTypeAndValue")
            oid = x509.ObjectIdentifier(_der.oid_from_content(der[parts[0].content : parts[0].end]))
            kind = _STRING_TYPES.get(parts[1].tag)
            if kind is None:
                raise _der.Malformed(f"name attribute {oid.dotted_string} is not a string")
            text = der[parts[1].content : parts[1].end].decode(kind[1])
            attrs.append(x509.NameAttribute(oid, text, _type=kind[0]))
        if not attrs:
            raise _der.Malformed("empty RDN")
        rdns.append(x509.RelativeDistinguishedName(attrs))
    return x509.Name(rdns)


@functools.lru_cache(maxsize=1024)
def general_name_from_der(der: bytes) -> x509.GeneralName:
    """One GeneralName TLV (as found in a PKIHeader or a CertId). Cached as name_from_der is: the sender and
    recipient of a peer's messages repeat in every header (twice per record in an upstream drain), and a
    GeneralName is immutable."""
    top = _der.read_frame(der, 0, len(der))
    if top.end != len(der):
        raise _der.Malformed("trailing bytes after GeneralName")
    content = der[top.content : top.end]
    tag = top.tag
    if tag == 0xA4:
        inner = _der.children(der, top)
        if len(inner) != 1:
            raise _der.Malformed("directoryName must hold one Name")
        return x509.DirectoryName(name_from_der(der[inner[0].start : inner[0].end]))
    if tag == 0x81:
        return x509.RFC822Name(content.decode("ascii"))
    if tag == 0x82:
        return x509.DNSName(content.decode("ascii"))
    if tag == 0x86:
        return x509.UniformResourceIdentifier(content.decode("ascii"))
    if tag == 0x87:
        if len(content) not in (4, 16):
            raise _der.Malformed("iPAddress must be 4 or 16 octets")
        return x509.IPAddress(ipaddress.ip_address(content))
    if tag == 0x88:
        return x509.RegisteredID(x509.ObjectIdentifier(_der.oid_from_content(content)))
    if tag == 0xA0:
        parts = _der.children(der, top)
        if len(parts) != 2 or parts[0].tag != 0x06 or parts[1].tag != 0xA0:
            raise _der.Malformed("bad otherName")
        value = _der.children(der, parts[1])
        if len(value) != 1:
            raise _der.Malformed("bad otherName value")
        type_id = x509.ObjectIdentifier(_der.oid_from_content(der[parts[0].content : parts[0].end]))
        return x509.OtherName(type_id, der[value[0].start : value[0].end])
    raise _der.Malformed(f"unsupported GeneralName choice (tag 0x{tag:02x})")


def general_name_to_der(name: x509.GeneralName) -> bytes:
    if isinstance(name, x509.DirectoryName):
        return _der.context_cons(4, name.value.public_bytes())
    if isinstance(name, x509.RFC822Name):
        return _der.context_prim(1, name.value.encode("ascii"))
    if isinstance(name, x509.DNSName):
        return _der.context_prim(2, name.value.encode("ascii"))
    if isinstance(name, x509.UniformResourceIdentifier):
        return _der.context_prim(6, name.value.encode("ascii"))
    if isinstance(name, x509.IPAddress):
        if not isinstance(name.value, ipaddress.IPv4Address | ipaddress.IPv6Address):
            raise _der.Malformed("iPAddress must be an address, not a network")
        return _der.context_prim(7, name.value.packed)
    if isinstance(name, x509.RegisteredID):
        return _der.context_prim(8, oid_content(name.value.dotted_string))
    if isinstance(name, x509.OtherName):
        return _der.context_cons(0, _der.oid(name.type_id.dotted_string) + _der.context_cons(0, name.value))
    raise _der.Malformed(f"unsupported GeneralName {type(name).__name__}")


NULL_DN = x509.DirectoryName(x509.Name([]))
"""The empty directory name RFC 9483 uses where a sender or recipient is not known."""
