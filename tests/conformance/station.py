"""A minimal station written from docs/station-protocol.md alone, the way a fixture vendor would write one.

Nothing here comes from Birthline's protocol code (stations/, appliance/): the framing and its CRCs (section 2),
the messages (5), the handshake and key schedule (4.1-4.2), sealed frames (4.4), the credential bundle (13.1)
are all from the document. It uses the Python standard library (zlib for CRC-32, hmac/hashlib, ssl, os.read
and os.write on a pty) and cryptography for HKDF. Blocking I/O with timeouts: a fixture's test script, not a
server. Section numbers in comments point at the document.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import select
import socket
import ssl
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

# -- section 2: framing ------------------------------------------------------------------------------------------
SYNC = b"\xb1\xd5"
SEALED = 0x80
MAX_PAYLOAD = 16_384
SILENCE = 0.5  # section 2.1: a started frame is dropped after this much silence

# section 5: message types
HELLO, CHALLENGE, AUTH, AUTH_OK = 0x01, 0x02, 0x03, 0x04
GET_CA_CHAIN, CA_CHAIN, ENROLL, CERT, CONFIRM, CONFIRMED, PENDING = 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x16
ERROR, PING, PONG, BYE = 0x20, 0x21, 0x22, 0x23

# section 8: the codes this client acts on
BAD_FRAME, AUTH_FAILED, REPLAY, UNKNOWN_STATION = 100, 101, 102, 104
UNEXPECTED_MESSAGE, TIMEOUT, BAD_TAG, NO_SESSION = 106, 107, 108, 109
UNKNOWN_REQUEST, CONFIRM_MISMATCH, UNKNOWN_PROFILE, BUSY = 110, 111, 10, 16

TAG_LEN = 12
LABEL = b"birthline station v1"


def crc8(data: bytes) -> int:
    """CRC-8/SMBUS: polynomial 0x07, init 0, not reflected, no final XOR (section 2)."""
    crc = 0
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
    return crc


def frame(frame_type: int, payload: bytes) -> bytes:
    header = SYNC + struct.pack(">BH", frame_type, len(payload))
    head = header + bytes([crc8(header)])
    return head + payload + struct.pack(">I", zlib.crc32(head + payload))


class Closed(Exception):
    """The transport went away."""


class Refused(Exception):
    """The appliance answered with an ERROR (or BYE) where something else was expected."""

    def __init__(self, code: int, text: str, *, sealed: bool, bye: bool = False) -> None:
        super().__init__(f"{'sealed' if sealed else 'plain'} {'BYE' if bye else 'ERROR'} {code}: {text}")
        self.code = code
        self.text = text
        self.sealed = sealed
        self.bye = bye


# -- transports --------------------------------------------------------------------------------------------------
class Transport:
    def send(self, data: bytes) -> None:
        raise NotImplementedError

    def recv(self, timeout: float) -> bytes:
        """Some bytes, or b"" after ``timeout`` of silence. Raises Closed when the peer is gone."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class TlsTransport(Transport):
    def __init__(self, sock: ssl.SSLSocket) -> None:
        self.sock = sock

    @classmethod
    def connect(cls, host: str, port: int, bundle: Bundle, *, server_name: str | None = None) -> TlsTransport:
        """Section 13.3: present the station's certificate, verify the appliance's against ca.crt and its name."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_verify_locations(cafile=str(bundle.ca_file))
        ctx.load_cert_chain(str(bundle.tls_cert_file), str(bundle.tls_key_file))
        raw = socket.create_connection((host, port), timeout=30)
        return cls(ctx.wrap_socket(raw, server_hostname=server_name or host))

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise Closed(str(exc)) from exc

    def recv(self, timeout: float) -> bytes:
        if not self.sock.pending():
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
            if not ready:
                return b""
        try:
            data = self.sock.recv(65536)
        except ssl.SSLWantReadError:
            return b""
        except OSError as exc:
            raise Closed(str(exc)) from exc
        if not data:
            raise Closed("closed by the appliance")
        return data

    def close(self) -> None:
        self.sock.close()


class PtyTransport(Transport):
    """The fixture's end of a serial line: here one end of a socat pty pair (section 13.2: raw, 8N1)."""

    def __init__(self, path: str) -> None:
        import tty

        self.fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(self.fd)

    def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            select.select([], [self.fd], [], 5)
            try:
                view = view[os.write(self.fd, view) :]
            except BlockingIOError:
                continue
            except OSError as exc:
                raise Closed(str(exc)) from exc

    def recv(self, timeout: float) -> bytes:
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return b""
        try:
            return os.read(self.fd, 65536)
        except BlockingIOError:
            return b""
        except OSError as exc:
            raise Closed(str(exc)) from exc

    def close(self) -> None:
        os.close(self.fd)


class FrameReader:
    """Section 2.1: one buffer, resynchronise on SYNC, check HCRC before trusting LEN, drop only the first byte
    of a false start, drop a started frame after SILENCE without a byte."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.buf = bytearray()
        self.dropped = 0

    def next(self, timeout: float) -> tuple[int, bytes] | None:
        deadline = time.monotonic() + timeout
        while True:
            got = self._parse()
            if got is not None:
                return got
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            wait = min(left, SILENCE) if self.buf else left
            data = self.transport.recv(wait)
            if data:
                self.buf += data
            elif self.buf and wait == SILENCE:
                del self.buf[:1]  # a partial frame followed by silence: drop its first byte, rescan
                self.dropped += 1

    def _parse(self) -> tuple[int, bytes] | None:
        while True:
            start = self.buf.find(SYNC)
            if start < 0:
                keep = 1 if self.buf[-1:] == SYNC[:1] else 0
                self.dropped += len(self.buf) - keep
                del self.buf[: len(self.buf) - keep]
                return None
            del self.buf[:start]
            if len(self.buf) < 6:
                return None
            (length,) = struct.unpack_from(">H", self.buf, 3)
            if crc8(bytes(self.buf[:5])) != self.buf[5] or length > MAX_PAYLOAD:
                del self.buf[:1]
                self.dropped += 1
                continue
            if len(self.buf) < 10 + length:
                return None
            whole = bytes(self.buf[: 10 + length])
            if zlib.crc32(whole[:-4]) != struct.unpack(">I", whole[-4:])[0]:
                del self.buf[:1]
                self.dropped += 1
                continue
            del self.buf[: 10 + length]
            return whole[2], whole[6:-4]


# -- section 5: message bodies -------------------------------------------------------------------------------------
def hello_body(station_id: str, nonce: bytes, versions: tuple[int, ...] = (1,)) -> bytes:
    sid = station_id.encode("ascii")
    return bytes([len(versions), *versions, len(sid)]) + sid + nonce


def enroll_body(request_id: bytes, device_serial: str, csr: bytes, profile: str = "") -> bytes:
    serial, prof = device_serial.encode("ascii"), profile.encode("ascii")
    return request_id + bytes([len(serial)]) + serial + bytes([len(prof)]) + prof + csr


def parse_chain(data: bytes) -> list[bytes]:
    count, pos, chain = data[0], 1, []
    for _ in range(count):
        (size,) = struct.unpack_from(">H", data, pos)
        chain.append(data[pos + 2 : pos + 2 + size])
        pos += 2 + size
    assert pos == len(data), "trailing bytes after the chain"
    return chain


def parse_error(body: bytes) -> tuple[bytes, int, str]:
    request_id, (code, text_len) = body[:16], struct.unpack_from(">HB", body, 16)
    assert len(body) == 19 + text_len
    return request_id, code, body[19:].decode("utf-8")


# -- sections 4.2 and 4.4: keys, proofs, tags ------------------------------------------------------------------------
@dataclass(frozen=True)
class Keys:
    th: bytes
    station_proof_key: bytes
    appliance_proof_key: bytes
    mac: bytes


def derive(key: bytes, hello: bytes, challenge: bytes) -> Keys:
    th = hashlib.sha256(
        struct.pack(">H", len(hello)) + hello + struct.pack(">H", len(challenge)) + challenge
    ).digest()
    ns, na = hello[-32:], challenge[1:]
    okm = HKDF(algorithm=hashes.SHA256(), length=96, salt=ns + na, info=LABEL + th).derive(key)
    return Keys(th, okm[:32], okm[32:64], okm[64:])


def station_proof(keys: Keys) -> bytes:
    return hmac.new(keys.station_proof_key, b"station" + keys.th, hashlib.sha256).digest()


def appliance_proof(keys: Keys, proof: bytes) -> bytes:
    return hmac.new(keys.appliance_proof_key, b"appliance" + keys.th + proof, hashlib.sha256).digest()


def tag(mac: bytes, direction: bytes, counter: int, frame_type: int, body: bytes) -> bytes:
    length = 4 + len(body) + TAG_LEN
    head = direction + struct.pack(">IBH", counter, frame_type, length)
    return hmac.new(mac, head + body, hashlib.sha256).digest()[:TAG_LEN]


def seal(mac: bytes, direction: bytes, counter: int, message_type: int, body: bytes) -> bytes:
    frame_type = message_type | SEALED
    return frame(
        frame_type, struct.pack(">I", counter) + body + tag(mac, direction, counter, frame_type, body)
    )


# -- the station ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Bundle:
    """Section 13.1, read from the files alone."""

    name: str
    kind: str
    key: bytes
    meta: dict[str, object]
    directory: Path

    @classmethod
    def load(cls, directory: Path) -> Bundle:
        meta = json.loads((directory / "station.json").read_text(encoding="utf-8"))
        key = bytes.fromhex((directory / str(meta["key_file"])).read_text(encoding="ascii").strip())
        assert len(key) == 32
        return cls(str(meta["name"]), str(meta["kind"]), key, meta, directory)

    def _file(self, *names: str) -> Path:
        return self.directory / str(next(self.meta[n] for n in names if self.meta.get(n)))

    @property
    def tls_cert_file(self) -> Path:
        return self._file("tls_cert_file", "tls_cert")

    @property
    def tls_key_file(self) -> Path:
        return self._file("tls_key_file", "tls_key")

    @property
    def ca_file(self) -> Path:
        return self._file("ca_file", "server_ca_file")


@dataclass(frozen=True)
class Message:
    type: int  # without the sealed bit
    body: bytes
    sealed: bool


class Station:
    """One session over one transport. ``sent`` keeps every sealed frame sent, for the replay tests."""

    def __init__(self, transport: Transport, station_id: str, key: bytes) -> None:
        self.transport = transport
        self.reader = FrameReader(transport)
        self.station_id = station_id
        self.key = key
        self.keys: Keys | None = None
        self.send_counter = 0
        self.recv_counter = 0
        self.sent: list[bytes] = []

    # -- raw ----------------------------------------------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        self.transport.send(data)

    def receive(self, timeout: float = 30.0) -> Message:
        """The next frame as a message; a sealed one is verified (section 4.4). Raises TimeoutError."""
        got = self.reader.next(timeout)
        if got is None:
            raise TimeoutError("no frame from the appliance")
        frame_type, payload = got
        if not frame_type & SEALED:
            return Message(frame_type, payload, False)
        assert self.keys is not None, "a sealed frame with no session"
        (counter,) = struct.unpack_from(">I", payload)
        body, got_tag = payload[4:-TAG_LEN], payload[-TAG_LEN:]
        if not hmac.compare_digest(got_tag, tag(self.keys.mac, b"A", counter, frame_type, body)):
            raise AssertionError("the appliance's frame tag does not verify")
        assert counter > self.recv_counter, "the appliance replayed a frame"
        self.recv_counter = counter
        return Message(frame_type & ~SEALED, body, True)

    # -- handshake ------------------------------------------------------------------------------------------------
    def hello(self, nonce: bytes | None = None, versions: tuple[int, ...] = (1,)) -> bytes:
        body = hello_body(self.station_id, nonce or os.urandom(32), versions)
        self.transport.send(frame(HELLO, body))
        return body

    def handshake(self, timeout: float = 30.0, step: float = 2.0) -> None:
        """Section 4.1, with section 4.3's retransmission: the identical frame again after ``step``, three tries
        per round, then a new HELLO (new nonce). A plain ERROR is raised as Refused (a TIMEOUT while waiting for
        a CHALLENGE is stale and skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.keys = None
            hello = hello_body(self.station_id, os.urandom(32))
            challenge = self._step(frame(HELLO, hello), CHALLENGE, step, deadline, skip_timeout=True)
            if challenge is None:
                time.sleep(step)
                continue
            assert challenge[0] == 1, "the appliance chose a version we did not offer"
            keys = derive(self.key, hello, challenge)
            proof = station_proof(keys)
            auth_ok = self._step(frame(AUTH, proof), AUTH_OK, step, deadline, skip_timeout=False)
            if auth_ok is None:
                time.sleep(step)
                continue
            if not hmac.compare_digest(auth_ok, appliance_proof(keys, proof)):
                raise AssertionError("AUTH_OK does not verify: not the appliance")
            self.keys, self.send_counter, self.recv_counter = keys, 0, 0
            return
        raise TimeoutError("handshake did not complete")

    def _step(
        self, wire: bytes, wanted: int, step: float, deadline: float, *, skip_timeout: bool
    ) -> bytes | None:
        for _ in range(3):
            self.transport.send(wire)
            until = min(deadline, time.monotonic() + step)
            while (left := until - time.monotonic()) > 0:
                got = self.reader.next(left)
                if got is None:
                    break
                frame_type, body = got
                if frame_type == wanted:
                    return body
                if frame_type == ERROR:
                    _, code, text = parse_error(body)
                    if code == TIMEOUT and skip_timeout:
                        continue  # section 4.3: it ended an earlier handshake
                    raise Refused(code, text, sealed=False)
        return None

    # -- sealed requests --------------------------------------------------------------------------------------------
    def seal(self, message_type: int, body: bytes) -> bytes:
        assert self.keys is not None, "no session"
        self.send_counter += 1
        wire = seal(self.keys.mac, b"S", self.send_counter, message_type, body)
        self.sent.append(wire)
        return wire

    def send(self, message_type: int, body: bytes) -> None:
        self.transport.send(self.seal(message_type, body))

    def request(self, message_type: int, body: bytes, timeout: float = 60.0) -> Message:
        """Send one sealed request and return its answer (a PONG answers only a PING)."""
        self.send(message_type, body)
        while True:
            reply = self.receive(timeout)
            if reply.type != PONG or message_type == PING:
                return reply

    def expect(self, reply: Message, message_type: int) -> bytes:
        if reply.type == ERROR:
            _, code, text = parse_error(reply.body)
            raise Refused(code, text, sealed=reply.sealed)
        if reply.type == BYE:
            raise Refused(struct.unpack(">H", reply.body)[0], "", sealed=reply.sealed, bye=True)
        assert reply.sealed and reply.type == message_type, reply
        return reply.body

    def ca_chain(self, profile: str = "") -> list[bytes]:
        prof = profile.encode("ascii")
        return parse_chain(self.expect(self.request(GET_CA_CHAIN, bytes([len(prof)]) + prof), CA_CHAIN))

    def enroll(self, request_id: bytes, device_serial: str, csr: bytes, profile: str = "") -> list[bytes]:
        """Section 6 step 4, waiting out PENDING with the same request id."""
        body = enroll_body(request_id, device_serial, csr, profile)
        while True:
            reply = self.request(ENROLL, body)
            if reply.type == PENDING and reply.sealed:
                assert reply.body[:16] == request_id
                time.sleep(struct.unpack(">I", reply.body[16:20])[0] / 1000)
                continue
            answer = self.expect(reply, CERT)
            assert answer[:16] == request_id
            return parse_chain(answer[16:])

    def confirm(self, request_id: bytes, cert_der: bytes) -> None:
        reply = self.request(CONFIRM, request_id + hashlib.sha256(cert_der).digest())
        assert self.expect(reply, CONFIRMED) == request_id

    def bye(self, code: int = 0) -> None:
        self.send(BYE, struct.pack(">H", code))
        self.keys = None
