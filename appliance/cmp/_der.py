"""Framing of received CMP bytes and the DER encoders the builders use.

`scan` walks every element of a received message once, before pyasn1 sees it: definite lengths only,
single-byte tags, every child inside its parent, nothing after the end, a bounded depth. It accepts
non-minimal length octets on purpose (pyasn1 does too): protection is verified over the bytes received, so
an odd but well-framed encoding is harmless, and slicing here is what lets us keep those bytes.

Everything here raises ValueError; the parser turns that into one CmpError at its boundary.
"""

from __future__ import annotations

from datetime import UTC, datetime

from appliance.der import Tlv, bit_string, encode_length, octet_string, oid, sequence, tlv, utf8_string

__all__ = [
    "Tlv",
    "algorithm_identifier",
    "bit_string",
    "boolean",
    "children",
    "context_cons",
    "context_prim",
    "encode_length",
    "generalized_time",
    "integer",
    "named_bits",
    "null",
    "octet_string",
    "oid",
    "oid_from_content",
    "read_frame",
    "scan",
    "sequence",
    "tlv",
    "utf8_string",
]

TAG_CONSTRUCTED = 0x20
MAX_LENGTH_OCTETS = 4


def read_frame(data: bytes, offset: int, limit: int) -> Tlv:
    """One element at `offset` that must end at or before `limit`. Non-minimal lengths are accepted."""
    if offset + 2 > limit:
        raise ValueError("truncated element")
    tag = data[offset]
    if tag & 0x1F == 0x1F:
        raise ValueError("multi-byte tags are not supported")
    first = data[offset + 1]
    pos = offset + 2
    if first < 0x80:
        length = first
    elif first == 0x80:
        raise ValueError("indefinite length is not allowed")
    else:
        count = first & 0x7F
        if count > MAX_LENGTH_OCTETS:
            raise ValueError("length field too long")
        if pos + count > limit:
            raise ValueError("truncated length")
        length = int.from_bytes(data[pos : pos + count], "big")
        pos += count
    if pos + length > limit:
        raise ValueError("length beyond the end of its container")
    return Tlv(tag, offset, pos, pos + length)


def children(data: bytes, parent: Tlv) -> list[Tlv]:
    if not parent.tag & TAG_CONSTRUCTED:
        raise ValueError("primitive element has no children")
    out: list[Tlv] = []
    pos = parent.content
    while pos < parent.end:
        child = read_frame(data, pos, parent.end)
        out.append(child)
        pos = child.end
    return out


def scan(data: bytes, max_depth: int) -> Tlv:
    """Check the framing of the whole input (one element, no trailing bytes) in one linear pass."""
    top = read_frame(data, 0, len(data))
    if top.end != len(data):
        raise ValueError(f"{len(data) - top.end} trailing byte(s) after the message")
    stack: list[tuple[Tlv, int]] = [(top, 1)]
    while stack:
        element, depth = stack.pop()
        if not element.tag & TAG_CONSTRUCTED:
            continue
        if depth >= max_depth:
            raise ValueError(f"elements nested deeper than {max_depth}")
        stack.extend((child, depth + 1) for child in children(data, element))
    return top


def oid_from_content(content: bytes) -> str:
    if not content or content[-1] & 0x80:
        raise ValueError("bad OBJECT IDENTIFIER encoding")
    if len(content) > 64:
        raise ValueError("OBJECT IDENTIFIER too long")
    arcs: list[int] = []
    value = 0
    started = False
    for byte in content:
        if not started and byte == 0x80:
            raise ValueError("non-minimal OBJECT IDENTIFIER arc")
        started = True
        value = (value << 7) | (byte & 0x7F)
        if not byte & 0x80:
            arcs.append(value)
            value = 0
            started = False
    first = arcs[0]
    head = [0, first] if first < 40 else [1, first - 40] if first < 80 else [2, first - 80]
    return ".".join(str(a) for a in head + arcs[1:])


def integer(value: int) -> bytes:
    length = (value + (value < 0)).bit_length() // 8 + 1
    return tlv(0x02, value.to_bytes(length, "big", signed=True))


def boolean(value: bool) -> bytes:
    return tlv(0x01, b"\xff" if value else b"\x00")


def null() -> bytes:
    return b"\x05\x00"


def generalized_time(when: datetime) -> bytes:
    if when.tzinfo is None:
        raise ValueError("messageTime must be timezone-aware")
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
