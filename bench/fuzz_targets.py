"""The fuzz targets of bench/fuzz.py: one per input boundary, each with its contract, its seeds and, where bytes
alone rarely get past the first check, a structure-aware mutation.

A target's checker takes one input and returns a short outcome label (what the boundary answered, for the
tallies); it raises `Violation` when the boundary broke its contract. The contracts:

- codec: the frame decoder never raises, never buffers more than one maximum frame, accounts for every byte
  (frames + dropped + buffered = fed), finds the same frames whatever the read sizes, and after a silence
  holds no partial frame;
- session: both session state machines take any frame from the peer without raising (a bad frame is a Rejected
  or HandshakeFailed event), and everything they send is one well-formed frame;
- server: the appliance's station connection loop (stations/server.py) over an in-memory channel ends without
  raising when the line goes down, no task of it fails, it sends only well-formed frames, and only requests of
  the station bound to the line reach the enroller;
- csr: the worker-side CSR intake (device serial, CSR, profile builder, TBS capture) answers a certificate or
  a refusal with a reason code other than INTERNAL and a short printable message (bench/csrfuzz.check);
- cmp: parse_message, then the protection check and proof of possession, raise nothing but CmpError;
- ocsp: parse_request returns an OcspRequest or a Refusal with a short reason, never raises;
- config: load_config_bytes (load_config after its read) returns a frozen Config or raises ConfigError listing
  its problems, each with where it is; nothing else.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import re
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, cast

Checker = Callable[[bytes], str]
Mutate = Callable[[bytes, random.Random], bytes]


class Violation(Exception):
    """The boundary broke its contract on this input."""


@dataclass(frozen=True)
class Target:
    name: str
    make: Callable[[], Checker]
    seeds: Callable[[], list[bytes]]
    mutate: Callable[[], Mutate] | None = None  # built lazily: some need keys or seeds


# --- codec -------------------------------------------------------------------------------------------------


def _codec() -> Checker:
    from stations.codec import FRAME_OVERHEAD, MAX_PAYLOAD, DecodeEvent, Frame, FrameDecoder, encode_frame

    def tally(items: list[Frame | DecodeEvent]) -> tuple[list[Frame], int]:
        frames = [i for i in items if isinstance(i, Frame)]
        used = sum(len(f.payload) + FRAME_OVERHEAD for f in frames)
        return frames, used + sum(i.dropped for i in items if isinstance(i, DecodeEvent))

    def check(data: bytes) -> str:
        if not data:
            return "empty"
        # The first byte picks the read size and a small or the real maximum (a small one reaches OVERSIZE and
        # the full-buffer paths with short inputs).
        step = (data[0] & 0x3F) + 1
        max_payload = 48 if data[0] & 0x40 else MAX_PAYLOAD
        stream = data[1:]
        whole, chunked = FrameDecoder(max_payload=max_payload), FrameDecoder(max_payload=max_payload)
        items_whole = whole.feed(stream, now=0.0)
        items_chunked: list[Frame | DecodeEvent] = []
        for i in range(0, len(stream), step):
            items_chunked += chunked.feed(stream[i : i + step], now=0.0)
            if chunked.buffered > chunked.capacity:
                raise Violation(f"buffer of {chunked.buffered} bytes above the capacity {chunked.capacity}")
        frames_w, seen_w = tally(items_whole)
        frames_c, seen_c = tally(items_chunked)
        if frames_w != frames_c:
            raise Violation(f"reads of {step} bytes find {len(frames_c)} frames, one read {len(frames_w)}")
        for dec, seen in ((whole, seen_w), (chunked, seen_c)):
            if seen + dec.buffered != len(stream):
                raise Violation(f"{len(stream)} bytes fed, {seen} accounted for, {dec.buffered} buffered")
        for f in frames_w:
            if encode_frame(f.type, f.payload, max_payload=max_payload) not in stream:
                raise Violation("a frame that is not in the input")
        items_late = chunked.expire(1.0)
        frames_l, seen_l = tally(items_late)
        if seen_c + seen_l + chunked.buffered != len(stream):
            raise Violation("bytes unaccounted for after the silence")
        if chunked.buffered >= 2 and chunked.expire(2.0):
            raise Violation("a partial frame survives a second silence")
        return f"frames={min(len(frames_w) + len(frames_l), 3)}"

    return check


def _codec_seeds() -> list[bytes]:
    from stations.codec import encode_frame

    a = encode_frame(0x01, b"hello")
    b = encode_frame(0x85, bytes(range(40)))
    big = encode_frame(0x02, bytes(100))
    return [
        b"\x00" + a + b,
        b"\x47" + b"noise" + a + b[:7] + b,
        b"\x41" + big + a,
        b"\x05" + a[:8] + a,
        b"\x7f",
    ]


# --- session -----------------------------------------------------------------------------------------------

STATION: Final = "line1-st01"
STATION_KEY: Final = bytes(range(32))


class _RawBody:
    """Stands in for a Message so the station's channel seals arbitrary body bytes under the real session key:
    without it no mutated body would get past the MAC to the message decoders."""

    def __init__(self, frame_type: int, body: bytes) -> None:
        self.TYPE = frame_type
        self._body = body

    def encode(self) -> bytes:
        return self._body


def _counter_random() -> Callable[[int], bytes]:
    state = [0]

    def rand(n: int) -> bytes:
        state[0] += 1
        return hashlib.shake_256(state[0].to_bytes(8, "big")).digest(n)

    return rand


def _session() -> Checker:
    from stations.codec import Frame, FrameDecoder
    from stations.messages import Message
    from stations.session import ApplianceSession, Authenticated, StationSession

    def lookup(station_id: str) -> bytes | None:
        return STATION_KEY if station_id == STATION else None

    def frames(dec: FrameDecoder, wire: bytes) -> list[Frame]:
        return [i for i in dec.feed(wire) if isinstance(i, Frame)]

    def check(data: bytes) -> str:
        app = ApplianceSession(lookup, random=_counter_random())
        sta = StationSession(STATION, STATION_KEY, random=_counter_random())
        to_app, to_sta = FrameDecoder(), FrameDecoder()
        events: set[str] = set()

        def deliver(wires: list[bytes], to_appliance: bool) -> None:
            # Replies are pumped back and forth, a bounded number of rounds (a loop between the two ends would
            # be a finding of its own: it shows as a time-out).
            for _ in range(8):
                if not wires:
                    return
                replies: list[bytes] = []
                for wire in wires:
                    dec = to_app if to_appliance else to_sta
                    for frame in frames(dec, wire):
                        try:
                            step = (app if to_appliance else sta).receive(frame)
                        except Exception as exc:
                            side = "appliance" if to_appliance else "station"
                            raise Violation(f"{side} session raised {type(exc).__name__}: {exc}") from exc
                        for out in step.send:
                            sent = FrameDecoder().feed(out)
                            if len(sent) != 1 or not isinstance(sent[0], Frame):
                                raise Violation("a session sent something that is not one frame")
                        events.update(type(e).__name__ for e in step.events)
                        if any(isinstance(e, Authenticated) for e in step.events):
                            events.add("auth")
                        replies += step.send
                wires, to_appliance = replies, not to_appliance

        pos = 0
        while pos + 1 < len(data):
            op, size = data[pos], data[pos + 1]
            chunk = data[pos + 2 : pos + 2 + size]
            pos += 2 + size
            kind = op % 6
            if kind == 0:
                deliver([chunk], True)  # raw bytes from "the station"
            elif kind == 1:
                deliver([sta.hello()], True)
            elif kind == 2 and sta.established and chunk:
                raw = cast(Message, _RawBody(chunk[0], chunk[1:]))
                deliver([sta.send(raw)], True)  # any body, sealed with the real key
            elif kind == 3:
                deliver([chunk], False)  # raw bytes from "the appliance"
            elif kind == 4 and app.established and chunk:
                deliver([app.send(cast(Message, _RawBody(chunk[0], chunk[1:])))], False)
            elif kind == 5:
                (app if op & 0x80 else sta).reset()
        return ",".join(sorted(events)) or "none"

    return check


def _session_seeds() -> list[bytes]:
    from stations.messages import ENROLL

    def op(kind: int, chunk: bytes = b"") -> bytes:
        return bytes([kind, len(chunk)]) + chunk

    enroll = bytes([ENROLL]) + bytes(16) + b"\x00\x04SN01\x00\x00"
    return [
        op(1) + op(2, enroll) + op(2, b"\x07"),
        op(1) + op(4, b"\x03" + bytes(20)) + op(2, b"\x06"),
        op(0, b"\xb1\xd5\x01\x00\x00\x00") + op(1) + op(5) + op(1),
        op(3, b"garbage") + op(1) + op(2, bytes([0x05]) + bytes(40)),
    ]


def _server() -> Checker:
    """The appliance's station connection (stations/server.py) over an in-memory channel: what the script sends
    goes through the real server loop (session, failure limiter, request tasks, a small enroller); the station
    side answers with a real StationSession, so handshakes complete and sealed requests reach the enroller."""
    import asyncio

    from stations.codec import DecodeEvent, Frame, FrameDecoder
    from stations.codes import Code
    from stations.errors import StationError
    from stations.messages import Confirm, Enroll, GetCaChain, Message, Ping
    from stations.server import EnrollPending, StationServer
    from stations.session import StationSession
    from stations.transports.base import ChannelClosed

    class Enroller:
        calls = 0

        async def ca_chain(self, station: str, profile: str | None) -> list[bytes]:
            return [b"ca"]

        async def enroll(
            self, station: str, request_id: bytes, device_serial: str, csr: bytes, profile: str | None
        ) -> list[bytes]:
            self.calls += 1
            if station != STATION:
                raise Violation(f"a request reached the enroller for station {station!r}")
            if device_serial.startswith("P"):
                raise EnrollPending(5)
            if device_serial.startswith("R"):
                raise StationError(Code.DEVICE_ALREADY_ISSUED, "refused\x1b[31m")
            return [b"cert:" + csr[:16], b"ca"]

        async def confirm(self, station: str, request_id: bytes, cert_sha256: bytes) -> None:
            if station != STATION:
                raise Violation(f"a confirmation reached the enroller for station {station!r}")

    class Channel:
        peer = "fuzz"

        def __init__(self, data: bytes) -> None:
            self.data, self.pos = data, 0
            self.inbox: list[Frame | DecodeEvent] = []
            self.to_server, self.to_station = FrameDecoder(), FrameDecoder()
            self.sta = StationSession(STATION, STATION_KEY, random=_counter_random())
            self.replies = 0

        def _queue(self, wire: bytes) -> None:
            self.inbox += self.to_server.feed(wire)

        def _seal(self, message: Message) -> None:
            if self.sta.established:
                try:
                    wire = self.sta.send(message)
                except StationError:
                    return  # the station library's own check of what it sends (e.g. a bad serial): not sent
                self._queue(wire)

        async def recv(self) -> Frame | DecodeEvent:
            while not self.inbox:
                if self.pos + 1 >= len(self.data):
                    for _ in range(4):
                        await asyncio.sleep(0)  # let the request tasks answer before the line goes down
                    raise ChannelClosed("end of input")
                op, size = self.data[self.pos], self.data[self.pos + 1]
                chunk = self.data[self.pos + 2 : self.pos + 2 + size]
                self.pos += 2 + size
                kind = op % 7
                rid = bytes([(chunk[:1] or b"\x01")[0] | 1]) * 16
                if kind == 0:
                    self._queue(chunk)
                elif kind == 1:
                    self._queue(self.sta.hello())
                elif kind == 2 and chunk:
                    self._seal(cast(Message, _RawBody(chunk[0], chunk[1:])))
                elif kind == 3:
                    serial = chunk[1:9].decode("ascii", "replace") or "S"
                    self._seal(
                        Enroll(rid, "".join(c if c.isalnum() else "X" for c in serial), b"0" + chunk[9:])
                    )
                elif kind == 4:
                    self._seal(Confirm(rid, bytes(32)))
                elif kind == 5:
                    self._seal(GetCaChain() if op & 0x80 else Ping(int.from_bytes(chunk[:4], "big")))
                else:
                    self.sta.reset()
            return self.inbox.pop(0)

        async def send(self, data: bytes) -> None:
            for item in self.to_station.feed(data):
                if isinstance(item, Frame):
                    self.replies += 1
                    for wire in self.sta.receive(item).send:
                        self._queue(wire)
                elif item.kind.value != "garbage":
                    raise Violation(f"the server sent a broken frame ({item.kind.value})")

        async def close(self) -> None:
            return None

    loop = asyncio.new_event_loop()
    problems: list[str] = []
    loop.set_exception_handler(
        lambda _loop, ctx: problems.append(str(ctx.get("exception") or ctx["message"]))
    )

    def lookup(station_id: str) -> bytes | None:
        return STATION_KEY if station_id == STATION else None

    def check(data: bytes) -> str:
        enroller = Enroller()
        server = StationServer(enroller, failure_limit=5)
        channel = Channel(data)
        problems.clear()
        try:
            loop.run_until_complete(server.serve(channel, lookup, station=STATION))
        except Violation:
            raise
        except Exception as exc:
            raise Violation(f"serve raised {type(exc).__name__}: {exc}") from exc
        if problems:
            raise Violation(f"a task failed: {problems[0]}")
        counters = server.states[STATION].counters if STATION in server.states else {}
        sessions = min(counters.get("sessions", 0), 2)
        return f"replies={min(channel.replies, 4)},sessions={sessions},enrolled={min(enroller.calls, 2)}"

    return check


def _server_seeds() -> list[bytes]:
    def op(kind: int, chunk: bytes = b"") -> bytes:
        return bytes([kind, len(chunk)]) + chunk

    return [
        op(1) + op(3, b"\x01SN000001" + bytes(20)) + op(4, b"\x01") + op(5),
        op(1) + op(3, b"\x02PENDING1" + bytes(8)) + op(3, b"\x03REFUSED1") + op(0x85) + op(6) + op(1),
        op(0, b"\xb1\xd5\x01\x00") + op(1) + op(2, b"\x03" + bytes(30)) + op(3, b"\x04SN2"),
        op(1) + op(3, b"\x05A") + op(3, b"\x05A") + op(3, b"\x05A") + op(4, b"\x07"),
    ]


# --- csr ---------------------------------------------------------------------------------------------------

_CSR_STATE: dict[str, object] = {}


def _csr_seeds_and_known() -> tuple[list[object], frozenset[bytes]]:
    from bench import csrfuzz

    if "seeds" not in _CSR_STATE:
        seeds = csrfuzz.make_seeds(1, rsa_3072=False)
        _CSR_STATE["seeds"] = seeds
        _CSR_STATE["known"] = csrfuzz.known_key_hashes(seeds)
    return cast(list[object], _CSR_STATE["seeds"]), cast(frozenset[bytes], _CSR_STATE["known"])


def _csr() -> Checker:
    from bench import csrfuzz

    prep = csrfuzz.preparer()
    _, known = _csr_seeds_and_known()

    def check(data: bytes) -> str:
        outcome = csrfuzz.check(prep, data, known)
        if outcome.violation:
            raise Violation(f"{outcome.code}: {outcome.violation}")
        return outcome.code

    return check


def _csr_seeds() -> list[bytes]:
    from bench import csrfuzz

    seeds, _ = _csr_seeds_and_known()
    return [cast(csrfuzz.Seed, s).der for s in seeds]


def _csr_mutate() -> Mutate:
    from bench import csrfuzz

    seeds, _ = _csr_seeds_and_known()
    typed = cast(list[csrfuzz.Seed], seeds)
    spkis = csrfuzz.interesting_spkis(typed)
    current: list[csrfuzz.Mutator] = []

    def mutate(data: bytes, rng: random.Random) -> bytes:
        # csrfuzz's mutator works from its own seeds (it re-signs after a change, so inputs get past the proof
        # of possession); one per rng keeps runs deterministic. Only the last is kept: atheris passes a new rng
        # on every call, and a table of them all (each holding its rng) grew by about 1.5 kB an input.
        if not current or current[0].rng is not rng:
            current[:] = [csrfuzz.Mutator(typed, rng, spkis)]
        return current[0].next()[2]

    return mutate


# --- cmp ---------------------------------------------------------------------------------------------------

CMP_SECRET: Final = b"fuzz shared secret"


def _cmp() -> Checker:
    from appliance.cmp import parse_message
    from appliance.cmp.errors import CmpError
    from appliance.cmp.model import CertReqBody
    from appliance.cmp.protection import verify_protection

    def check(data: bytes) -> str:
        try:
            message = parse_message(data)
            verify_protection(message, secret_for=lambda kid: CMP_SECRET, allow_signature=True)
            if isinstance(message.body, CertReqBody):
                for request in message.body.requests:
                    request.verify_pop()
        except CmpError as exc:
            if not exc.message or len(exc.message) > 2000:
                raise Violation("a CmpError without a usable text") from exc
            return exc.fail_info.asn1_name
        except Exception as exc:
            raise Violation(f"raised {type(exc).__name__}: {exc}") from exc
        return f"ok-{message.body_type.name}"

    return check


def _cmp_seeds() -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from appliance.cmp import (
        BodyType,
        CertTemplate,
        MacProtector,
        P10crBody,
        PKIStatusInfo,
        build_message,
        request_header,
    )
    from appliance.cmp.build import make_cert_request
    from appliance.cmp.errors import FailInfo
    from appliance.cmp.model import (
        CertConfBody,
        CertRepBody,
        CertReqBody,
        CertResponse,
        CertStatus,
        ErrorBody,
        NestedBody,
        PkiConfBody,
        PollReqBody,
    )
    from appliance.cmp.protection import SignatureProtector
    from bench import csrfuzz

    rng = random.Random("cmp-fuzz-seeds")
    key = csrfuzz.ec_key(ec.SECP256R1(), rng)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz device")])
    now = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(7).not_valid_before(now).not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )  # fmt: skip
    spki = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(name)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )
    mac = MacProtector(CMP_SECRET, b"fuzz-kid", iterations=100)
    sig = SignatureProtector(key, cert)

    def header() -> object:
        return request_header(
            sender=x509.DirectoryName(name),
            recipient=x509.DirectoryName(name),
            transaction_id=rng.randbytes(16),
            now=now,
        )

    ir = CertReqBody((make_cert_request(CertTemplate(subject=name, public_key_der=spki), pop_key=key),))
    out = []
    for body_type, body, prot in (
        (BodyType.P10CR, P10crBody(csr), mac),
        (BodyType.IR, ir, sig),
        (BodyType.CR, ir, mac),
        (BodyType.IP, CertRepBody((CertResponse(0, PKIStatusInfo.accepted(), cert),), (cert,)), sig),
        (BodyType.CERTCONF, CertConfBody((CertStatus.for_certificate(cert, 0),)), mac),
        (BodyType.PKICONF, PkiConfBody(), mac),
        (BodyType.POLLREQ, PollReqBody((0,)), mac),
        (
            BodyType.ERROR,
            ErrorBody(PKIStatusInfo.rejection(FailInfo.BAD_REQUEST, "no"), 7, ("details",)),
            None,
        ),
    ):
        out.append(build_message(header(), body_type, body, protection=prot).der)  # type: ignore[arg-type]
    inner = build_message(header(), BodyType.P10CR, P10crBody(csr), protection=mac)  # type: ignore[arg-type]
    nested = build_message(header(), BodyType.NESTED, NestedBody.of(inner), protection=sig)  # type: ignore[arg-type]
    out.append(nested.der)
    return out


# --- ocsp --------------------------------------------------------------------------------------------------

OCSP_MAX_BYTES: Final = 8192


def _ocsp() -> Checker:
    from appliance.va.ocsp_request import OcspRequest, Refusal, parse_request

    reason = re.compile(r"[a-z0-9-]{1,40}")

    def check(data: bytes) -> str:
        try:
            result = parse_request(data, OCSP_MAX_BYTES)
        except Exception as exc:
            raise Violation(f"raised {type(exc).__name__}: {exc}") from exc
        if isinstance(result, Refusal):
            if not reason.fullmatch(result.reason):
                raise Violation(f"refusal reason {result.reason!r} is not a short code")
            return result.reason
        if not isinstance(result, OcspRequest):
            raise Violation(f"returned a {type(result).__name__}")
        return "request"

    return check


def _ocsp_seeds() -> list[bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509 import ocsp
    from cryptography.x509.oid import NameOID

    from bench import csrfuzz

    rng = random.Random("ocsp-fuzz-seeds")
    key = csrfuzz.ec_key(ec.SECP256R1(), rng)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fuzz CA")])
    now = dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(0x1234567890ABCDEF).not_valid_before(now).not_valid_after(now + dt.timedelta(days=365))
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )  # fmt: skip
    out = []
    for algo in (hashes.SHA1(), hashes.SHA256()):  # noqa: S303 - OCSP CertIDs use SHA-1 in the wild
        for nonce in (None, rng.randbytes(16), rng.randbytes(32)):
            builder = ocsp.OCSPRequestBuilder().add_certificate(cert, cert, algo)
            if nonce is not None:
                builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
            out.append(builder.build().public_bytes(serialization.Encoding.DER))
    return out


# --- config ------------------------------------------------------------------------------------------------

_TOML_VALUES: Final = [
    "0", "-1", "1", "65535", "65536", "9223372036854775807", "-9223372036854775808", "1e309", "nan", "inf", "0.5",
    "true", "false", '""', '"x"', '"' + "a" * 5000 + '"', '"\\u0000"', '"../../etc/passwd"', '"/dev/null"',
    '"0.0.0.0:0"', '"127.0.0.1:99999"', '"[::1]:7450"', '"host:port"', '":7450"', "[]", '["a", "b"]', "[1, 2]",
    "{}", "{ a = 1 }", "1979-05-27T07:32:00Z", "07:32:00", '"%s%n"', '"\\u202e"', "[[1]]",
    # Edges of the TOML reader itself: integers past 64 bits and past the 4300 digits Python prints, arrays and
    # inline tables nested past the depth of tomllib's recursive descent, and just below it.
    "9223372036854775808", "0x" + "f" * 40, "0x" + "f" * 4000, "9" * 4400, "[" * 1000, "{a=" * 1000,
    "[" * 300 + "]" * 300,
]  # fmt: skip

_CONFIG_KEYS: Final = [
    "state_dir", "names", "listen", "lan_listen", "max_connections", "max_connections_per_peer", "path",
    "batch_max", "issuing_ca", "default_profile", "max_csr_bytes", "prepare_workers", "pipeline_depth",
    "handshake_timeout_s", "idle_timeout_s", "failure_limit", "checkpoint_every_entries", "base", "key_algorithms",
    "enabled", "url", "protection", "max_mac_iterations", "module", "token_label", "pin_file", "crl_validity_s",
]  # fmt: skip

_CONFIG_SECTIONS: Final = ["appliance", "hsm", "journal", "issuance", "stations", "va", "cmp", "upstream", "audit",
                           "control", "metrics", "scep", "est", "profiles.x", "cmp.labels.a", "nope"]  # fmt: skip


def _config() -> Checker:
    import dataclasses
    import tomllib

    from appliance.config import Config, load_config_bytes
    from appliance.errors import ConfigError

    # The loader on the input as the bytes of a configuration file in an empty directory (relative paths in it
    # resolve there). load_config is load_config_bytes after one read: writing each input to a file cost more
    # than loading it and held the target to a few hundred inputs a second.
    source = Path(tempfile.mkdtemp(prefix="birthline-fuzz-config-")).resolve() / "birthline.toml"

    def check(data: bytes) -> str:
        try:
            cfg = load_config_bytes(data, source)
        except ConfigError as exc:
            if not exc.problems:
                raise Violation("a ConfigError without problems") from exc
            for problem in exc.problems:
                if not problem.where or not problem.message:
                    raise Violation(f"a problem without where it is or what: {problem!r}") from exc
            first = exc.problems[0].message
            return "not-toml" if first.startswith(("not valid TOML", "cannot read")) else "problems"
        except (RecursionError, tomllib.TOMLDecodeError) as exc:
            raise Violation(f"raised {type(exc).__name__}") from exc
        except Exception as exc:
            raise Violation(f"raised {type(exc).__name__}: {exc}") from exc
        if not isinstance(cfg, Config):
            raise Violation(f"returned a {type(cfg).__name__}")
        for part in [cfg, *(getattr(cfg, f.name) for f in dataclasses.fields(cfg))]:
            params = getattr(type(part), "__dataclass_params__", None)  # set on every dataclass
            if params is not None and not params.frozen:
                raise Violation(f"{type(part).__name__} is not frozen")
        return "config"

    return check


def _config_seeds() -> list[bytes]:
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    text = doc.read_text()
    found = re.search(r"## A complete example\s+```toml\n(.*?)```", text, re.S)
    example = found.group(1) if found else "[appliance]\n"
    more = (
        '[cmp]\nlisten = "127.0.0.1:7452"\nmax_mac_iterations = 10000\n[cmp.labels.line1]\n'
        'secret_file = "cmp.secret"\n[upstream]\nenabled = false\n[control]\n[metrics]\n'
    )
    return [example.encode(), (example + more).encode(), b"[appliance]\n", b""]


def _config_mutate() -> Mutate:
    def mutate(data: bytes, rng: random.Random) -> bytes:
        # TOML bytes mutated at random almost never parse; this mutates lines, so the inputs reach the checks of
        # values, types, ranges and combinations behind the TOML parser.
        lines = data.decode("utf-8", "replace").split("\n") or [""]
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(lines))
            choice = rng.randrange(6)
            if choice == 0 and "=" in lines[i]:
                lines[i] = lines[i].split("=", 1)[0] + "= " + rng.choice(_TOML_VALUES)
            elif choice == 1:
                lines.insert(i, f"{rng.choice(_CONFIG_KEYS)} = {rng.choice(_TOML_VALUES)}")
            elif choice == 2:
                lines.insert(i, f"[{rng.choice(_CONFIG_SECTIONS)}]")
            elif choice == 3 and len(lines) > 1:
                del lines[i]
            elif choice == 4:
                lines.insert(rng.randrange(len(lines) + 1), lines[i])
            else:
                j = rng.randrange(len(lines))
                lines[i], lines[j] = lines[j], lines[i]
        return "\n".join(lines).encode()

    return mutate


def _der_mutate() -> Mutate:
    from bench import ocsp_fuzz

    def mutate(data: bytes, rng: random.Random) -> bytes:
        # Byte mutations of DER mostly break a length near the top and stop at the first check; tree mutations
        # (bench/ocsp_fuzz.py: nodes duplicated, dropped, swapped, retagged, integers at edges, lengths kept
        # right) reach the readers of each field.
        try:
            tree = ocsp_fuzz.decode(data)
        except ValueError:
            return ocsp_fuzz.mutate_bytes(rng, data)
        for _ in range(rng.choice([1, 1, 2, 3])):
            tree = ocsp_fuzz.mutate_tree(rng, [tree], tree)
        out = ocsp_fuzz.encode(tree)
        return ocsp_fuzz.mutate_bytes(rng, out) if rng.random() < 0.2 else out

    return mutate


TARGETS: Final = {
    t.name: t
    for t in (
        Target("codec", _codec, _codec_seeds),
        Target("session", _session, _session_seeds),
        Target("server", _server, _server_seeds),
        Target("csr", _csr, _csr_seeds, _csr_mutate),
        Target("cmp", _cmp, _cmp_seeds, _der_mutate),
        Target("ocsp", _ocsp, _ocsp_seeds, _der_mutate),
        Target("config", _config, _config_seeds, _config_mutate),
    )
}
