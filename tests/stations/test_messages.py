"""Every message round-trips; every length and bound is checked on decode with the right code."""

from __future__ import annotations

import struct

import pytest

from stations.codes import Code
from stations.errors import MessageError, StationError
from stations.messages import (
    MAX_CHAIN_CERTS,
    MAX_CSR,
    MAX_TEXT,
    MESSAGE_TYPES,
    NO_REQUEST,
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

RID = bytes(range(1, 17))

SAMPLES: list[Message] = [
    Hello("line1-st03", (1, 2), bytes(32)),
    Challenge(1, bytes(range(32))),
    Auth(b"\x11" * 32),
    AuthOk(b"\x22" * 32),
    GetCaChain(),
    GetCaChain("idevid-p256"),
    CaChain((b"\x30\x01a", b"\x30\x01b")),
    Enroll(RID, "SN-0001 (rev B)", b"\x30" * 500),
    Enroll(RID, "X", b"\x30", profile="idevid-rsa"),
    Cert(RID, (b"\x30" * 700, b"\x30" * 450, b"\x30" * 350)),
    Confirm(RID, b"\xaa" * 32),
    Confirmed(RID),
    Pending(RID, 1500),
    Error(Code.QUOTA_EXHAUSTED, "work order WO-17 has no units left", RID),
    Error(Code.AUTH_FAILED),
    Ping(7),
    Pong(0xFFFFFFFF),
    Bye(),
    Bye(Code.BUSY),
]


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(message: Message) -> None:
    body = message.encode()
    assert decode_message(message.TYPE, body) == message
    assert type(message).decode(body).encode() == body


def test_every_type_has_a_sample_and_unique_number() -> None:
    assert {type(m) for m in SAMPLES} == set(MESSAGE_TYPES.values())
    assert all(0 < t < 0x80 for t in MESSAGE_TYPES)


@pytest.mark.parametrize("message", SAMPLES, ids=lambda m: type(m).__name__)
def test_truncation_and_trailing_bytes_are_rejected(message: Message) -> None:
    body = message.encode()
    for cut in range(len(body)):
        prefix = body[:cut]
        try:
            decoded = decode_message(message.TYPE, prefix)
        except MessageError:
            continue
        # Only a message that ends in an open-ended field (ENROLL's CSR) may decode from a prefix, and then
        # it must describe exactly the bytes it came from.
        assert isinstance(decoded, Enroll)
        assert decoded.encode() == prefix
    if not isinstance(message, Enroll):
        with pytest.raises(MessageError) as info:
            decode_message(message.TYPE, body + b"\x00")
        assert info.value.code is Code.BAD_FRAME


def test_unknown_type() -> None:
    with pytest.raises(MessageError) as info:
        decode_message(0x7E, b"")
    assert info.value.code is Code.BAD_FRAME


def _enroll_body(serial: bytes, profile: bytes = b"", csr: bytes = b"\x30", rid: bytes = RID) -> bytes:
    return rid + bytes([len(serial)]) + serial + bytes([len(profile)]) + profile + csr


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (_enroll_body(b"SN\x00"), Code.BAD_DEVICE_SERIAL),
        (_enroll_body(b"SN%s\x1b[2J"), Code.BAD_DEVICE_SERIAL),
        (_enroll_body(b""), Code.BAD_DEVICE_SERIAL),
        (_enroll_body(b"A" * 65), Code.BAD_DEVICE_SERIAL),
        (_enroll_body(b"SN1", csr=b""), Code.BAD_CSR),
        (_enroll_body(b"SN1", csr=bytes(MAX_CSR + 1)), Code.BAD_CSR),
        (_enroll_body(b"SN1", profile=b"../etc"), Code.BAD_REQUEST),
        (_enroll_body(b"SN1", rid=NO_REQUEST), Code.BAD_REQUEST),
        (RID + b"\x40SN1", Code.BAD_FRAME),  # serial length beyond the body
    ],
)
def test_enroll_field_checks_carry_the_refusal_code(body: bytes, code: Code) -> None:
    with pytest.raises(MessageError) as info:
        Enroll.decode(body)
    assert info.value.code is code


def test_chain_bounds() -> None:
    one = struct.pack(">H", 2) + b"\x30\x00"
    for count in (0, MAX_CHAIN_CERTS + 1):
        with pytest.raises(MessageError, match="certificate count"):
            CaChain.decode(bytes([count]) + one * count)
    with pytest.raises(MessageError, match="length 0"):
        CaChain.decode(b"\x01\x00\x00")
    with pytest.raises(MessageError, match="not in 1-8192"):
        CaChain.decode(b"\x01\xff\xff\x30")
    with pytest.raises(MessageError, match="needs 100 bytes"):
        CaChain.decode(b"\x01\x00\x64\x30")
    with pytest.raises(MessageError):
        Cert(RID, ()).encode()
    with pytest.raises(MessageError):
        Cert(RID, (b"",)).encode()


def test_hello_bounds() -> None:
    with pytest.raises(MessageError, match="version count"):
        Hello.decode(b"\x00\x0aline1-st03" + bytes(32))
    with pytest.raises(MessageError, match="station id"):
        Hello.decode(b"\x01\x01\x03a b" + bytes(32))
    with pytest.raises(MessageError, match="version 0"):
        Hello.decode(b"\x01\x00\x01a" + bytes(32))
    with pytest.raises(MessageError):
        Hello("ok", (1,), bytes(31)).encode()


def test_error_text_is_bounded_utf8() -> None:
    long = Error(Code.INTERNAL, "é" * 300)
    decoded = Error.decode(long.encode())
    assert len(decoded.text.encode()) <= MAX_TEXT
    assert decoded.text == "é" * (MAX_TEXT // 2)
    with pytest.raises(MessageError, match="UTF-8"):
        Error.decode(NO_REQUEST + b"\x00\x01\x02\xc3\x28")
    assert Error.decode(NO_REQUEST + b"\x12\x34\x00").code == 0x1234


def test_errors_share_the_package_root() -> None:
    with pytest.raises(StationError):
        Confirm(RID, b"short").encode()
    with pytest.raises(MessageError):
        Pending(RID, -1).encode()


def test_chain_total_is_bounded_on_decode() -> None:
    cert = b"\x30" * 8000
    body = b"\x02" + (struct.pack(">H", len(cert)) + cert) * 2
    with pytest.raises(MessageError, match="chain of 16000 bytes"):
        CaChain.decode(body)
