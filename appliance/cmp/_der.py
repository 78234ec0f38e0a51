"""Framing of received CMP bytes and the DER encoders the builders use.

`scan` walks every element of a received message once, before anything is decoded: definite lengths only,
single-byte tags other than [UNIVERSAL 0] (end-of-contents), every child inside its parent, nothing after the
end, a bounded depth. It accepts non-minimal length octets on purpose (pyasn1 does too): protection is
verified over the bytes received, so an odd but well-framed encoding is harmless, and slicing here is what
lets us keep those bytes.

The `*_value` readers decode one primitive element the parser found with `children`, strictly as DER: the
exact universal tag (primitive form only), minimal INTEGER content, BIT STRING padding bits zero,
GeneralizedTime as YYYYMMDDHHMMSS[.fff]Z, valid UTF-8.

Everything here raises Malformed (a ValueError whose text is ours); the parser turns that into one CmpError at its
boundary, and only a Malformed's text reaches a peer.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime

from appliance.der import Tlv, bit_string, encode_length, octet_string, oid, sequence, tlv, utf8_string


class Malformed(ValueError):
    """Received bytes are not what they must be, in our own words: the text may be sent to the peer in a
    statusString (RFC 9810 PKIFreeText). A library's exception text never is (appliance/cmp/parse.py)."""


__all__ = [
    "Malformed",
    "Tlv",
    "algorithm_identifier",
    "bit_string",
    "bits_value",
    "boolean",
    "children",
    "context_cons",
    "context_prim",
    "encode_length",
    "generalized_time",
    "generalized_time_value",
    "integer",
    "integer_value",
    "named_bits",
    "null",
    "null_value",
    "octet_string",
    "octet_string_value",
    "oid",
    "oid_from_content",
    "oid_value",
    "read_frame",
    "scan",
    "sequence",
    "tlv",
    "utf8_string",
    "utf8_string_value",
]

TAG_CONSTRUCTED = 0x20
MAX_LENGTH_OCTETS = 4


def read_frame(data: bytes, offset: int, limit: int) -> Tlv:
    """One element at `offset` that must end at or before `limit`. Non-minimal lengths are accepted."""
    if offset + 2 > limit:
        raise Malformed("truncated element")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise Malformed("multi-byte tags are not supported")
    if tag & 0xDF == 0:
        raise Malformed("tag [UNIVERSAL 0] (end-of-contents) is not an element")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise Malformed("indefinite length is not allowed")
    else:
        count = first & 0x7F
        if count > MAX_LENGTH_OCTETS:
            raise Malformed("length field too long")
        if pos + count > limit:
            raise Malformed("truncated length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > limit:
        raise Malformed("length beyond the end of its container")
    return Tlv(tag, offset, pos, pos + length)


def children(data: bytes, parent: Tlv) -> list[Tlv]:
    if not parent.tag & TAG_CONSTRUCTED:
        raise Malformed("primitive element has no children")
    out: list[Tlv] = []
    pos = parent.content
    while pos < parent.end:
        child = read_frame(data, pos, parent.end)
        out.append(child)
        pos = child.end
    return out


def scan(data: bytes, max_depth: int) -> Tlv:
    """Check the framing of the whole input (one element, no trailing bytes) in one linear pass: the same
    checks as `read_frame` on every element, written out inline (no Tlv objects) because every received
    message, certificates and CSRs included, goes through here."""
    top = read_frame(data, 0, len(data))
    if top.end != len(data):
        raise Malformed(f"{len(data) - top.end} trailing byte(s) after the message")
    if not top.tag & TAG_CONSTRUCTED:
        return top
    if max_depth <= 1:
        raise Malformed(f"elements nested deeper than {max_depth}")
    ends = [top.end]  # the ends of the open constructed elements; the innermost last
    pos = top.content
    while ends:
        end = ends[-1]
        if pos == end:
            ends.pop()
            continue
        if pos + 2 > end:
            raise Malformed("truncated element")
        tag = data[pos]
        if tag & 0x1F == 0x1F:
            raise Malformed("multi-byte tags are not supported")
        if tag & 0xDF == 0:
            raise Malformed("tag [UNIVERSAL 0] (end-of-contents) is not an element")
        first = data[pos + 1]
        pos += 2
        if first < 0x80:
            length = first
        elif first == 0x80:
            raise Malformed("indefinite length is not allowed")
        else:
            count = first & 0x7F
            if count > MAX_LENGTH_OCTETS:
                raise Malformed("length field too long")
            if pos + count > end:
                raise Malformed("truncated length")
            length = int.from_bytes(data[pos : pos + count], "big")
            pos += count
        if pos + length > end:
            raise Malformed("length beyond the end of its container")
        if tag & TAG_CONSTRUCTED:
            if len(ends) + 1 >= max_depth:
                raise Malformed(f"elements nested deeper than {max_depth}")
            ends.append(pos + length)
        else:
            pos += length
    return top


def oid_from_content(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise Malformed("bad OBJECT IDENTIFIER encoding")
    if len(content) > 64:
        raise Malformed("OBJECT IDENTIFIER too long")
    arcs: list[int] = []
    value = 0
    started = False
    for byte in content:
        if not started and byte == 0x80:
            raise Malformed("non-minimal OBJECT IDENTIFIER arc")
        started = True
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
            started = False
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def _primitive(data: bytes, t: Tlv, tag: int, what: str) -> bytes:
    if t.tag != tag:
        raise Malformed(f"expected {what} (tag 0x{tag:02x}), found tag 0x{t.tag:02x}")
    return data[t.content : t.end]


def integer_value(data: bytes, t: Tlv) -> int:
    content = _primitive(data, t, 0x02, "INTEGER")
    if not content:
        raise Malformed("empty INTEGER")
    if len(content) > 1 and (content[0], content[1] & 0x80) in ((0x00, 0), (0xFF, 0x80)):
        raise Malformed("INTEGER not minimally encoded")
    return int.from_bytes(content, "big", signed=True)


def octet_string_value(data: bytes, t: Tlv) -> bytes:
    return _primitive(data, t, 0x04, "OCTET STRING")


def null_value(data: bytes, t: Tlv) -> None:
    if _primitive(data, t, 0x05, "NULL"):
        raise Malformed("NULL with content")


def oid_value(data: bytes, t: Tlv) -> str:
    return oid_from_content(_primitive(data, t, 0x06, "OBJECT IDENTIFIER"))


def utf8_string_value(data: bytes, t: Tlv) -> str:
    try:
        return _primitive(data, t, 0x0C, "UTF8String").decode("utf-8")
    except UnicodeDecodeError:
        raise Malformed("UTF8String is not valid UTF-8") from None


def bits_value(data: bytes, t: Tlv, below: int) -> frozenset[int]:
    """The numbers (< `below`) of the bits set in a BIT STRING; bit 0 is the top bit of the first octet.
    DER: unused-bits count 0..7 (0 when empty) and the unused bits zero."""
    content = _primitive(data, t, 0x03, "BIT STRING")
    if not content:
        raise Malformed("BIT STRING without its unused-bits octet")
    unused = content[0]
    if unused > 7 or (unused and len(content) == 1):
        raise Malformed("bad unused-bits count in BIT STRING")
    if unused and content[-1] & ((1 << unused) - 1):
        raise Malformed("unused bits of a BIT STRING are not zero")
    octets = content[1 : 1 + (below + 7) // 8]
    return frozenset(
        i * 8 + j
        for i, octet in enumerate(octets)
        if octet
        for j in range(8)
        if octet & (0x80 >> j) and i * 8 + j < below
    )


_GENERALIZED_TIME = re.compile(rb"(\d{4})(\d\d)(\d\d)(\d\d)(\d\d)(\d\d)(?:\.(\d*[1-9]))?Z")


def generalized_time_value(data: bytes, t: Tlv) -> datetime:
    """DER GeneralizedTime: UTC ("Z"), seconds present, optional fraction without trailing zeros (kept to the
    microsecond, further digits dropped)."""
    match = _GENERALIZED_TIME.fullmatch(_primitive(data, t, 0x18, "GeneralizedTime"))
    if match is None:
        raise Malformed("GeneralizedTime is not YYYYMMDDHHMMSS[.fff]Z")
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = match.group(7)
    micro = int(fraction[:6].ljust(6, b"0")) if fraction else 0
    return datetime(year, month, day, hour, minute, second, micro, tzinfo=UTC)


def integer(value: int) -> bytes:
    length = (value + (value < 0)).bit_length() // 8 + 1
    return tlv(0x02, value.to_bytes(length, "big", signed=True))


def boolean(value: bool) -> bytes:
    return tlv(0x01, b"\xff" if value else b"\x00")


def null() -> bytes:
    return b"\x05\x00"


def generalized_time(when: datetime) -> bytes:
    if when.tzinfo is None:
        raise Malformed("messageTime must be timezone-aware")
    return tlv(0x18, when.astimezone(UTC).strftime("%Y%m%d%H%M%SZ").encode("ascii"))


def context_prim(number: int, content: bytes) -> bytes:
    """[number] IMPLICIT on a primitive type: `content` is the content octets."""
    return tlv(0x80 | number, content)


def context_cons(number: int, content: bytes) -> bytes:
    """[number] EXPLICIT (content: the inner TLV) or IMPLICIT on a constructed type (content: its children)."""
    return tlv(0xA0 | number, content)


def named_bits(bits: frozenset[int] | set[int]) -> bytes:
    """A DER named-bit BIT STRING: bit 0 is the most significant bit of the first octet, no trailing zeros."""
    if not bits:
        return bit_string(b"")
    top = max(bits)
    data = bytearray(top // 8 + 1)
    for bit in bits:
        data[bit // 8] |= 0x80 >> (bit % 8)
    return bit_string(bytes(data), 7 - top % 8)


def algorithm_identifier(dotted: str, parameters: bytes | None = None) -> bytes:
    return sequence(oid(dotted), parameters or b"")
