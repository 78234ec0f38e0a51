"""Framing: encode/decode, resynchronisation after noise, bounded buffering, the pure timeout hook."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from stations.codec import (
    HEADER_LEN,
    MAX_PAYLOAD,
    SYNC,
    DecodeEvent,
    DecodeEventKind,
    Frame,
    FrameDecoder,
    crc8,
    crc32,
    encode_frame,
)
from stations.errors import StationError

VECTORS = json.loads(Path(__file__).with_name("vectors.json").read_text(encoding="utf-8"))


def frames_of(items: list[Frame | DecodeEvent]) -> list[Frame]:
    return [i for i in items if isinstance(i, Frame)]


def events_of(items: list[Frame | DecodeEvent]) -> list[DecodeEventKind]:
    return [i.kind for i in items if isinstance(i, DecodeEvent)]


def test_crc_check_values() -> None:
    assert crc8(b"123456789") == 0xF4
    assert crc32(b"123456789") == 0xCBF43926


def test_encode_layout() -> None:
    wire = encode_frame(0x21, b"\x00\x00\x00\x07")
    assert wire[:2] == SYNC
    assert wire[2] == 0x21
    assert struct.unpack(">H", wire[3:5])[0] == 4
    assert wire[5] == crc8(wire[:5])
    assert wire[6:10] == b"\x00\x00\x00\x07"
    assert struct.unpack(">I", wire[10:])[0] == crc32(wire[:10])


def test_round_trip_including_empty_and_maximum_payloads() -> None:
    decoder = FrameDecoder()
    for payload in (b"", b"x", bytes(range(256)) * 3, b"\xb1\xd5" * 100, bytes(MAX_PAYLOAD)):
        out = decoder.feed(encode_frame(0x12, payload))
        assert out == [Frame(0x12, payload)]
        assert decoder.buffered == 0


def test_encode_refuses_oversize_payload_and_non_byte_type() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(1, bytes(MAX_PAYLOAD + 1))
    with pytest.raises(ValueError, match="not a byte"):
        encode_frame(256, b"")


def test_spec_vectors_decode_frame_by_frame_and_as_one_stream() -> None:
    wires = [bytes.fromhex(f["hex"]) for f in VECTORS["frames"]]
    decoder = FrameDecoder()
    for wire in wires:
        [frame] = decoder.feed(wire)
        assert isinstance(frame, Frame)
        assert encode_frame(frame.type, frame.payload) == wire
    stream = b"".join(wires)
    one_by_one: list[Frame | DecodeEvent] = []
    for i in range(len(stream)):
        one_by_one += decoder.feed(stream[i : i + 1])
    assert [encode_frame(f.type, f.payload) for f in frames_of(one_by_one)] == wires
    assert events_of(one_by_one) == []


def test_garbage_before_between_and_after_frames_is_skipped_and_counted() -> None:
    a, b = encode_frame(1, b"first"), encode_frame(2, b"second")
    out = FrameDecoder().feed(b"\x00\xff noise" + a + b"\xb1\x00junk" + b + b"tail")
    assert frames_of(out) == [Frame(1, b"first"), Frame(2, b"second")]
    garbage = [i for i in out if isinstance(i, DecodeEvent)]
    assert all(e.kind is DecodeEventKind.GARBAGE for e in garbage)
    assert sum(e.dropped for e in garbage) == len(b"\x00\xff noise") + len(b"\xb1\x00junk") + len(b"tail")


def test_bad_crc_is_reported_and_the_next_frame_still_decodes() -> None:
    bad = bytearray(encode_frame(3, b"payload"))
    bad[8] ^= 0x01
    good = encode_frame(4, b"ok")
    out = FrameDecoder().feed(bytes(bad) + good)
    assert DecodeEventKind.BAD_CRC in events_of(out)
    assert frames_of(out) == [Frame(4, b"ok")]


def test_noise_in_the_length_field_is_caught_by_the_header_check() -> None:
    bad = bytearray(encode_frame(3, b"payload"))
    bad[3] ^= 0x40  # LEN now claims 16 KiB+; without HCRC the decoder would wait for it
    good = encode_frame(4, b"ok")
    decoder = FrameDecoder()
    out = decoder.feed(bytes(bad) + good)
    assert events_of(out)[0] is DecodeEventKind.BAD_HEADER
    assert frames_of(out) == [Frame(4, b"ok")]
    assert decoder.buffered == 0


def test_oversize_length_is_rejected_from_the_header_alone() -> None:
    head = SYNC + struct.pack(">BH", 0x12, 0xFFFF)
    head += bytes([crc8(head)])
    decoder = FrameDecoder()
    out = decoder.feed(head)
    assert events_of(out) == [DecodeEventKind.OVERSIZE, DecodeEventKind.GARBAGE]
    assert decoder.buffered == 0
    # The would-be payload is just garbage now, and a frame after it is found.
    out = decoder.feed(bytes(1000) + encode_frame(5, b"after"))
    assert frames_of(out) == [Frame(5, b"after")]


def test_smaller_configured_maximum_is_enforced() -> None:
    decoder = FrameDecoder(max_payload=64)
    out = decoder.feed(encode_frame(1, bytes(65)) + encode_frame(1, bytes(64)))
    assert DecodeEventKind.OVERSIZE in events_of(out)
    assert frames_of(out) == [Frame(1, bytes(64))]
    assert decoder.capacity == HEADER_LEN + 64 + 4


def test_truncated_frame_then_silence_is_expired_by_the_caller_clock() -> None:
    decoder = FrameDecoder(frame_timeout=0.5)
    wire = encode_frame(7, b"x" * 100)
    assert decoder.feed(wire[:40], now=10.0) == []
    assert decoder.expire(10.3) == []
    out = decoder.expire(10.6)
    assert events_of(out)[0] is DecodeEventKind.TIMEOUT
    assert decoder.buffered == 0
    # The rest of the dead frame arrives late: it is garbage, not a frame.
    out = decoder.feed(wire[40:] + encode_frame(8, b"next"), now=11.0)
    assert frames_of(out) == [Frame(8, b"next")]


def test_bytes_keep_a_partial_frame_alive() -> None:
    decoder = FrameDecoder(frame_timeout=0.5)
    wire = encode_frame(7, b"y" * 100)
    decoder.feed(wire[:30], now=1.0)
    decoder.feed(wire[30:60], now=1.4)
    assert decoder.expire(1.8) == []
    assert decoder.feed(wire[60:], now=2.0) == [Frame(7, b"y" * 100)]


def test_expire_without_feed_times_starts_the_clock_on_first_call() -> None:
    decoder = FrameDecoder(frame_timeout=0.5)
    decoder.feed(encode_frame(7, b"z" * 10)[:8])
    assert decoder.expire(100.0) == []
    assert decoder.expire(100.4) == []
    assert DecodeEventKind.TIMEOUT in events_of(decoder.expire(100.5))


def test_a_real_frame_hidden_behind_a_false_start_is_recovered_on_timeout() -> None:
    # A false header with a valid check byte claims 200 bytes; a genuine frame follows within them.
    head = SYNC + struct.pack(">BH", 0x01, 200)
    head += bytes([crc8(head)])
    good = encode_frame(9, b"inside")
    decoder = FrameDecoder()
    assert frames_of(decoder.feed(head + good, now=0.0)) == []
    out = decoder.expire(1.0)
    assert frames_of(out) == [Frame(9, b"inside")]


def test_random_noise_fuzz_never_raises_and_never_exceeds_the_buffer_bound() -> None:
    rng = random.Random(20240607)
    decoder = FrameDecoder(max_payload=2048)
    good = [encode_frame(rng.randrange(256), rng.randbytes(rng.randrange(0, 300))) for _ in range(20)]
    sent = recovered = 0
    now = 0.0
    for _ in range(3000):
        choice = rng.random()
        if choice < 0.4:
            chunk = rng.randbytes(rng.randrange(1, 400))
        elif choice < 0.55:
            # Noise dense in sync bytes and plausible headers: the hard case for a resynchroniser.
            chunk = b"".join(rng.choice([SYNC, b"\xb1", b"\xd5", rng.randbytes(3)]) for _ in range(50))
        elif choice < 0.7:
            frame = bytearray(rng.choice(good))
            frame[rng.randrange(len(frame))] ^= 1 << rng.randrange(8)
            chunk = bytes(frame[: rng.randrange(1, len(frame) + 1)])
        else:
            chunk = rng.choice(good)
            sent += 1
        now += rng.random() * 0.3
        try:
            out = decoder.feed(chunk, now=now) + decoder.expire(now)
        except StationError:
            continue
        assert decoder.buffered <= decoder.capacity
        recovered += sum(1 for f in frames_of(out) if encode_frame(f.type, f.payload) in good)
    # Good frames can be swallowed by a preceding partial frame, but most must come through.
    assert recovered >= sent * 0.8


def test_one_huge_feed_is_processed_within_the_bound() -> None:
    decoder = FrameDecoder(max_payload=512)
    blob = bytes(random.Random(1).randbytes(200_000)) + encode_frame(1, b"end")
    out = decoder.feed(blob)
    assert Frame(1, b"end") in frames_of(out)
    assert decoder.buffered <= decoder.capacity
