"""The byte encodings the audit log hashes and signs. docs/audit.md specifies them for auditors; a test checks
the worked example there against this module, so the document and the code cannot drift apart.

Entry hash (all integers big-endian, strings UTF-8):

    hash = SHA-256( b"birthline-audit-entry-v1"            24 bytes, domain separation
                  || u64(seq)                              8 bytes
                  || f64(time)                             8 bytes, IEEE 754 binary64
                  || u32(len(actor)) || actor
                  || u32(len(event)) || event
                  || u32(len(data))  || data               canonical JSON text, ASCII
                  || prev_hash )                           32 bytes; 32 zero bytes for seq 1

Checkpoint signature: ECDSA P-256 with SHA-256 (DER Ecdsa-Sig-Value) over

    b"birthline-audit-checkpoint-v1" || u64(seq) || head_hash
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

ENTRY_DOMAIN = b"birthline-audit-entry-v1"
CHECKPOINT_DOMAIN = b"birthline-audit-checkpoint-v1"
HASH_SIZE = 32
GENESIS_HASH = bytes(HASH_SIZE)  # prev_hash of entry 1
MAX_SEQ = 2**63 - 1  # SQLite INTEGER PRIMARY KEY range

_U64 = struct.Struct(">Q")
_F64 = struct.Struct(">d")
_U32 = struct.Struct(">I")


def _json_default(value: object) -> object:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).hex()  # hashes, key digests: lowercase hex
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable in an audit entry")


def canonical_json(data: Mapping[str, Any]) -> str:
    """Keys sorted, no whitespace, ASCII only (\\uXXXX escapes), no NaN/Infinity; bytes become lowercase hex.

    Raises TypeError or ValueError when data cannot be represented.
    """
    return json.dumps(
        data, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False, default=_json_default
    )


def _lp(field: bytes) -> bytes:
    return _U32.pack(len(field)) + field


def entry_preimage(seq: int, time: float, actor: str, event: str, data: str, prev_hash: bytes) -> bytes:
    """The exact bytes an entry's hash covers. Raises ValueError for values the encoding cannot carry."""
    if not 1 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} out of range")
    if not math.isfinite(time):
        raise ValueError("time must be finite")
    if len(prev_hash) != HASH_SIZE:
        raise ValueError(f"prev_hash must be {HASH_SIZE} bytes, got {len(prev_hash)}")
    return b"".join(
        (
            ENTRY_DOMAIN,
            _U64.pack(seq),
            _F64.pack(time),
            _lp(actor.encode("utf-8")),
            _lp(event.encode("utf-8")),
            _lp(data.encode("utf-8")),
            bytes(prev_hash),
        )
    )


def entry_hash(seq: int, time: float, actor: str, event: str, data: str, prev_hash: bytes) -> bytes:
    return hashlib.sha256(entry_preimage(seq, time, actor, event, data, prev_hash)).digest()


def checkpoint_message(seq: int, head_hash: bytes) -> bytes:
    """What the audit key signs: the head (seq, hash) under its own domain prefix."""
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"seq {seq} out of range")
    if len(head_hash) != HASH_SIZE:
        raise ValueError(f"head hash must be {HASH_SIZE} bytes, got {len(head_hash)}")
    return CHECKPOINT_DOMAIN + _U64.pack(seq) + bytes(head_hash)


SIGNATURE_ALGORITHM = ec.ECDSA  # with SHA-256; P-256 keys only (see AUDIT_CURVE)
AUDIT_CURVE = ec.SECP256R1


def spki_der(public_key: ec.EllipticCurvePublicKey) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_fingerprint(public_key: ec.EllipticCurvePublicKey | bytes) -> bytes:
    """SHA-256 of the SubjectPublicKeyInfo DER: what an auditor pins."""
    der = public_key if isinstance(public_key, bytes) else spki_der(public_key)
    return hashlib.sha256(der).digest()
