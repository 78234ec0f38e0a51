"""Key derivation, handshake proofs and frame tags (HKDF-SHA256 and HMAC-SHA256).

Every input is length-fixed or length-prefixed, so two different transcripts never give the same MAC input.
"""

from __future__ import annotations

import hashlib
import hmac
import struct
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

STATION_KEY_LEN = 32
TAG_LEN = 12  # 96-bit truncated HMAC-SHA256; see docs/station-protocol.md "Tag length"
KDF_LABEL = b"birthline station v1"

# Direction bytes in every frame tag, so a frame can never be reflected back to its sender as valid.
STATION_TO_APPLIANCE = 0x53  # "S"
APPLIANCE_TO_STATION = 0x41  # "A"


@dataclass(frozen=True)
class SessionKeys:
    station_proof: bytes
    appliance_proof: bytes
    mac: bytes


def transcript_hash(hello_body: bytes, challenge_body: bytes) -> bytes:
    """SHA-256 over the two handshake bodies as received, each behind a u16 length."""
    h = hashlib.sha256()
    for body in (hello_body, challenge_body):
        h.update(struct.pack(">H", len(body)))
        h.update(body)
    return h.digest()


def derive_keys(station_key: bytes, station_nonce: bytes, appliance_nonce: bytes, th: bytes) -> SessionKeys:
    if len(station_key) != STATION_KEY_LEN:
        raise ValueError("station key must be 32 bytes")
    okm = HKDF(
        algorithm=hashes.SHA256(),
        length=96,
        salt=station_nonce + appliance_nonce,
        info=KDF_LABEL + th,
    ).derive(station_key)
    return SessionKeys(okm[0:32], okm[32:64], okm[64:96])


def station_proof(keys: SessionKeys, th: bytes) -> bytes:
    return hmac.new(keys.station_proof, b"station" + th, hashlib.sha256).digest()


def appliance_proof(keys: SessionKeys, th: bytes, station_proof_value: bytes) -> bytes:
    # Covering the station's proof too makes AUTH_OK answer exactly one AUTH.
    return hmac.new(keys.appliance_proof, b"appliance" + th + station_proof_value, hashlib.sha256).digest()


def frame_tag(
    mac_key: bytes, body: bytes, *, direction: int, counter: int, frame_type: int, length: int
) -> bytes:
    """Truncated HMAC over direction, counter, the header's type and length fields, and the message body."""
    head = struct.pack(">BIBH", direction, counter, frame_type, length)
    return hmac.new(mac_key, head + body, hashlib.sha256).digest()[:TAG_LEN]


def equal(a: bytes, b: bytes) -> bool:
    return hmac.compare_digest(a, b)
