"""Key schedule and frame tags, cross-checked against an independent stdlib HKDF (RFC 5869)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from stations import crypto


def _hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block = b"", b""
    for i in range(1, -(-length // 32) + 1):
        block = hmac.new(prk, block + info + bytes([i]), hashlib.sha256).digest()
        okm += block
    return okm[:length]


def test_rfc5869_case_1_with_the_reference_hkdf() -> None:
    okm = _hkdf(bytes([0x0B] * 22), bytes(range(13)), bytes(range(0xF0, 0xFA)), 42)
    assert okm.hex() == (
        "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865"
    )


def test_derive_keys_matches_the_documented_construction() -> None:
    key, ns, na, th = bytes(range(32)), b"\x01" * 32, b"\x02" * 32, b"\x03" * 32
    keys = crypto.derive_keys(key, ns, na, th)
    okm = _hkdf(key, ns + na, b"birthline station v1" + th, 96)
    assert (keys.station_proof, keys.appliance_proof, keys.mac) == (okm[:32], okm[32:64], okm[64:])


def test_derive_keys_rejects_a_short_key() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        crypto.derive_keys(b"short", b"\x01" * 32, b"\x02" * 32, b"\x03" * 32)


def test_transcript_hash_is_length_prefixed() -> None:
    # Moving a byte from one body to the other must change the hash.
    assert crypto.transcript_hash(b"ab", b"c") != crypto.transcript_hash(b"a", b"bc")


def test_frame_tag_depends_on_every_input() -> None:
    base = {"direction": crypto.STATION_TO_APPLIANCE, "counter": 1, "frame_type": 0x92, "length": 20}
    tag = crypto.frame_tag(b"k" * 32, b"body", **base)
    assert len(tag) == crypto.TAG_LEN
    for field, other in (("direction", crypto.APPLIANCE_TO_STATION), ("counter", 2), ("frame_type", 0x93)):
        assert crypto.frame_tag(b"k" * 32, b"body", **{**base, field: other}) != tag
    assert crypto.frame_tag(b"k" * 32, b"body", **{**base, "length": 21}) != tag
    assert crypto.frame_tag(b"k" * 32, b"bodY", **base) != tag
    assert crypto.frame_tag(b"K" * 32, b"body", **base) != tag
