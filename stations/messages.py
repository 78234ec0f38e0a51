"""Message bodies: one frozen dataclass per message type, with byte-exact encode/decode (big-endian).

Decoding trusts nothing: every length is checked against the bytes that remain and against the protocol's
bounds before anything is sliced, trailing bytes are an error, and each failure raises ``MessageError`` with
the code the appliance should answer with. Encoding checks the same bounds, so a message that encodes also
decodes.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import ClassVar, Self

from stations.codes import Code, code_from_wire
from stations.errors import MessageError

# Message types (the low seven bits of the frame type byte; the top bit marks a sealed frame).
HELLO = 0x01
CHALLENGE = 0x02
AUTH = 0x03
AUTH_OK = 0x04
GET_CA_CHAIN = 0x10
CA_CHAIN = 0x11
ENROLL = 0x12
CERT = 0x13
CONFIRM = 0x14
CONFIRMED = 0x15
PENDING = 0x16
ERROR = 0x20
PING = 0x21
PONG = 0x22
BYE = 0x23

# Bounds. All of them together still fit one 16 KiB frame with counter and tag.
NONCE_LEN = 32
PROOF_LEN = 32
REQUEST_ID_LEN = 16
DIGEST_LEN = 32
MAX_VERSIONS = 16
MAX_STATION_ID = 64
MAX_SERIAL = 64
MAX_PROFILE = 64
MAX_CSR = 8 * 1024
MAX_CERT = 8 * 1024
MAX_CHAIN_CERTS = 8
MAX_CHAIN_BYTES = 15 * 1024
MAX_TEXT = 255

NO_REQUEST = bytes(REQUEST_ID_LEN)

_STATION_ID = re.compile(rb"[A-Za-z0-9._:-]{1,64}")
_PROFILE = re.compile(rb"[A-Za-z0-9._-]{0,64}")
# X.520 PrintableString: what the appliance can put in the certificate's serialNumber attribute.
_PRINTABLE = re.compile(rb"[A-Za-z0-9 '()+,\-./:=?]{1,64}")


class _Reader:
    def __init__(self, data: bytes, what: str) -> None:
        self._data = data
        self._pos = 0
        self._what = what

    def _fail(self, text: str, code: Code = Code.BAD_FRAME) -> MessageError:
        return MessageError(code, f"{self._what}: {text}")

    def take(self, n: int, field: str) -> bytes:
        if n > len(self._data) - self._pos:
            raise self._fail(f"{field} needs {n} bytes, {len(self._data) - self._pos} left")
        chunk = self._data[self._pos : self._pos + n]
        self._pos += n
        return chunk

    def u8(self, field: str) -> int:
        return self.take(1, field)[0]

    def u16(self, field: str) -> int:
        return int(struct.unpack(">H", self.take(2, field))[0])

    def u32(self, field: str) -> int:
        return int(struct.unpack(">I", self.take(4, field))[0])

    def rest(self) -> bytes:
        chunk = self._data[self._pos :]
        self._pos = len(self._data)
        return chunk

    def end(self) -> None:
        if self._pos != len(self._data):
            raise self._fail(f"{len(self._data) - self._pos} trailing bytes")


def _check(ok: bool, code: Code, text: str) -> None:
    if not ok:
        raise MessageError(code, text)


def _check_request_id(request_id: bytes, *, allow_zero: bool = False) -> None:
    _check(len(request_id) == REQUEST_ID_LEN, Code.BAD_REQUEST, "request id must be 16 bytes")
    _check(allow_zero or request_id != NO_REQUEST, Code.BAD_REQUEST, "request id must not be all zeros")


def _check_profile(profile: str) -> bytes:
    raw = profile.encode("ascii", "replace")
    _check(_PROFILE.fullmatch(raw) is not None, Code.BAD_REQUEST, "profile name: 0-64 of [A-Za-z0-9._-]")
    return raw


def _read_profile(r: _Reader) -> str:
    raw = r.take(r.u8("profile length"), "profile")
    _check(_PROFILE.fullmatch(raw) is not None, Code.BAD_REQUEST, "profile name: 0-64 of [A-Za-z0-9._-]")
    return raw.decode("ascii")


def _encode_chain(chain: tuple[bytes, ...]) -> bytes:
    _check(1 <= len(chain) <= MAX_CHAIN_CERTS, Code.BAD_REQUEST, f"chain must hold 1-{MAX_CHAIN_CERTS} certs")
    _check(all(1 <= len(c) <= MAX_CERT for c in chain), Code.BAD_REQUEST, f"each cert 1-{MAX_CERT} bytes")
    _check(sum(len(c) for c in chain) <= MAX_CHAIN_BYTES, Code.BAD_REQUEST, "chain too large")
    return bytes([len(chain)]) + b"".join(struct.pack(">H", len(c)) + c for c in chain)


def _read_chain(r: _Reader) -> tuple[bytes, ...]:
    count = r.u8("certificate count")
    _check(
        1 <= count <= MAX_CHAIN_CERTS, Code.BAD_FRAME, f"certificate count {count} not in 1-{MAX_CHAIN_CERTS}"
    )
    chain = []
    for i in range(count):
        size = r.u16(f"certificate {i} length")
        _check(1 <= size <= MAX_CERT, Code.BAD_FRAME, f"certificate {i} length {size} not in 1-{MAX_CERT}")
        chain.append(r.take(size, f"certificate {i}"))
    total = sum(len(c) for c in chain)
    _check(total <= MAX_CHAIN_BYTES, Code.BAD_FRAME, f"chain of {total} bytes above {MAX_CHAIN_BYTES}")
    return tuple(chain)


@dataclass(frozen=True)
class Message:
    TYPE: ClassVar[int]

    def encode(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode(cls, body: bytes) -> Self:
        raise NotImplementedError


@dataclass(frozen=True)
class Hello(Message):
    """Station -> appliance, plain. Opens (or restarts) a session."""

    TYPE: ClassVar[int] = HELLO
    station_id: str
    versions: tuple[int, ...]
    nonce: bytes

    def encode(self) -> bytes:
        sid = self.station_id.encode("ascii", "replace")
        _check(
            _STATION_ID.fullmatch(sid) is not None, Code.BAD_REQUEST, "station id: 1-64 of [A-Za-z0-9._:-]"
        )
        _check(1 <= len(self.versions) <= MAX_VERSIONS, Code.BAD_REQUEST, "1-16 versions")
        _check(all(1 <= v <= 255 for v in self.versions), Code.BAD_REQUEST, "versions are 1-255")
        _check(len(self.nonce) == NONCE_LEN, Code.BAD_REQUEST, "nonce must be 32 bytes")
        return bytes([len(self.versions), *self.versions, len(sid)]) + sid + self.nonce

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, "HELLO")
        n = r.u8("version count")
        _check(1 <= n <= MAX_VERSIONS, Code.BAD_FRAME, f"HELLO: version count {n} not in 1-{MAX_VERSIONS}")
        versions = tuple(r.take(n, "versions"))
        _check(0 not in versions, Code.BAD_FRAME, "HELLO: version 0 is not a version")
        sid = r.take(r.u8("station id length"), "station id")
        _check(
            _STATION_ID.fullmatch(sid) is not None,
            Code.BAD_FRAME,
            "HELLO: station id not 1-64 of [A-Za-z0-9._:-]",
        )
        nonce = r.take(NONCE_LEN, "nonce")
        r.end()
        return cls(sid.decode("ascii"), versions, nonce)


@dataclass(frozen=True)
class Challenge(Message):
    """Appliance -> station, plain. The chosen version and the appliance's nonce."""

    TYPE: ClassVar[int] = CHALLENGE
    version: int
    nonce: bytes

    def encode(self) -> bytes:
        _check(1 <= self.version <= 255, Code.BAD_REQUEST, "version is 1-255")
        _check(len(self.nonce) == NONCE_LEN, Code.BAD_REQUEST, "nonce must be 32 bytes")
        return bytes([self.version]) + self.nonce

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, "CHALLENGE")
        version = r.u8("version")
        nonce = r.take(NONCE_LEN, "nonce")
        r.end()
        _check(version != 0, Code.BAD_FRAME, "CHALLENGE: version 0")
        return cls(version, nonce)


@dataclass(frozen=True)
class _Proof(Message):
    proof: bytes

    def encode(self) -> bytes:
        _check(len(self.proof) == PROOF_LEN, Code.BAD_REQUEST, "proof must be 32 bytes")
        return self.proof

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, cls.__name__.upper())
        proof = r.take(PROOF_LEN, "proof")
        r.end()
        return cls(proof)


@dataclass(frozen=True)
class Auth(_Proof):
    """Station -> appliance, plain. HMAC proof that the station holds its key."""

    TYPE: ClassVar[int] = AUTH


@dataclass(frozen=True)
class AuthOk(_Proof):
    """Appliance -> station, plain. HMAC proof that the appliance holds the same key."""

    TYPE: ClassVar[int] = AUTH_OK


@dataclass(frozen=True)
class GetCaChain(Message):
    """Station -> appliance. Ask for the issuing CA chain of a profile ("" = the station's default)."""

    TYPE: ClassVar[int] = GET_CA_CHAIN
    profile: str = ""

    def encode(self) -> bytes:
        raw = _check_profile(self.profile)
        return bytes([len(raw)]) + raw

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, "GET_CA_CHAIN")
        profile = _read_profile(r)
        r.end()
        return cls(profile)


@dataclass(frozen=True)
class CaChain(Message):
    """Appliance -> station. Issuing CA first, root last."""

    TYPE: ClassVar[int] = CA_CHAIN
    chain: tuple[bytes, ...]

    def encode(self) -> bytes:
        return _encode_chain(self.chain)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, "CA_CHAIN")
        chain = _read_chain(r)
        r.end()
        return cls(chain)


@dataclass(frozen=True)
class Enroll(Message):
    """Station -> appliance. One device's certificate request; the CSR travels raw (DER) to the end."""

    TYPE: ClassVar[int] = ENROLL
    request_id: bytes
    device_serial: str
    csr: bytes
    profile: str = ""

    def encode(self) -> bytes:
        _check_request_id(self.request_id)
        serial = self.device_serial.encode("ascii", "replace")
        _check(
            _PRINTABLE.fullmatch(serial) is not None,
            Code.BAD_DEVICE_SERIAL,
            "device serial: 1-64 PrintableString",
        )
        profile = _check_profile(self.profile)
        _check(1 <= len(self.csr) <= MAX_CSR, Code.BAD_CSR, f"CSR must be 1-{MAX_CSR} bytes")
        return self.request_id + bytes([len(serial)]) + serial + bytes([len(profile)]) + profile + self.csr

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, "ENROLL")
        request_id = r.take(REQUEST_ID_LEN, "request id")
        _check_request_id(request_id)
        serial = r.take(r.u8("device serial length"), "device serial")
        _check(
            _PRINTABLE.fullmatch(serial) is not None,
            Code.BAD_DEVICE_SERIAL,
            "device serial: 1-64 PrintableString",
        )
        profile = _read_profile(r)
        csr = r.rest()
        _check(1 <= len(csr) <= MAX_CSR, Code.BAD_CSR, f"CSR of {len(csr)} bytes not in 1-{MAX_CSR}")
        return cls(request_id, serial.decode("ascii"), csr, profile)


@dataclass(frozen=True)
class Cert(Message):
    """Appliance -> station. The device certificate first, then its issuers."""

    TYPE: ClassVar[int] = CERT
    request_id: bytes
    chain: tuple[bytes, ...]

    def encode(self) -> bytes:
        _check_request_id(self.request_id)
        return self.request_id + _encode_chain(self.chain)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, "CERT")
        request_id = r.take(REQUEST_ID_LEN, "request id")
        _check_request_id(request_id)
        chain = _read_chain(r)
        r.end()
        return cls(request_id, chain)


@dataclass(frozen=True)
class Confirm(Message):
    """Station -> appliance. The device stored the certificate whose DER has SHA-256 ``cert_sha256``."""

    TYPE: ClassVar[int] = CONFIRM
    request_id: bytes
    cert_sha256: bytes

    def encode(self) -> bytes:
        _check_request_id(self.request_id)
        _check(len(self.cert_sha256) == DIGEST_LEN, Code.BAD_REQUEST, "certificate hash must be 32 bytes")
        return self.request_id + self.cert_sha256

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, "CONFIRM")
        request_id = r.take(REQUEST_ID_LEN, "request id")
        digest = r.take(DIGEST_LEN, "certificate hash")
        r.end()
        _check_request_id(request_id)
        return cls(request_id, digest)


@dataclass(frozen=True)
class _RequestOnly(Message):
    request_id: bytes

    def encode(self) -> bytes:
        _check_request_id(self.request_id)
        return self.request_id

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, cls.__name__.upper())
        request_id = r.take(REQUEST_ID_LEN, "request id")
        r.end()
        _check_request_id(request_id)
        return cls(request_id)


@dataclass(frozen=True)
class Confirmed(_RequestOnly):
    """Appliance -> station. The delivery is recorded; the device may leave the fixture."""

    TYPE: ClassVar[int] = CONFIRMED


@dataclass(frozen=True)
class Pending(Message):
    """Appliance -> station. Accepted, not finished: resend the same ENROLL after ``retry_after_ms``."""

    TYPE: ClassVar[int] = PENDING
    request_id: bytes
    retry_after_ms: int

    def encode(self) -> bytes:
        _check_request_id(self.request_id)
        _check(0 <= self.retry_after_ms <= 0xFFFFFFFF, Code.BAD_REQUEST, "retry-after must fit u32")
        return self.request_id + struct.pack(">I", self.retry_after_ms)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, "PENDING")
        request_id = r.take(REQUEST_ID_LEN, "request id")
        retry = r.u32("retry-after")
        r.end()
        _check_request_id(request_id)
        return cls(request_id, retry)


def _truncate_utf8(text: str, limit: int) -> bytes:
    raw = text.encode("utf-8", "replace")
    if len(raw) <= limit:
        return raw
    # Cut on a character boundary so the receiver's strict decode never fails on our own truncation.
    return raw[:limit].decode("utf-8", "ignore").encode("utf-8")


@dataclass(frozen=True)
class Error(Message):
    """A refusal or failure. ``request_id`` is all zeros when it concerns no particular request.

    ``code`` is a ``Code`` when known; a number from a newer peer is kept as an int. ``text`` is for humans
    and is cut to 255 UTF-8 bytes on encode.
    """

    TYPE: ClassVar[int] = ERROR
    code: Code | int
    text: str = ""
    request_id: bytes = NO_REQUEST

    def encode(self) -> bytes:
        _check_request_id(self.request_id, allow_zero=True)
        _check(0 <= int(self.code) <= 0xFFFF, Code.BAD_REQUEST, "code must fit u16")
        text = _truncate_utf8(self.text, MAX_TEXT)
        return self.request_id + struct.pack(">HB", int(self.code), len(text)) + text

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, "ERROR")
        request_id = r.take(REQUEST_ID_LEN, "request id")
        code = r.u16("code")
        raw = r.take(r.u8("text length"), "text")
        r.end()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MessageError(Code.BAD_FRAME, "ERROR: text is not UTF-8") from exc
        return cls(code_from_wire(code), text, request_id)


@dataclass(frozen=True)
class _Token(Message):
    token: int = 0

    def encode(self) -> bytes:
        _check(0 <= self.token <= 0xFFFFFFFF, Code.BAD_REQUEST, "token must fit u32")
        return struct.pack(">I", self.token)

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, cls.__name__.upper())
        token = r.u32("token")
        r.end()
        return cls(token)


@dataclass(frozen=True)
class Ping(_Token):
    """Either direction. Keepalive; the peer answers PONG with the same token."""

    TYPE: ClassVar[int] = PING


@dataclass(frozen=True)
class Pong(_Token):
    TYPE: ClassVar[int] = PONG


@dataclass(frozen=True)
class Bye(Message):
    """Either direction. The session ends; ``code`` says why (OK for a normal close)."""

    TYPE: ClassVar[int] = BYE
    code: Code | int = Code.OK

    def encode(self) -> bytes:
        _check(0 <= int(self.code) <= 0xFFFF, Code.BAD_REQUEST, "code must fit u16")
        return struct.pack(">H", int(self.code))

    @classmethod
    def decode(cls, body: bytes) -> Self:
        r = _Reader(body, "BYE")
        code = r.u16("code")
        r.end()
        return cls(code_from_wire(code))


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        Hello,
        Challenge,
        Auth,
        AuthOk,
        GetCaChain,
        CaChain,
        Enroll,
        Cert,
        Confirm,
        Confirmed,
        Pending,
        Error,
        Ping,
        Pong,
        Bye,
    )
}


def decode_message(kind: int, body: bytes) -> Message:
    """Decode a body of message type ``kind`` (sealed bit already removed)."""
    cls = MESSAGE_TYPES.get(kind)
    if cls is None:
        raise MessageError(Code.BAD_FRAME, f"unknown message type 0x{kind:02x}")
    return cls.decode(body)
