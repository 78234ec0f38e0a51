"""Test vectors for docs/station-protocol.md, produced by running the real sessions with fixed inputs.

``python -m tests.stations.vectors --write`` regenerates tests/stations/vectors.json and the generated
sections of the document; test_vectors.py fails whenever code, JSON and document disagree.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from stations import crypto
from stations.codec import FRAME_OVERHEAD, Frame, FrameDecoder
from stations.messages import (
    CaChain,
    Cert,
    Confirm,
    Confirmed,
    Enroll,
    GetCaChain,
    Hello,
    Message,
    Pending,
)
from stations.session import SEAL_OVERHEAD, ApplianceSession, Received, StationSession, Step

ROOT = Path(__file__).resolve().parents[2]
JSON_PATH = Path(__file__).with_name("vectors.json")
DOC_PATH = ROOT / "docs" / "station-protocol.md"

STATION_ID = "line1-st03"
STATION_KEY = bytes(range(0x00, 0x20))
STATION_NONCE = bytes(range(0x20, 0x40))
APPLIANCE_NONCE = bytes(range(0x40, 0x60))
REQUEST_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
DEVICE_SERIAL = "SN0001"
# Short DER-shaped placeholders: the protocol carries CSR and certificates as opaque bytes, so real ones would
# only make the hex longer.
CSR = bytes.fromhex("3010") + bytes(range(0xA0, 0xB0))
DEVICE_CERT = bytes.fromhex("3010") + bytes(range(0xB0, 0xC0))
ISSUING_CA = bytes.fromhex("3008") + bytes(range(0xC0, 0xC8))
ROOT_CA = bytes.fromhex("3008") + bytes(range(0xD0, 0xD8))


def _fixed(value: bytes) -> Callable[[int], bytes]:
    def draw(n: int) -> bytes:
        assert n == len(value)
        return value

    return draw


class Link:
    """A station and an appliance joined in memory, recording every frame that crosses."""

    def __init__(self, station: StationSession, appliance: ApplianceSession) -> None:
        self.station = station
        self.appliance = appliance
        self.to_appliance = FrameDecoder()
        self.to_station = FrameDecoder()
        self.log: list[tuple[str, bytes]] = []
        self.station_events: list[object] = []
        self.appliance_events: list[object] = []

    def _frames(self, decoder: FrameDecoder, wire: bytes) -> Iterator[Frame]:
        for item in decoder.feed(wire):
            assert isinstance(item, Frame), item
            yield item

    def station_sends(self, wire: bytes) -> list[Message]:
        """Deliver a station frame; deliver the appliance's automatic answers back. Returns requests."""
        self.log.append(("S->A", wire))
        requests: list[Message] = []
        for frame in self._frames(self.to_appliance, wire):
            step = self.appliance.receive(frame)
            self.appliance_events.extend(step.events)
            requests += [e.message for e in step.events if isinstance(e, Received)]
            for reply in step.send:
                self.appliance_sends(reply)
        return requests

    def appliance_sends(self, wire: bytes) -> None:
        self.log.append(("A->S", wire))
        for frame in self._frames(self.to_station, wire):
            step: Step = self.station.receive(frame)
            self.station_events.extend(step.events)
            for reply in step.send:
                self.station_sends(reply)


def _describe(wire: bytes) -> tuple[str, bool, int]:
    frame = FrameDecoder().feed(wire)[0]
    assert isinstance(frame, Frame)
    kind = frame.kind
    name = {
        0x01: "HELLO",
        0x02: "CHALLENGE",
        0x03: "AUTH",
        0x04: "AUTH_OK",
        0x10: "GET_CA_CHAIN",
        0x11: "CA_CHAIN",
        0x12: "ENROLL",
        0x13: "CERT",
        0x14: "CONFIRM",
        0x15: "CONFIRMED",
        0x16: "PENDING",
        0x20: "ERROR",
        0x21: "PING",
        0x22: "PONG",
        0x23: "BYE",
    }[kind]
    counter = int.from_bytes(frame.payload[:4], "big") if frame.sealed else 0
    return name, frame.sealed, counter


def build_vectors() -> dict[str, Any]:
    station = StationSession(STATION_ID, STATION_KEY, random=_fixed(STATION_NONCE))
    appliance = ApplianceSession(
        lambda sid: STATION_KEY if sid == STATION_ID else None, random=_fixed(APPLIANCE_NONCE)
    )
    link = Link(station, appliance)
    link.station_sends(station.hello())
    assert station.established and appliance.established

    [request] = link.station_sends(station.send(GetCaChain()))
    assert isinstance(request, GetCaChain)
    link.appliance_sends(appliance.send(CaChain((ISSUING_CA, ROOT_CA))))

    enroll = Enroll(REQUEST_ID, DEVICE_SERIAL, CSR)
    [request] = link.station_sends(station.send(enroll))
    assert request == enroll
    link.appliance_sends(appliance.send(Pending(REQUEST_ID, 1500)))
    # The retry after PENDING: same body, next counter.
    [request] = link.station_sends(station.send(enroll))
    assert request == enroll
    link.appliance_sends(appliance.send(Cert(REQUEST_ID, (DEVICE_CERT, ISSUING_CA))))

    digest = hashlib.sha256(DEVICE_CERT).digest()
    [request] = link.station_sends(station.send(Confirm(REQUEST_ID, digest)))
    assert request == Confirm(REQUEST_ID, digest)
    link.appliance_sends(appliance.send(Confirmed(REQUEST_ID)))
    link.station_sends(station.close())

    hello = Hello(STATION_ID, (1,), STATION_NONCE).encode()
    challenge = bytes([1]) + APPLIANCE_NONCE
    th = crypto.transcript_hash(hello, challenge)
    keys = crypto.derive_keys(STATION_KEY, STATION_NONCE, APPLIANCE_NONCE, th)
    frames = []
    for direction, wire in link.log:
        name, sealed, counter = _describe(wire)
        frames.append(
            {"dir": direction, "message": name, "sealed": sealed, "counter": counter, "hex": wire.hex()}
        )
    return {
        "station_id": STATION_ID,
        "station_key": STATION_KEY.hex(),
        "station_nonce": STATION_NONCE.hex(),
        "appliance_nonce": APPLIANCE_NONCE.hex(),
        "request_id": REQUEST_ID.hex(),
        "device_serial": DEVICE_SERIAL,
        "csr": CSR.hex(),
        "device_cert": DEVICE_CERT.hex(),
        "issuing_ca": ISSUING_CA.hex(),
        "root_ca": ROOT_CA.hex(),
        "transcript_hash": th.hex(),
        "k_station_proof": keys.station_proof.hex(),
        "k_appliance_proof": keys.appliance_proof.hex(),
        "k_mac": keys.mac.hex(),
        "frames": frames,
    }


def overhead_figures(csr_len: int = 500, chain: tuple[int, ...] = (700, 450, 350)) -> dict[str, Any]:
    """Wire bytes of one enrolment under real sessions; "useful" = CSR + chain + device serial."""
    station = StationSession(STATION_ID, STATION_KEY, random=_fixed(STATION_NONCE))
    appliance = ApplianceSession(lambda _sid: STATION_KEY, random=_fixed(APPLIANCE_NONCE))
    link = Link(station, appliance)
    link.station_sends(station.hello())
    handshake = sum(len(w) for _, w in link.log)
    serial = "SN-0123456789ABC"
    certs = tuple(bytes([0x30]) * n for n in chain)
    enroll = station.send(Enroll(REQUEST_ID, serial, bytes([0x30]) * csr_len))
    cert = appliance.send(Cert(REQUEST_ID, certs))
    confirm = station.send(Confirm(REQUEST_ID, hashlib.sha256(certs[0]).digest()))
    confirmed = appliance.send(Confirmed(REQUEST_ID))
    useful = csr_len + sum(chain) + len(serial)
    enrol_wire = len(enroll) + len(cert)
    full_wire = enrol_wire + len(confirm) + len(confirmed)
    return {
        "csr_bytes": csr_len,
        "chain_bytes": sum(chain),
        "chain_certs": len(chain),
        "device_serial_bytes": len(serial),
        "useful_bytes": useful,
        "frame_overhead": FRAME_OVERHEAD,
        "seal_overhead": SEAL_OVERHEAD,
        "enroll_frame": len(enroll),
        "cert_frame": len(cert),
        "confirm_frame": len(confirm),
        "confirmed_frame": len(confirmed),
        "handshake_bytes": handshake,
        "enrol_overhead_bytes": enrol_wire - useful,
        "enrol_overhead_ratio": round((enrol_wire - useful) / useful, 4),
        "with_confirm_overhead_bytes": full_wire - useful,
        "with_confirm_overhead_ratio": round((full_wire - useful) / useful, 4),
        "wire_ms_at_115200": round(full_wire * 10 / 115200 * 1000, 1),
    }


def _hex_block(data: bytes, width: int = 32) -> str:
    lines = [data[i : i + width].hex(" ") for i in range(0, len(data), width)]
    return "\n".join(lines)


def render_vectors_markdown(vectors: dict[str, Any]) -> str:
    out = [
        "| input / derived value | hex |",
        "|---|---|",
    ]
    for field in (
        "station_key",
        "station_nonce",
        "appliance_nonce",
        "request_id",
        "csr",
        "device_cert",
        "issuing_ca",
        "root_ca",
        "transcript_hash",
        "k_station_proof",
        "k_appliance_proof",
        "k_mac",
    ):
        out.append(f"| {field} | `{vectors[field]}` |")
    out.append(f"| station_id | `{vectors['station_id']}` (ASCII) |")
    out.append(f"| device_serial | `{vectors['device_serial']}` (ASCII) |")
    out.append("")
    for number, frame in enumerate(vectors["frames"], 1):
        wire = bytes.fromhex(frame["hex"])
        sealed = f"sealed, counter {frame['counter']}" if frame["sealed"] else "plain"
        out.append(f"**{number}. {frame['dir']} {frame['message']}** ({sealed}, {len(wire)} bytes)")
        out.append("")
        out.append("```")
        out.extend(_hex_block(wire).splitlines())
        out.append("```")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_overhead_markdown(figures: dict[str, Any]) -> str:
    rows = [
        ("CSR, chain, device serial (useful bytes)", f"{figures['useful_bytes']}"),
        ("ENROLL frame", f"{figures['enroll_frame']}"),
        ("CERT frame (3 certificates)", f"{figures['cert_frame']}"),
        ("CONFIRM frame", f"{figures['confirm_frame']}"),
        ("CONFIRMED frame", f"{figures['confirmed_frame']}"),
        (
            "overhead, ENROLL + CERT",
            f"{figures['enrol_overhead_bytes']} bytes = {figures['enrol_overhead_ratio'] * 100:.2f} %",
        ),
        (
            "overhead, with CONFIRM + CONFIRMED",
            f"{figures['with_confirm_overhead_bytes']} bytes = "
            f"{figures['with_confirm_overhead_ratio'] * 100:.2f} %",
        ),
        ("handshake, once per session", f"{figures['handshake_bytes']} bytes"),
        ("line time of the four frames at 115200 8N1", f"{figures['wire_ms_at_115200']} ms"),
    ]
    out = ["| quantity | value |", "|---|---|"]
    out += [f"| {a} | {b} |" for a, b in rows]
    return "\n".join(out) + "\n"


SECTIONS: dict[str, Callable[[], str]] = {
    "vectors": lambda: render_vectors_markdown(build_vectors()),
    "overhead": lambda: render_overhead_markdown(overhead_figures()),
}


def doc_section(text: str, name: str) -> str:
    begin, end = f"<!-- generated:{name}:begin -->\n", f"<!-- generated:{name}:end -->"
    start = text.index(begin) + len(begin)
    return text[start : text.index(end, start)]


def write() -> None:
    JSON_PATH.write_text(json.dumps(build_vectors(), indent=2) + "\n", encoding="utf-8")
    text = DOC_PATH.read_text(encoding="utf-8")
    for name, render in SECTIONS.items():
        begin, end = f"<!-- generated:{name}:begin -->\n", f"<!-- generated:{name}:end -->"
        start = text.index(begin) + len(begin)
        text = text[:start] + render() + text[text.index(end, start) :]
    DOC_PATH.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    if "--write" in sys.argv:
        write()
    else:
        json.dump(build_vectors(), sys.stdout, indent=2)
        json.dump(overhead_figures(), sys.stdout, indent=2)
