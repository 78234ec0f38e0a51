"""Both state machines against each other in memory: handshake, requests, and every way a frame is refused."""

from __future__ import annotations

import hashlib
import os
import random

import pytest

from stations import crypto
from stations.codec import Frame, FrameDecoder, encode_frame
from stations.codes import Code
from stations.errors import SessionError, StationError
from stations.messages import (
    CaChain,
    Cert,
    Challenge,
    Confirm,
    Confirmed,
    Enroll,
    Error,
    GetCaChain,
    Hello,
    Ping,
    Pong,
    decode_message,
)
from stations.session import (
    ApplianceSession,
    Authenticated,
    Closed,
    HandshakeFailed,
    Received,
    Rejected,
    StationSession,
    plain_frame,
)
from tests.stations.vectors import Link, overhead_figures

KEY = bytes(range(32))
RID = bytes(range(100, 116))


def lookup(station_id: str) -> bytes | None:
    if station_id == "disabled-1":
        raise StationError(Code.STATION_DISABLED, "station disabled by the supervisor")
    return KEY if station_id in {"line1-st03", "disabled-1"} else None


def frame(wire: bytes) -> Frame:
    [item] = FrameDecoder().feed(wire)
    assert isinstance(item, Frame)
    return item


def reframe(wire: bytes, payload: bytes, frame_type: int | None = None) -> Frame:
    """The same frame with a changed payload and a valid CRC: a tamperer, not noise."""
    original = frame(wire)
    return frame(encode_frame(original.type if frame_type is None else frame_type, payload))


def connected(station_key: bytes = KEY, station_id: str = "line1-st03") -> Link:
    link = Link(StationSession(station_id, station_key), ApplianceSession(lookup))
    link.station_sends(link.station.hello())
    return link


def test_full_exchange_in_memory() -> None:
    link = connected()
    assert link.station.established and link.appliance.established
    assert Authenticated("line1-st03", 1) in link.station_events
    assert Authenticated("line1-st03", 1) in link.appliance_events
    assert link.appliance.station_id == "line1-st03"

    [req] = link.station_sends(link.station.send(GetCaChain()))
    assert req == GetCaChain()
    link.appliance_sends(link.appliance.send(CaChain((b"\x30\x00",))))
    enroll = Enroll(RID, "SN42", b"\x30\x82" + bytes(498))
    assert link.station_sends(link.station.send(enroll)) == [enroll]
    chain = (b"\x30\x01d", b"\x30\x01i")
    link.appliance_sends(link.appliance.send(Cert(RID, chain)))
    confirm = Confirm(RID, hashlib.sha256(chain[0]).digest())
    assert link.station_sends(link.station.send(confirm)) == [confirm]
    link.appliance_sends(link.appliance.send(Confirmed(RID)))
    received = [e.message for e in link.station_events if isinstance(e, Received)]
    assert received == [CaChain((b"\x30\x00",)), Cert(RID, chain), Confirmed(RID)]

    link.station_sends(link.station.close())
    assert not link.appliance.established and not link.station.established
    assert Closed(Code.OK, "station said BYE", bye=True) in link.appliance_events


def test_wrong_key_fails_authentication_on_both_sides() -> None:
    link = connected(station_key=bytes(32))
    assert not link.appliance.established and not link.station.established
    [failed] = [e for e in link.appliance_events if isinstance(e, HandshakeFailed)]
    assert failed.code is Code.AUTH_FAILED and failed.station_id == "line1-st03"
    assert any(isinstance(e, HandshakeFailed) and e.code == Code.AUTH_FAILED for e in link.station_events)


def test_impostor_appliance_is_detected_by_the_station() -> None:
    station = StationSession("line1-st03", KEY)
    # The impostor does not hold the station's key, so the best it can send is an AUTH_OK it made up.
    hello = frame(station.hello())
    impostor = ApplianceSession(lambda _sid: os.urandom(32))
    [challenge] = impostor.receive(hello).send
    [auth] = station.receive(frame(challenge)).send
    fake = encode_frame(0x04, hashlib.sha256(auth).digest())
    step = station.receive(frame(fake))
    assert not station.established
    assert [type(e) for e in step.events] == [HandshakeFailed]


def test_unknown_and_disabled_stations_are_refused_before_any_challenge() -> None:
    for station_id, code in (("nobody", Code.UNKNOWN_STATION), ("disabled-1", Code.STATION_DISABLED)):
        link = connected(station_id=station_id)
        assert [name for name, _ in link.log] == ["S->A", "A->S"]
        reply = decode_message(0x20, frame(link.log[1][1]).payload)
        assert isinstance(reply, Error) and reply.code is code
        assert HandshakeFailed(code, reply.text, station_id) in link.station_events


def test_no_common_version() -> None:
    link = Link(StationSession("line1-st03", KEY, versions=(7, 9)), ApplianceSession(lookup))
    link.station_sends(link.station.hello())
    assert any(
        isinstance(e, HandshakeFailed) and e.code is Code.UNSUPPORTED_VERSION for e in link.station_events
    )


def test_highest_common_version_is_chosen_and_checked_by_the_station() -> None:
    appliance = ApplianceSession(lookup, versions=(1, 2))
    station = StationSession("line1-st03", KEY, versions=(1, 2, 3))
    [challenge] = appliance.receive(frame(station.hello())).send
    assert decode_message(0x02, frame(challenge).payload) == Challenge(2, frame(challenge).payload[1:])
    rogue = StationSession("line1-st03", KEY, versions=(1,))
    rogue.hello()
    step = rogue.receive(frame(challenge))
    assert step.events[0] == HandshakeFailed(
        Code.UNSUPPORTED_VERSION, "appliance chose version 2, not offered", "line1-st03"
    )


def _enroll_wire(link: Link) -> bytes:
    return link.station.send(Enroll(RID, "SN42", b"\x30\x00"))


def _refusal(step_send: tuple[bytes, ...]) -> Error:
    [wire] = step_send
    f = frame(wire)
    message = decode_message(f.kind, f.payload[4:-12] if f.sealed else f.payload)
    assert isinstance(message, Error)
    return message


def test_replayed_frame_is_rejected() -> None:
    link = connected()
    wire = _enroll_wire(link)
    first = link.appliance.receive(frame(wire))
    assert isinstance(first.events[0], Received)
    again = link.appliance.receive(frame(wire))
    assert again.events == (Rejected(Code.REPLAY, "counter 1 not above 1"),)
    assert _refusal(again.send).code is Code.REPLAY


def test_reordered_frames_are_rejected() -> None:
    link = connected()
    early, late = _enroll_wire(link), _enroll_wire(link)
    assert isinstance(link.appliance.receive(frame(late)).events[0], Received)
    step = link.appliance.receive(frame(early))
    assert step.events[0] == Rejected(Code.REPLAY, "counter 1 not above 2")


def test_gaps_in_the_counter_are_allowed_because_frames_get_lost() -> None:
    link = connected()
    _enroll_wire(link)  # lost on the line
    assert isinstance(link.appliance.receive(frame(_enroll_wire(link))).events[0], Received)


def test_tampered_payload_header_and_counter_are_rejected() -> None:
    link = connected()
    wire = _enroll_wire(link)
    payload = frame(wire).payload
    flipped = bytearray(payload)
    flipped[20] ^= 0x01
    for forged in (
        reframe(wire, bytes(flipped)),
        reframe(wire, payload, frame_type=0x94),  # ENROLL relabelled as CONFIRM
        reframe(wire, b"\x00\x00\x00\x09" + payload[4:]),  # counter pushed forward
        reframe(wire, payload[:-1]),  # truncated tag
    ):
        step = link.appliance.receive(forged)
        assert step.events[0] == Rejected(Code.BAD_TAG, "frame tag does not verify")
    # The genuine frame still goes through: forgeries did not move the counter.
    assert isinstance(link.appliance.receive(frame(wire)).events[0], Received)


def test_a_frame_reflected_back_to_its_sender_is_rejected() -> None:
    link = connected()
    step = link.station.receive(frame(link.station.send(Ping(1))))
    assert step.events == (Rejected(Code.BAD_TAG, "frame tag does not verify"),)


def test_sealed_frame_without_session_gets_no_session() -> None:
    link = connected()
    wire = _enroll_wire(link)
    fresh = ApplianceSession(lookup)  # the appliance restarted
    step = fresh.receive(frame(wire))
    assert _refusal(step.send).code is Code.NO_SESSION
    # The station learns it must start over; nothing about the request is decided by that plain ERROR.
    station_step = link.station.receive(frame(step.send[0]))
    assert isinstance(station_step.events[0], Closed) and not link.station.established


def test_plain_requests_after_authentication_are_refused() -> None:
    link = connected()
    step = link.appliance.receive(frame(encode_frame(0x12, Enroll(RID, "SN1", b"\x30").encode())))
    assert _refusal(step.send).code is Code.UNEXPECTED_MESSAGE
    assert link.appliance.established


def test_malformed_authentic_enroll_is_refused_with_its_request_id() -> None:
    link = connected()
    sneaky = Enroll(RID, "SN1", b"\x30")
    body = RID + b"\x03S\x00N\x00\x30"  # NUL in the device serial
    wire = link.station.send(sneaky)
    f = frame(wire)
    keys_channel = link.station._channel
    assert keys_channel is not None
    length = 4 + len(body) + crypto.TAG_LEN
    tag = crypto.frame_tag(
        keys_channel._key,
        body,
        direction=crypto.STATION_TO_APPLIANCE,
        counter=9,
        frame_type=f.type,
        length=length,
    )
    step = link.appliance.receive(frame(encode_frame(f.type, b"\x00\x00\x00\x09" + body + tag)))
    refusal = _refusal(step.send)
    assert refusal.code is Code.BAD_DEVICE_SERIAL and refusal.request_id == RID


def test_handshake_retransmissions_get_identical_answers() -> None:
    station, appliance = StationSession("line1-st03", KEY), ApplianceSession(lookup)
    hello = station.hello()
    [challenge] = appliance.receive(frame(hello)).send
    assert station.resend() == hello
    assert appliance.receive(frame(hello)).send == (challenge,)
    [auth] = station.receive(frame(challenge)).send
    assert station.receive(frame(challenge)).send == ()  # duplicate CHALLENGE: AUTH already sent
    assert station.resend() == auth
    step = appliance.receive(frame(auth))
    [auth_ok] = step.send
    assert isinstance(step.events[0], Authenticated)
    again = appliance.receive(frame(auth))
    assert again.send == (auth_ok,) and again.events == ()
    assert isinstance(station.receive(frame(auth_ok)).events[0], Authenticated)
    assert station.receive(frame(auth_ok)).events == ()
    assert station.resend() is None


def test_replayed_hello_does_not_disturb_an_established_session() -> None:
    link = connected()
    hello = link.log[0][1]
    step = link.appliance.receive(frame(hello))
    assert step.events == (Rejected(Code.REPLAY, "HELLO of the current session seen again"),)
    assert link.appliance.established


def test_new_hello_replaces_the_session() -> None:
    link = connected()
    link.station_sends(link.station.hello())
    assert Closed(Code.OK, "station started a new handshake") in link.appliance_events
    assert link.station.established and link.appliance.established
    assert link.station_sends(link.station.send(GetCaChain())) == [GetCaChain()]


def test_ping_is_answered_in_both_directions() -> None:
    link = connected()
    link.station_sends(link.station.send(Ping(5)))
    assert Received(Pong(5)) in link.station_events
    link.appliance_sends(link.appliance.send(Ping(6)))
    assert Received(Pong(6)) in link.appliance_events


def test_appliance_bye_closes_the_station() -> None:
    link = connected()
    link.appliance_sends(link.appliance.close(Code.BUSY))
    assert Closed(Code.BUSY, "appliance said BYE", bye=True) in link.station_events
    assert not link.station.established


def test_plain_timeout_is_stale_while_waiting_for_challenge_and_final_while_waiting_for_auth_ok() -> None:
    """The appliance sends a plain TIMEOUT when it gives up on a handshake it has CHALLENGEd, never as the
    answer to a HELLO. On an ordered line, one that reaches a station still waiting for its CHALLENGE left the
    appliance before that HELLO arrived: it ended an earlier handshake and must not end this one."""
    timeout = plain_frame(Error(Code.TIMEOUT, "handshake not completed in time"))
    station, appliance = StationSession("line1-st03", KEY), ApplianceSession(lookup)
    [challenge] = appliance.receive(frame(station.hello())).send
    step = station.receive(frame(timeout))
    assert not any(isinstance(e, HandshakeFailed) for e in step.events)
    [auth] = station.receive(frame(challenge)).send  # the handshake goes on
    step = station.receive(frame(timeout))  # now it is about this handshake: the appliance gave up on it
    assert step.events == (HandshakeFailed(Code.TIMEOUT, "handshake not completed in time", "line1-st03"),)
    assert station.resend() is None and auth


def test_sending_before_authentication_is_local_misuse() -> None:
    with pytest.raises(SessionError):
        StationSession("line1-st03", KEY).send(GetCaChain())
    with pytest.raises(SessionError):
        ApplianceSession(lookup).send(Confirmed(RID))
    with pytest.raises(SessionError):
        StationSession("line1-st03", b"short")


def test_counter_exhaustion_forces_a_new_session() -> None:
    link = connected()
    assert link.station._channel is not None
    link.station._channel.sent = 0xFFFFFFFF
    with pytest.raises(SessionError):
        link.station.send(Ping(1))


def test_garbage_frames_never_raise_from_receive() -> None:
    rng = random.Random(7)
    link = connected()
    for _ in range(500):
        t = rng.choice([0x01, 0x03, 0x12, 0x92, 0x94, 0xA3, 0x7F, 0xFF, 0x04, 0x20])
        f = Frame(t, rng.randbytes(rng.randrange(0, 80)))
        for step in (link.appliance.receive(f), link.station.receive(f)):
            assert all(not isinstance(e, Received) for e in step.events)


def test_enrolment_overhead_is_at_most_five_percent() -> None:
    figures = overhead_figures(csr_len=500, chain=(700, 450, 350))
    assert figures["enrol_overhead_ratio"] <= 0.05
    # The exact wire sizes follow from the layout in the spec.
    assert figures["enroll_frame"] == 10 + 16 + 16 + 1 + 16 + 1 + 500
    assert figures["cert_frame"] == 10 + 16 + 16 + 1 + 3 * 2 + 1500


def test_hello_layout_matches_the_spec() -> None:
    body = Hello("st", (1,), bytes(32)).encode()
    assert body == b"\x01\x01\x02st" + bytes(32)


def test_reset_forgets_a_half_open_handshake() -> None:
    station, appliance = StationSession("line1-st03", KEY), ApplianceSession(lookup)
    [challenge] = appliance.receive(frame(station.hello())).send
    [auth] = station.receive(frame(challenge)).send
    appliance.reset()  # the server's 10 s handshake timer fired
    step = appliance.receive(frame(auth))
    assert step.events[0].code is Code.UNEXPECTED_MESSAGE  # type: ignore[union-attr]
    assert HandshakeFailed(Code.UNEXPECTED_MESSAGE, "AUTH without a pending CHALLENGE", "line1-st03") in (
        station.receive(frame(step.send[0])).events
    )
