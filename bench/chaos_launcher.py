"""`birthline run` with every HSM signature written down first: the crash campaign's launcher (bench only).

    python bench/chaos_launcher.py SIGNATURE_LOG run --config FILE

It wraps hsm.keys.c_sign, the package's only C_Sign, in THIS process (a monkeypatch here, nothing in the product):
after the token returns a signature and BEFORE the signature goes back to the caller, one JSON line is appended
to SIGNATURE_LOG and fsynced:

    {"key": <key label>, "mech": <mechanism>, "data": sha256(signed input), "sig": sha256(signature),
     "kind": cert | crl | ocsp | cmp | other, "msg": sha256(the message whose digest was signed) or null,
     "body": the CMP body type number (PKIBody's tag: 1 ip, 4 p10cr, 20 nested, ...) of a cmp ProtectedPart, or null}

so a SIGKILL anywhere after C_Sign still leaves the signature on record, and bench/chaos.py can check that every
signature the HSM made is accounted for. `kind` and `msg` come from the bytes the key classes hashed (hsm.keys
._digest is wrapped to remember digest -> message); `kind` is read from the message's first DER element: a
TBSCertificate starts with [0] version, a TBSCertList with INTEGER 1, an OCSP ResponseData with a responder [1]/[2],
a CMP ProtectedPart with the header SEQUENCE.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hsm.keys as hsm_keys
import hsm.verify as hsm_verify

_DIGEST_INFO_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420")


def kind_of(message: bytes) -> str:
    """What a signed message is, from its first DER element (see the module docstring)."""
    if len(message) < 4 or message[0] != 0x30:
        return "other"
    n = message[1]
    pos = 2 + (n & 0x7F if n & 0x80 else 0)
    if pos + 3 > len(message):
        return "other"
    first = message[pos]
    if first == 0xA0:
        return "cert"
    if message[pos : pos + 3] == b"\x02\x01\x01":
        return "crl"
    if first in (0xA1, 0xA2):
        return "ocsp"
    if first == 0x30:
        return "cmp"
    return "other"


def _tlv_end(message: bytes, pos: int) -> int:
    """Where the DER element starting at `pos` ends (-1 when it does not fit)."""
    if pos + 2 > len(message):
        return -1
    n = message[pos + 1]
    if n < 0x80:
        return pos + 2 + n
    count = n & 0x7F
    if count == 0 or count > 4 or pos + 2 + count > len(message):
        return -1
    return pos + 2 + count + int.from_bytes(message[pos + 2 : pos + 2 + count], "big")


def cmp_body(message: bytes) -> int | None:
    """The body type of a CMP ProtectedPart (SEQUENCE { header SEQUENCE, body [n] }): the tag number n."""
    if len(message) < 4 or message[0] != 0x30:
        return None
    n = message[1]
    header = 2 + (n & 0x7F if n & 0x80 else 0)
    body = _tlv_end(message, header)
    if body < 0 or body >= len(message) or message[body] & 0xE0 != 0xA0:
        return None
    return message[body] & 0x1F


class SignatureLog:
    def __init__(self, path: Path) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.lock = threading.Lock()
        self.messages: dict[bytes, tuple[str, str, int | None]] = {}  # digest -> (kind, sha256, CMP body)

    def remember(self, message: bytes, digest: bytes) -> None:
        if len(self.messages) > 100_000:  # bounded: an entry is used within the same call chain
            self.messages.clear()
        kind = kind_of(message)
        body = cmp_body(message) if kind == "cmp" else None
        self.messages[digest] = (kind, hashlib.sha256(message).hexdigest(), body)

    def record(self, key: Any, data: bytes, mechanism: Any, signature: bytes) -> None:
        digest = data[len(_DIGEST_INFO_SHA256) :] if data.startswith(_DIGEST_INFO_SHA256) else data
        kind, msg, body = self.messages.pop(digest, (kind_of(data), None, None))
        if msg is None and data.startswith(_DIGEST_INFO_SHA256):
            msg = digest.hex()  # RSA batch signing hashes with SHA-256 itself: the digest IS sha256(message)
        line = json.dumps({
            "key": str(getattr(key, "label", "?")), "mech": str(mechanism),
            "data": hashlib.sha256(data).hexdigest(), "sig": hashlib.sha256(signature).hexdigest(),
            "kind": kind, "msg": msg, "body": body,
        })  # fmt: skip
        with self.lock:
            os.write(self.fd, line.encode() + b"\n")
            os.fsync(self.fd)


def install(path: Path) -> SignatureLog:
    log = SignatureLog(path)
    c_sign, digest = hsm_keys.c_sign, hsm_verify.digest_of

    def logged_digest(data: bytes, algorithm: Any) -> Any:
        out = digest(data, algorithm)
        log.remember(bytes(data), out[0])
        return out

    def logged_c_sign(key: Any, data: bytes, mechanism: Any, param: Any = None) -> bytes:
        signature = c_sign(key, data, mechanism, param)
        log.record(key, bytes(data), mechanism, signature)
        return signature

    # Both names the digest is called by: hsm.verify's (SignatureCheck.digest, the batches of sign_many) and
    # hsm.keys' own import of it (one signature at a time).
    hsm_verify.digest_of = logged_digest
    hsm_keys.__dict__["_digest"] = logged_digest
    hsm_keys.c_sign = logged_c_sign
    return log


def main() -> int:
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    install(Path(sys.argv[1]))
    from appliance.cli.main import main as birthline

    return birthline(sys.argv[2:])


if __name__ == "__main__":
    sys.exit(main())
