"""Request ids as the fixture library and the appliance make them: UUIDv7 (RFC 9562 5.7), so the journal's
per-station request-id index grows at its end (docs/performance.md "Ten years of journal")."""

from __future__ import annotations

import uuid

from appliance.issuance.requestids import new_request_id as appliance_request_id
from stations.client import new_request_id
from stations.messages import NO_REQUEST, REQUEST_ID_LEN


def test_a_station_request_id_is_a_uuid7_with_the_time_first() -> None:
    rid = new_request_id(now_ms=0x0123_4567_89AB)
    assert len(rid) == REQUEST_ID_LEN and rid != NO_REQUEST
    u = uuid.UUID(bytes=rid)
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert rid[:6] == bytes.fromhex("0123456789ab")
    assert new_request_id(now_ms=0) != NO_REQUEST  # the version bits alone make it non-zero


def test_later_ids_sort_after_earlier_ones_and_the_rest_is_random() -> None:
    ids = [new_request_id(now_ms=ms) for ms in (1_000, 1_001, 1_002, 5_000, 1 << 47)]
    assert ids == sorted(ids)
    same_ms = {new_request_id(now_ms=42) for _ in range(2_000)}
    assert len(same_ms) == 2_000  # 74 random bits: unique within a millisecond
    # Every random bit position varies (none stuck at a constant by a wrong mask or shift).
    varying = 0
    for a in same_ms:
        varying |= int.from_bytes(a, "big") ^ int.from_bytes(next(iter(same_ms)), "big")
    random_mask = ((1 << 12) - 1) << 64 | ((1 << 62) - 1)
    assert varying == random_mask


def test_the_appliance_makes_the_same_layout_in_hex() -> None:
    made = appliance_request_id(now_ms=0x0123_4567_89AB)
    u = uuid.UUID(hex=made)
    assert u.version == 7 and u.variant == uuid.RFC_4122 and made == u.hex and made.startswith("0123456789ab")
    ids = [appliance_request_id(now_ms=ms) for ms in (7, 8, 9, 1 << 40)]
    assert ids == sorted(ids) and len({appliance_request_id(now_ms=7) for _ in range(1000)}) == 1000
