"""Session state machines for both ends of a station link. Pure: frames in, frames to send and events out.

Neither class does I/O, keeps time or spawns anything. Randomness (handshake nonces) comes from an injectable
callable, so the test vectors can fix it. Frames from the peer never raise: anything wrong becomes a
``Rejected`` or ``HandshakeFailed`` event (plus an ERROR frame to send, on the appliance side). Only local
misuse raises ``SessionError`` (sending before authentication, counter exhausted).

After AUTH_OK every frame in both directions is sealed: its payload is ``counter u32 | body | tag``, the
sealed bit (0x80) is set in the type byte, and the receiver accepts only a tag that verifies and a counter
strictly above the last one it accepted. Retransmissions are new frames with new counters; idempotency comes
from the request id inside the body, never from replaying old frames.
"""

from __future__ import annotations

import enum
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

from stations import crypto
from stations.codec import SEALED_BIT, Frame, encode_frame
from stations.codes import Code
from stations.errors import MessageError, SessionError, StationError
from stations.messages import (
    CONFIRM,
    ENROLL,
    NONCE_LEN,
    REQUEST_ID_LEN,
    Auth,
    AuthOk,
    Bye,
    CaChain,
    Cert,
    Challenge,
    Confirm,
    Confirmed,
    Enroll,
    Error,
    GetCaChain,
    Hello,
    Message,
    Pending,
    Ping,
    Pong,
    decode_message,
)

PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
COUNTER_LEN = 4
MAX_COUNTER = 0xFFFFFFFF
SEAL_OVERHEAD = COUNTER_LEN + crypto.TAG_LEN

RandomSource = Callable[[int], bytes]
KeyLookup = Callable[[str], bytes | None]

_HANDSHAKE_CODES = frozenset(
    {
        Code.AUTH_FAILED,
        Code.UNKNOWN_STATION,
        Code.STATION_DISABLED,
        Code.UNSUPPORTED_VERSION,
        Code.BAD_FRAME,
        Code.UNEXPECTED_MESSAGE,
        Code.BUSY,
        Code.INTERNAL,
        Code.TIMEOUT,  # the appliance gave up waiting for our AUTH: start over with a new HELLO
    }
)


@dataclass(frozen=True)
class Authenticated:
    station_id: str
    version: int


@dataclass(frozen=True)
class HandshakeFailed:
    """The handshake ended without a session. On the appliance side: audit it and rate-limit the station."""

    code: Code | int
    text: str
    station_id: str = ""


@dataclass(frozen=True)
class Received:
    """An authenticated message for the layer above (ENROLL, CERT, ...)."""

    message: Message


@dataclass(frozen=True)
class Rejected:
    """A frame was dropped: replayed, tampered, malformed or out of place. Count it; alarm on a trend."""

    code: Code
    text: str


@dataclass(frozen=True)
class Closed:
    """The session ended (BYE, a new HELLO, or the appliance no longer knows the session)."""

    code: Code | int
    text: str
    bye: bool = False  # the peer said so in a sealed BYE (authentic), not a plain ERROR or a new HELLO


SessionEvent = Authenticated | HandshakeFailed | Received | Rejected | Closed


@dataclass(frozen=True)
class Step:
    """What one incoming frame produced: wire bytes to write, in order, and events for the layer above."""

    send: tuple[bytes, ...] = ()
    events: tuple[SessionEvent, ...] = ()


def plain_frame(message: Message) -> bytes:
    return encode_frame(message.TYPE, message.encode())


class _Channel:
    """Seals outgoing and opens incoming frames under one session key, with a counter per direction."""

    def __init__(self, keys: crypto.SessionKeys, send_direction: int, recv_direction: int) -> None:
        self._key = keys.mac
        self._send_dir = send_direction
        self._recv_dir = recv_direction
        self.sent = 0
        self.received = 0

    def seal(self, message: Message) -> bytes:
        if self.sent >= MAX_COUNTER:
            raise SessionError(Code.NO_SESSION, "send counter exhausted: start a new session")
        self.sent += 1
        body = message.encode()
        frame_type = message.TYPE | SEALED_BIT
        length = COUNTER_LEN + len(body) + crypto.TAG_LEN
        tag = crypto.frame_tag(
            self._key, body, direction=self._send_dir, counter=self.sent, frame_type=frame_type, length=length
        )
        return encode_frame(frame_type, struct.pack(">I", self.sent) + body + tag)

    def open(self, frame: Frame) -> Message:
        payload = frame.payload
        if len(payload) < SEAL_OVERHEAD:
            raise StationError(Code.BAD_FRAME, f"sealed payload of {len(payload)} bytes is too short")
        (counter,) = struct.unpack_from(">I", payload)
        body = payload[COUNTER_LEN : -crypto.TAG_LEN]
        tag = payload[-crypto.TAG_LEN :]
        expected = crypto.frame_tag(
            self._key,
            body,
            direction=self._recv_dir,
            counter=counter,
            frame_type=frame.type,
            length=len(payload),
        )
        if not crypto.equal(tag, expected):
            raise StationError(Code.BAD_TAG, "frame tag does not verify")
        # Checked after the tag so a forged counter cannot push the window forward.
        if counter <= self.received:
            raise StationError(Code.REPLAY, f"counter {counter} not above {self.received}")
        self.received = counter
        try:
            return decode_message(frame.kind, body)
        except MessageError as exc:
            # Authentic but malformed: echo the request id when the body starts with one, so the station can
            # match the refusal to its device.
            if frame.kind in (ENROLL, CONFIRM) and len(body) >= REQUEST_ID_LEN:
                raise _WithRequest(exc, body[:REQUEST_ID_LEN]) from exc
            raise


class _WithRequest(StationError):
    def __init__(self, cause: StationError, request_id: bytes) -> None:
        super().__init__(cause.code, cause.text)
        self.request_id = request_id


class _AState(enum.Enum):
    IDLE = "idle"
    CHALLENGED = "challenged"
    ESTABLISHED = "established"


class ApplianceSession:
    """The appliance's end of one station link (one serial port or one TLS connection).

    ``lookup(station_id)`` returns the station's 32-byte key, or None when the station is unknown; it may
    raise ``StationError`` (e.g. ``Code.STATION_DISABLED``) to refuse with a specific code.
    """

    def __init__(
        self,
        lookup: KeyLookup,
        *,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        random: RandomSource = os.urandom,
    ) -> None:
        self._lookup = lookup
        self._versions = versions
        self._random = random
        self.handshakes = 0  # CHALLENGEs with a fresh nonce so far: each starts a handshake (and its timer)
        self._reset()

    def _reset(self) -> None:
        self._state = _AState.IDLE
        self.station_id: str | None = None
        self.version: int | None = None
        self._hello_body = b""
        self._challenge_wire = b""
        self._auth_ok_wire = b""
        self._th = b""
        self._keys: crypto.SessionKeys | None = None
        self._expected_proof = b""
        self._channel: _Channel | None = None

    @property
    def established(self) -> bool:
        return self._state is _AState.ESTABLISHED

    def reset(self) -> None:
        """Forget the session and any half-open handshake (handshake timer expired, transport reopened)."""
        self._reset()

    def send(self, message: Message) -> bytes:
        """Seal a reply (CA_CHAIN, CERT, PENDING, CONFIRMED, ERROR, PING, BYE) for the station."""
        if self._channel is None:
            raise SessionError(Code.NO_SESSION, "no authenticated session")
        return self._channel.seal(message)

    def close(self, code: Code = Code.OK) -> bytes:
        """End the session; returns the BYE to write (sealed if a session exists)."""
        wire = self.send(Bye(code)) if self._channel is not None else plain_frame(Bye(code))
        self._reset()
        return wire

    def _error(self, code: Code, text: str, request_id: bytes = bytes(REQUEST_ID_LEN)) -> bytes:
        message = Error(code, text, request_id)
        return self.send(message) if self._channel is not None else plain_frame(message)

    def receive(self, frame: Frame) -> Step:
        if frame.sealed:
            return self._receive_sealed(frame)
        try:
            message = decode_message(frame.kind, frame.payload)
        except MessageError as exc:
            return Step((self._error(exc.code, exc.text),), (Rejected(exc.code, exc.text),))
        if isinstance(message, Hello):
            return self._on_hello(message, frame.payload)
        if isinstance(message, Auth):
            return self._on_auth(message)
        if isinstance(message, Bye) and self._channel is None:
            self._reset()
            return Step(events=(Closed(message.code, "station closed before authenticating"),))
        text = f"plain {type(message).__name__} not accepted here"
        return Step((self._error(Code.UNEXPECTED_MESSAGE, text),), (Rejected(Code.UNEXPECTED_MESSAGE, text),))

    def _on_hello(self, hello: Hello, body: bytes) -> Step:
        if body == self._hello_body:
            if self._state is _AState.CHALLENGED:
                # The station resent HELLO because CHALLENGE was lost: answer it identically.
                return Step((self._challenge_wire,))
            if self._state is _AState.ESTABLISHED:
                return Step(events=(Rejected(Code.REPLAY, "HELLO of the current session seen again"),))
        events: list[SessionEvent] = []
        if self._state is _AState.ESTABLISHED:
            events.append(Closed(Code.OK, "station started a new handshake"))
        self._reset()
        common = set(hello.versions) & set(self._versions)
        if not common:
            return self._refuse(
                Code.UNSUPPORTED_VERSION,
                f"appliance speaks versions {','.join(map(str, self._versions))}",
                hello.station_id,
                events,
            )
        try:
            key = self._lookup(hello.station_id)
        except StationError as exc:
            return self._refuse(exc.code, exc.text, hello.station_id, events)
        if key is None:
            return self._refuse(Code.UNKNOWN_STATION, "station is not registered", hello.station_id, events)
        version = max(common)
        challenge = Challenge(version, self._random(NONCE_LEN))
        challenge_body = challenge.encode()
        self._th = crypto.transcript_hash(body, challenge_body)
        self._keys = crypto.derive_keys(key, hello.nonce, challenge.nonce, self._th)
        self._expected_proof = crypto.station_proof(self._keys, self._th)
        self._hello_body = body
        self._challenge_wire = encode_frame(Challenge.TYPE, challenge_body)
        self.station_id = hello.station_id
        self.version = version
        self._state = _AState.CHALLENGED
        self.handshakes += 1
        return Step((self._challenge_wire,), tuple(events))

    def _refuse(self, code: Code, text: str, station_id: str, events: list[SessionEvent]) -> Step:
        events.append(HandshakeFailed(code, text, station_id))
        return Step((plain_frame(Error(code, text)),), tuple(events))

    def _on_auth(self, auth: Auth) -> Step:
        if self._state is _AState.ESTABLISHED and crypto.equal(auth.proof, self._expected_proof):
            # AUTH_OK was lost and the station resent AUTH: the answer is deterministic; no state changes.
            return Step((self._auth_ok_wire,))
        if self._state is not _AState.CHALLENGED or self._keys is None:
            text = "AUTH without a pending CHALLENGE"
            return Step(
                (self._error(Code.UNEXPECTED_MESSAGE, text),), (Rejected(Code.UNEXPECTED_MESSAGE, text),)
            )
        station_id = self.station_id or ""
        if not crypto.equal(auth.proof, self._expected_proof):
            self._reset()
            return self._refuse(Code.AUTH_FAILED, "station proof does not verify", station_id, [])
        self._auth_ok_wire = plain_frame(AuthOk(crypto.appliance_proof(self._keys, self._th, auth.proof)))
        self._channel = _Channel(self._keys, crypto.APPLIANCE_TO_STATION, crypto.STATION_TO_APPLIANCE)
        self._state = _AState.ESTABLISHED
        return Step((self._auth_ok_wire,), (Authenticated(station_id, self.version or 0),))

    def _receive_sealed(self, frame: Frame) -> Step:
        if self._channel is None:
            text = "no session: send HELLO"
            return Step((plain_frame(Error(Code.NO_SESSION, text)),), (Rejected(Code.NO_SESSION, text),))
        try:
            message = self._channel.open(frame)
        except _WithRequest as exc:
            return Step((self._error(exc.code, exc.text, exc.request_id),), (Rejected(exc.code, exc.text),))
        except StationError as exc:
            return Step((self._error(exc.code, exc.text),), (Rejected(exc.code, exc.text),))
        if isinstance(message, Ping):
            return Step((self.send(Pong(message.token)),))
        if isinstance(message, Bye):
            self._reset()
            return Step(events=(Closed(message.code, "station said BYE", bye=True),))
        if isinstance(message, GetCaChain | Enroll | Confirm | Pong):
            return Step(events=(Received(message),))
        text = f"{type(message).__name__} is not a station request"
        return Step((self._error(Code.UNEXPECTED_MESSAGE, text),), (Rejected(Code.UNEXPECTED_MESSAGE, text),))


class _SState(enum.Enum):
    IDLE = "idle"
    HELLO_SENT = "hello_sent"
    AUTH_SENT = "auth_sent"
    ESTABLISHED = "established"


class StationSession:
    """The fixture's end of the link. Call ``hello()``, feed every decoded frame to ``receive()``, and once
    ``Authenticated`` arrives use ``send()`` for GET_CA_CHAIN, ENROLL, CONFIRM, PING and ``close()`` for BYE.

    Retransmission is the caller's job (it owns the timers): ``resend()`` gives the pending handshake frame
    again, byte for byte; a request is resent by calling ``send()`` again with the same message, which seals
    it under a new counter.
    """

    def __init__(
        self,
        station_id: str,
        key: bytes,
        *,
        versions: tuple[int, ...] = PROTOCOL_VERSIONS,
        random: RandomSource = os.urandom,
    ) -> None:
        if len(key) != crypto.STATION_KEY_LEN:
            raise SessionError(Code.BAD_REQUEST, "station key must be 32 bytes")
        self.station_id = station_id
        self._key = key
        self._versions = versions
        self._random = random
        self._reset()

    def _reset(self) -> None:
        self._state = _SState.IDLE
        self.version: int | None = None
        self._hello: Hello | None = None
        self._hello_wire = b""
        self._challenge_body = b""
        self._auth_wire = b""
        self._th = b""
        self._keys: crypto.SessionKeys | None = None
        self._proof = b""
        self._auth_ok_proof = b""
        self._channel: _Channel | None = None

    @property
    def established(self) -> bool:
        return self._state is _SState.ESTABLISHED

    def reset(self) -> None:
        """Forget the session and any half-open handshake (handshake timer expired, transport reopened)."""
        self._reset()

    def hello(self) -> bytes:
        """Start (or restart) the handshake with a fresh nonce."""
        self._reset()
        self._hello = Hello(self.station_id, self._versions, self._random(NONCE_LEN))
        self._hello_wire = plain_frame(self._hello)
        self._state = _SState.HELLO_SENT
        return self._hello_wire

    def resend(self) -> bytes | None:
        """The unanswered handshake frame, identical to the first copy; None when nothing is pending."""
        if self._state is _SState.HELLO_SENT:
            return self._hello_wire
        if self._state is _SState.AUTH_SENT:
            return self._auth_wire
        return None

    def send(self, message: Message) -> bytes:
        if self._channel is None:
            raise SessionError(Code.NO_SESSION, "not authenticated: call hello() and wait for Authenticated")
        return self._channel.seal(message)

    def close(self, code: Code = Code.OK) -> bytes:
        wire = self.send(Bye(code)) if self._channel is not None else plain_frame(Bye(code))
        self._reset()
        return wire

    def receive(self, frame: Frame) -> Step:
        if frame.sealed:
            return self._receive_sealed(frame)
        try:
            message = decode_message(frame.kind, frame.payload)
        except MessageError as exc:
            return Step(events=(Rejected(exc.code, exc.text),))
        if isinstance(message, Challenge):
            return self._on_challenge(message, frame.payload)
        if isinstance(message, AuthOk):
            return self._on_auth_ok(message)
        if isinstance(message, Error):
            return self._on_plain_error(message)
        return Step(events=(Rejected(Code.UNEXPECTED_MESSAGE, f"plain {type(message).__name__}"),))

    def _on_challenge(self, challenge: Challenge, body: bytes) -> Step:
        if self._state is not _SState.HELLO_SENT or self._hello is None:
            if body == self._challenge_body:
                return Step()  # answer to a HELLO we resent; AUTH is already on its way
            return Step(events=(Rejected(Code.UNEXPECTED_MESSAGE, "CHALLENGE without a pending HELLO"),))
        if challenge.version not in self._versions:
            self._reset()
            text = f"appliance chose version {challenge.version}, not offered"
            return Step(events=(HandshakeFailed(Code.UNSUPPORTED_VERSION, text, self.station_id),))
        self._challenge_body = body
        self._th = crypto.transcript_hash(self._hello.encode(), body)
        self._keys = crypto.derive_keys(self._key, self._hello.nonce, challenge.nonce, self._th)
        self._proof = crypto.station_proof(self._keys, self._th)
        self._auth_wire = plain_frame(Auth(self._proof))
        self.version = challenge.version
        self._state = _SState.AUTH_SENT
        return Step((self._auth_wire,))

    def _on_auth_ok(self, auth_ok: AuthOk) -> Step:
        if self._state is _SState.ESTABLISHED and crypto.equal(auth_ok.proof, self._auth_ok_proof):
            return Step()  # duplicate answer to a resent AUTH
        if self._state is not _SState.AUTH_SENT or self._keys is None:
            return Step(events=(Rejected(Code.UNEXPECTED_MESSAGE, "AUTH_OK without a pending AUTH"),))
        expected = crypto.appliance_proof(self._keys, self._th, self._proof)
        if not crypto.equal(auth_ok.proof, expected):
            self._reset()
            text = "appliance proof does not verify: wrong appliance or wrong key"
            return Step(events=(HandshakeFailed(Code.AUTH_FAILED, text, self.station_id),))
        self._auth_ok_proof = auth_ok.proof
        self._channel = _Channel(self._keys, crypto.STATION_TO_APPLIANCE, crypto.APPLIANCE_TO_STATION)
        self._state = _SState.ESTABLISHED
        return Step(events=(Authenticated(self.station_id, self.version or 0),))

    def _on_plain_error(self, error: Error) -> Step:
        code = error.code
        if code == Code.TIMEOUT and self._state is _SState.HELLO_SENT:
            # The appliance never answers a HELLO with TIMEOUT: this one ended an earlier handshake (it was on
            # the line before our HELLO reached the appliance). Our HELLO is still being answered.
            return Step(events=(Rejected(Code.UNEXPECTED_MESSAGE, "TIMEOUT of an earlier handshake"),))
        if self._state in (_SState.HELLO_SENT, _SState.AUTH_SENT):
            if code in _HANDSHAKE_CODES:
                self._reset()
                return Step(events=(HandshakeFailed(code, error.text, self.station_id),))
            # e.g. NO_SESSION for a sealed frame sent before this HELLO: about an older session.
            return Step(events=(Rejected(Code.UNEXPECTED_MESSAGE, f"plain ERROR {code} during handshake"),))
        if self._state is _SState.ESTABLISHED:
            # Unauthenticated, so it decides nothing about any request; at most it costs a new handshake,
            # which is what the appliance needs if it lost the session.
            self._reset()
            return Step(events=(Closed(code, error.text),))
        return Step(events=(Rejected(Code.UNEXPECTED_MESSAGE, f"plain ERROR {code} with no handshake"),))

    def _receive_sealed(self, frame: Frame) -> Step:
        if self._channel is None:
            return Step(events=(Rejected(Code.NO_SESSION, "sealed frame before authentication"),))
        try:
            message = self._channel.open(frame)
        except StationError as exc:
            return Step(events=(Rejected(exc.code, exc.text),))
        if isinstance(message, Ping):
            return Step((self.send(Pong(message.token)),))
        if isinstance(message, Bye):
            self._reset()
            return Step(events=(Closed(message.code, "appliance said BYE", bye=True),))
        if isinstance(message, CaChain | Cert | Confirmed | Pending | Error | Pong):
            return Step(events=(Received(message),))
        return Step(
            events=(Rejected(Code.UNEXPECTED_MESSAGE, f"{type(message).__name__} from the appliance"),)
        )
