"""Minimal DER encoding and strict outer-structure parsing.

The issuance hot path needs a handful of encodings (the hardwareModuleName otherName, the MASA URL
extension) and one split of a signed certificate into tbs / algorithm / signature. pyasn1 is far slower for
this, so we build the bytes directly. Parsing here is deliberately strict and shallow: single-byte tags,
definite minimal lengths, nothing past the end. Anything else is a ValueError; callers map it to a refusal.
"""

from __future__ import annotations

from typing import NamedTuple

TAG_INTEGER = 0x02
TAG_BIT_STRING = 0x03
TAG_OCTET_STRING = 0x04
TAG_OID = 0x06
TAG_UTF8_STRING = 0x0C
TAG_PRINTABLE_STRING = 0x13
TAG_IA5_STRING = 0x16
TAG_UTC_TIME = 0x17
TAG_GENERALIZED_TIME = 0x18
TAG_SEQUENCE = 0x30
TAG_SET = 0x31

# Bounds for OIDs we accept from configuration. Real OIDs stay far below both; the limits keep a hostile or
# mistyped value from producing a huge encoding.
MAX_OID_ARCS = 32
MAX_OID_ARC_BITS = 128


def encode_length(n: int) -> bytes:
    """DER length octets: short form below 128, otherwise the minimal long form."""
    if n < 0:
        raise ValueError("negative length")
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    if len(body) > 126:
        raise ValueError("length too large")
    return bytes((0x80 | len(body),)) + body


def tlv(tag: int, content: bytes) -> bytes:
    if not 0 <= tag <= 0xFF or tag & 0x1F == 0x1F:
        # High tag numbers need multi-byte tags, which nothing we emit uses.
        raise ValueError(f"unsupported tag 0x{tag:x}")
    # The header in one bytes() for the lengths every certificate and OCSP answer is made of (tens of calls
    # each): ~40% less time a call than joining tag and encode_length's result.
    n = len(content)
    if n < 0x80:
        return bytes((tag, n)) + content
    if n < 0x100:
        return bytes((tag, 0x81, n)) + content
    if n < 0x10000:
        return bytes((tag, 0x82, n >> 8, n & 0xFF)) + content
    return bytes((tag,)) + encode_length(n) + content


def sequence(*parts: bytes) -> bytes:
    return tlv(TAG_SEQUENCE, b"".join(parts))


def _base128(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    return bytes(reversed(out))


def oid_content(dotted: str) -> bytes:
    """The content octets of an OBJECT IDENTIFIER; ValueError if `dotted` is not a valid OID."""
    parts = dotted.split(".")
    if len(parts) < 2:
        raise ValueError(f"OID needs at least two arcs: {dotted!r}")
    if len(parts) > MAX_OID_ARCS:
        raise ValueError(f"OID has more than {MAX_OID_ARCS} arcs")
    arcs: list[int] = []
    for part in parts:
        # isdecimal() alone would accept non-ASCII digits such as Arabic-Indic ones.
        if not part or not part.isascii() or not part.isdecimal() or (len(part) > 1 and part[0] == "0"):
            raise ValueError(f"bad OID arc {part!r} in {dotted!r}")
        if len(part) > 40:
            raise ValueError(f"OID arc too large in {dotted!r}")
        arc = int(part)
        if arc.bit_length() > MAX_OID_ARC_BITS:
            raise ValueError(f"OID arc too large in {dotted!r}")
        arcs.append(arc)
    first, second = arcs[0], arcs[1]
    if first > 2 or (first < 2 and second > 39):
        raise ValueError(f"bad OID root {first}.{second} in {dotted!r}")
    return _base128(first * 40 + second) + b"".join(_base128(a) for a in arcs[2:])


def oid(dotted: str) -> bytes:
    """A complete OBJECT IDENTIFIER TLV."""
    return tlv(TAG_OID, oid_content(dotted))


def octet_string(data: bytes) -> bytes:
    return tlv(TAG_OCTET_STRING, data)


def ia5_string(text: str) -> bytes:
    try:
        raw = text.encode("ascii")
    except UnicodeEncodeError:
        raise ValueError("IA5String takes ASCII only") from None
    return tlv(TAG_IA5_STRING, raw)


def utf8_string(text: str) -> bytes:
    return tlv(TAG_UTF8_STRING, text.encode("utf-8"))


def bit_string(data: bytes, unused: int = 0) -> bytes:
    if not 0 <= unused <= 7 or (unused and not data):
        raise ValueError("bad unused-bits count")
    return tlv(TAG_BIT_STRING, bytes((unused,)) + data)


class Tlv(NamedTuple):
    """One parsed element: `data[start:end]` is the whole TLV, `data[content:end]` its content."""

    tag: int
    start: int
    content: int
    end: int


# tuple.__new__ straight away: a NamedTuple's own __new__ is Python code, half the cost of this function, and
# every request and CSR is parsed through it tens of times.
_new_tlv = tuple.__new__


def read_tlv(data: bytes, offset: int = 0, limit: int | None = None) -> Tlv:
    """Parse the element at `offset`, which must end at or before `limit` (default: end of data).

    Strict DER: single-byte tag, definite length, minimal length encoding. Constant work per call, so a
    hostile input costs at most one pass however it is nested.
    """
    end_of_input = len(data) if limit is None else limit
    if offset + 2 > end_of_input:
        raise ValueError("truncated DER element")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte DER tags are not supported")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise ValueError("indefinite length is not DER")
    else:
        count = first & 0x7F
        if count > 4:
            # 4 length octets already address 4 GiB; anything longer cannot fit in our size limits.
            raise ValueError("DER length too large")
        if pos + count > end_of_input:
            raise ValueError("truncated DER length")
        length = int.from_bytes(data[pos : pos + count], "big")
        if length < 0x80 or data[pos] == 0:
            raise ValueError("non-minimal DER length")
        pos += count
    if pos + length > end_of_input:
        raise ValueError("DER length beyond the end of the input")
    return _new_tlv(Tlv, (tag, offset, pos, pos + length))


def read_children(data: bytes, parent: Tlv) -> list[Tlv]:
    """The direct children of a constructed element, each checked to lie within it."""
    children: list[Tlv] = []
    pos = parent.content
    while pos < parent.end:
        child = read_tlv(data, pos, parent.end)
        children.append(child)
        pos = child.end
    return children


def assemble_certificate(tbs: bytes, signature_algorithm: bytes, signature: bytes) -> bytes:
    """Certificate ::= SEQUENCE { tbsCertificate, signatureAlgorithm, signatureValue BIT STRING }.

    `tbs` and `signature_algorithm` are complete TLVs, inserted byte for byte so the signature stays valid.
    """
    return sequence(tbs, signature_algorithm, bit_string(signature))


def split_certificate(der: bytes) -> tuple[bytes, bytes, bytes]:
    """(tbsCertificate TLV, signatureAlgorithm TLV, signature bytes) of exactly one DER certificate."""
    outer = read_tlv(der)
    if outer.tag != TAG_SEQUENCE:
        raise ValueError("certificate is not a SEQUENCE")
    if outer.end != len(der):
        raise ValueError("trailing bytes after the certificate")
    children = read_children(der, outer)
    if len(children) != 3:
        raise ValueError("certificate SEQUENCE must have exactly three elements")
    tbs, alg, sig = children
    if tbs.tag != TAG_SEQUENCE or alg.tag != TAG_SEQUENCE:
        raise ValueError("tbsCertificate and signatureAlgorithm must be SEQUENCEs")
    if sig.tag != TAG_BIT_STRING or sig.end - sig.content < 1:
        raise ValueError("signatureValue must be a BIT STRING")
    if der[sig.content] != 0:
        # Every signature algorithm we use yields whole octets.
        raise ValueError("signatureValue has unused bits")
    return der[tbs.start : tbs.end], der[alg.start : alg.end], der[sig.content + 1 : sig.end]


def split_certificates(blob: bytes) -> tuple[bytes, ...]:
    """DER certificates stored back to back (ra_request.chain_der) as separate DER strings."""
    out: list[bytes] = []
    pos = 0
    while pos < len(blob):
        t = read_tlv(blob, pos)
        out.append(blob[t.start : t.end])
        pos = t.end
    return tuple(out)


def tbs_subject(tbs: bytes) -> bytes:
    """The subject Name TLV of a DER TBSCertificate (version [0] present, as in every v3 certificate)."""
    outer = read_tlv(tbs)
    fields = read_children(tbs, outer)
    index = 5 if fields and fields[0].tag == 0xA0 else 4
    subject = fields[index]
    if subject.tag != TAG_SEQUENCE:
        raise ValueError("TBSCertificate subject is not a SEQUENCE")
    return tbs[subject.start : subject.end]
