"""The independent station (tests/conformance/station.py) against section 12 of the specification, read from
the document itself: with the inputs of the table, it must produce every station frame byte for byte, accept
every appliance frame, and derive the same keys. (tests/stations/test_vectors.py checks the document against
the reference code; this checks that the document alone is enough.)"""

from __future__ import annotations

import hashlib
import re
import struct
from pathlib import Path

import pytest

from tests.conformance import station as st

DOC = (Path(__file__).parents[2] / "docs" / "station-protocol.md").read_text(encoding="utf-8")
SECTION = DOC[DOC.index("## 12. Test vectors") : DOC.index("## 13.")]
INPUTS = {
    name: (bytes.fromhex(value) if kind == "" else value.encode("ascii"))
    for name, value, kind in re.findall(
        r"^\| (\w+) \| `([^`]*)`( \(ASCII\))? \|$", SECTION, flags=re.MULTILINE
    )
}
FRAMES = [
    (int(n), direction, name, kind, int(counter or 0), bytes.fromhex("".join(hexdump.split())))
    for n, direction, name, kind, counter, hexdump in re.findall(
        r"\*\*(\d+)\. (S->A|A->S) (\w+)\*\* \((plain|sealed)(?:, counter (\d+))?, \d+ bytes\)\n\n```\n(.*?)```",
        SECTION,
        flags=re.DOTALL,
    )
]


def test_the_section_is_complete() -> None:
    assert {"station_key", "station_nonce", "appliance_nonce", "request_id", "station_id"} <= set(INPUTS)
    assert [f[0] for f in FRAMES] == list(range(1, 14))
    for _, _, _, _, _, wire in FRAMES:
        assert len(wire) == 10 + struct.unpack(">H", wire[3:5])[0]


def test_crc_check_values_of_section_2() -> None:
    assert st.crc8(b"123456789") == 0xF4


def _frame(n: int) -> bytes:
    return FRAMES[n - 1][5]


def _keys() -> st.Keys:
    hello = st.hello_body(INPUTS["station_id"].decode(), INPUTS["station_nonce"])
    challenge = st.FrameReader(_Replay(_frame(2))).next(1)
    assert challenge is not None and challenge[0] == st.CHALLENGE
    return st.derive(INPUTS["station_key"], hello, challenge[1])


class _Replay(st.Transport):
    """Feeds recorded bytes to a FrameReader."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def recv(self, timeout: float) -> bytes:
        data, self.data = self.data, b""
        return data


def test_handshake_frames_and_keys() -> None:
    hello = st.hello_body(INPUTS["station_id"].decode(), INPUTS["station_nonce"])
    assert st.frame(st.HELLO, hello) == _frame(1)
    keys = _keys()
    assert _frame(2)[7:-4] == INPUTS["appliance_nonce"] and _frame(2)[6] == 1  # version 1 chosen
    assert keys.th == INPUTS["transcript_hash"]
    assert (keys.station_proof_key, keys.appliance_proof_key, keys.mac) == (
        INPUTS["k_station_proof"], INPUTS["k_appliance_proof"], INPUTS["k_mac"],
    )  # fmt: skip
    proof = st.station_proof(keys)
    assert st.frame(st.AUTH, proof) == _frame(3)
    assert st.frame(st.AUTH_OK, st.appliance_proof(keys, proof)) == _frame(4)


def test_sealed_frames_in_both_directions() -> None:
    keys, rid = _keys(), INPUTS["request_id"]
    serial, csr, cert = INPUTS["device_serial"].decode(), INPUTS["csr"], INPUTS["device_cert"]
    chain = [INPUTS["issuing_ca"], INPUTS["root_ca"]]

    def enc_chain(certs: list[bytes]) -> bytes:
        return bytes([len(certs)]) + b"".join(struct.pack(">H", len(c)) + c for c in certs)

    expected = {
        5: (b"S", 1, st.GET_CA_CHAIN, b"\x00"),
        6: (b"A", 1, st.CA_CHAIN, enc_chain(chain)),
        7: (b"S", 2, st.ENROLL, st.enroll_body(rid, serial, csr)),
        8: (b"A", 2, st.PENDING, rid + struct.pack(">I", 1500)),
        9: (b"S", 3, st.ENROLL, st.enroll_body(rid, serial, csr)),
        10: (b"A", 3, st.CERT, rid + enc_chain([cert, chain[0]])),
        11: (b"S", 4, st.CONFIRM, rid + hashlib.sha256(cert).digest()),
        12: (b"A", 4, st.CONFIRMED, rid),
        13: (b"S", 5, st.BYE, b"\x00\x00"),
    }
    for n, (direction, counter, message_type, body) in expected.items():
        assert st.seal(keys.mac, direction, counter, message_type, body) == _frame(n), f"frame {n}"
    # And the receiving side: the station opens the appliance's frames (tag, counter) and reads them.
    station = st.Station(
        _Replay(b"".join(_frame(n) for n in (6, 8, 10, 12))), "line1-st03", INPUTS["station_key"]
    )
    station.keys = keys
    assert st.parse_chain(station.receive(1).body) == chain
    pending = station.receive(1)
    assert pending.type == st.PENDING and pending.body == rid + struct.pack(">I", 1500)
    assert st.parse_chain(station.receive(1).body[16:]) == [cert, chain[0]]
    assert station.receive(1).body == rid


@pytest.mark.parametrize("flip", [6, 20, -5])
def test_a_tampered_appliance_frame_is_not_accepted(flip: int) -> None:
    """A frame whose bytes changed (CRC made right again, as a tamperer would) fails the tag check."""
    wire = bytearray(_frame(6))
    wire[flip] ^= 0x01
    body = bytes(wire[:-4])
    station = st.Station(_Replay(body + struct.pack(">I", st.zlib.crc32(body))), "line1-st03", b"\x00" * 32)
    station.keys = _keys()
    with pytest.raises(AssertionError, match="tag does not verify"):
        station.receive(1)


def test_the_reader_resynchronises_after_noise() -> None:
    """Section 2.1: garbage, a false SYNC with a bad header, and a frame cut short are skipped."""
    good = _frame(1)
    noisy = b"\x00\xb1\xd5\xff\xff\xff\xff" + good[:20] + b"garbage" + good + b"\xb1"
    reader = st.FrameReader(_Replay(noisy))
    assert reader.next(1) == (st.HELLO, good[6:-4])


def test_the_client_is_independent_of_birthlines_code() -> None:
    """The point of this client: it is built from the document, so it imports nothing of Birthline's."""
    import ast

    tree = ast.parse(Path(st.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m.split(".")[0] in ("stations", "appliance", "hsm", "tests")}
