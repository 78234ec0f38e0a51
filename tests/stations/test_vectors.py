"""The document, the JSON vectors and the code describe the same bytes."""

from __future__ import annotations

import json
import re

import pytest

from stations import crypto
from stations.codec import Frame, FrameDecoder
from stations.messages import decode_message
from stations.session import SEAL_OVERHEAD
from tests.stations.vectors import DOC_PATH, JSON_PATH, SECTIONS, build_vectors, doc_section, overhead_figures

DOC = DOC_PATH.read_text(encoding="utf-8")
JSON = json.loads(JSON_PATH.read_text(encoding="utf-8"))


def test_json_matches_what_the_code_produces() -> None:
    assert build_vectors() == JSON


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_generated_doc_sections_are_current(name: str) -> None:
    assert doc_section(DOC, name) == SECTIONS[name](), "run: python -m tests.stations.vectors --write"


def test_doc_hex_equals_json_hex() -> None:
    section = doc_section(DOC, "vectors")
    blocks = re.findall(r"```\n(.*?)```", section, flags=re.DOTALL)
    doc_hex = ["".join(block.split()) for block in blocks]
    assert doc_hex == [frame["hex"] for frame in JSON["frames"]]


def test_vector_exchange_is_complete_and_counters_increase() -> None:
    names = [f["message"] for f in JSON["frames"]]
    assert names == [
        "HELLO",
        "CHALLENGE",
        "AUTH",
        "AUTH_OK",
        "GET_CA_CHAIN",
        "CA_CHAIN",
        "ENROLL",
        "PENDING",
        "ENROLL",
        "CERT",
        "CONFIRM",
        "CONFIRMED",
        "BYE",
    ]
    for direction in ("S->A", "A->S"):
        counters = [f["counter"] for f in JSON["frames"] if f["dir"] == direction and f["sealed"]]
        assert counters == list(range(1, len(counters) + 1))


def test_vector_frames_verify_under_the_documented_key_schedule() -> None:
    """Re-derive everything from the inputs in the document, the way an independent station would."""
    hello, challenge = (bytes.fromhex(JSON["frames"][i]["hex"])[6:-4] for i in (0, 1))
    th = crypto.transcript_hash(hello, challenge)
    assert th.hex() == JSON["transcript_hash"]
    keys = crypto.derive_keys(
        bytes.fromhex(JSON["station_key"]),
        bytes.fromhex(JSON["station_nonce"]),
        bytes.fromhex(JSON["appliance_nonce"]),
        th,
    )
    assert keys.mac.hex() == JSON["k_mac"]
    auth = bytes.fromhex(JSON["frames"][2]["hex"])[6:-4]
    assert auth == crypto.station_proof(keys, th)
    assert bytes.fromhex(JSON["frames"][3]["hex"])[6:-4] == crypto.appliance_proof(keys, th, auth)
    for entry in JSON["frames"][4:]:
        [frame] = FrameDecoder().feed(bytes.fromhex(entry["hex"]))
        assert isinstance(frame, Frame) and frame.sealed
        body = frame.payload[4:-12]
        direction = crypto.STATION_TO_APPLIANCE if entry["dir"] == "S->A" else crypto.APPLIANCE_TO_STATION
        tag = crypto.frame_tag(
            keys.mac,
            body,
            direction=direction,
            counter=entry["counter"],
            frame_type=frame.type,
            length=len(frame.payload),
        )
        assert frame.payload[-12:] == tag
        decode_message(frame.kind, body)


def test_overhead_budget() -> None:
    figures = overhead_figures()
    assert figures["enrol_overhead_ratio"] <= 0.05
    assert figures["seal_overhead"] == SEAL_OVERHEAD == 16
    assert "93 bytes = 4.61 %" in DOC
