"""Frames on the wire: encoding, and a resynchronising decoder for noisy serial lines. Pure: no I/O, no clock.

Layout (big-endian)::

    SYNC 0xB1 0xD5 | TYPE u8 | LEN u16 | HCRC u8 | PAYLOAD (LEN bytes) | CRC32 u32

HCRC is CRC-8 (poly 0x07) over the first five header bytes. It exists so that noise in LEN is caught before
the decoder commits to waiting for LEN bytes: without it a corrupted length would swallow the good frames
behind it until the timeout. CRC32 (zlib/IEEE) covers header and payload; the session's MAC, not the CRC, is
what protects against deliberate changes.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass

SYNC = b"\xb1\xd5"
HEADER_LEN = 6
TRAILER_LEN = 4
FRAME_OVERHEAD = HEADER_LEN + TRAILER_LEN
MAX_PAYLOAD = 16 * 1024
DEFAULT_FRAME_TIMEOUT = 0.5  # seconds of silence that end a partial frame

SEALED_BIT = 0x80

_HEADER = struct.Struct(">2sBHB")


def _crc8_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = ((crc << 1) ^ 0x07) & 0xFF if crc & 0x80 else (crc << 1) & 0xFF
        table.append(crc)
    return tuple(table)


_CRC8 = _crc8_table()


def crc8(data: bytes | bytearray | memoryview) -> int:
    """CRC-8/SMBUS: poly 0x07, init 0x00, no reflection, no final xor (check value 0xF4)."""
    crc = 0
    for byte in bytes(data):
        crc = _CRC8[crc ^ byte]
    return crc


def crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32/ISO-HDLC as in zlib and Ethernet (check value 0xCBF43926)."""
    return zlib.crc32(data) & 0xFFFFFFFF


@dataclass(frozen=True)
class Frame:
    """One frame that passed both CRCs. ``type`` is the raw type byte, sealed bit included."""

    type: int
    payload: bytes

    @property
    def sealed(self) -> bool:
        return bool(self.type & SEALED_BIT)

    @property
    def kind(self) -> int:
        return self.type & ~SEALED_BIT & 0xFF


class DecodeEventKind(enum.Enum):
    GARBAGE = "garbage"  # bytes skipped while looking for SYNC
    BAD_HEADER = "bad_header"  # SYNC found but HCRC wrong
    OVERSIZE = "oversize"  # header valid but LEN above the maximum: refused before any payload is buffered
    BAD_CRC = "bad_crc"  # whole frame arrived but CRC32 wrong
    TIMEOUT = "timeout"  # partial frame followed by silence


@dataclass(frozen=True)
class DecodeEvent:
    """Something the decoder threw away, reported so the transport can count it (and alarm on a bad cable)."""

    kind: DecodeEventKind
    dropped: int  # bytes discarded by this event; summed over all events it is every byte lost
    detail: str = ""


def encode_frame(frame_type: int, payload: bytes, *, max_payload: int = MAX_PAYLOAD) -> bytes:
    """Build the wire bytes of one frame."""
    if not 0 <= frame_type <= 0xFF:
        raise ValueError(f"frame type {frame_type} is not a byte")
    if len(payload) > max_payload:
        raise ValueError(f"payload of {len(payload)} bytes exceeds the {max_payload}-byte maximum")
    head = SYNC + struct.pack(">BH", frame_type, len(payload))
    head += bytes([crc8(head)])
    body = head + payload
    return body + struct.pack(">I", crc32(body))


def frame_bytes(frame: Frame) -> bytes:
    return encode_frame(frame.type, frame.payload)


class FrameDecoder:
    """Turns a byte stream into frames, skipping noise and resynchronising on the next SYNC.

    The buffer never holds more than one maximum-size frame: input is taken in slices no larger than the free
    room, and a full buffer always contains either a complete frame or something to discard. After any
    rejection the decoder drops only the first byte of the false start and rescans, so a genuine frame that
    began inside the rejected bytes is still found.

    Time is passed in by the caller (monotonic seconds). ``feed(data, now)`` stamps the last byte seen;
    ``expire(now)`` drops a partial frame once ``frame_timeout`` seconds have passed without a byte. If
    ``feed`` gets no ``now``, the first ``expire`` call that sees the partial frame starts its clock.
    """

    def __init__(
        self, *, max_payload: int = MAX_PAYLOAD, frame_timeout: float = DEFAULT_FRAME_TIMEOUT
    ) -> None:
        if not 0 <= max_payload <= 0xFFFF:
            raise ValueError("max_payload must fit the u16 length field")
        self.max_payload = max_payload
        self.frame_timeout = frame_timeout
        self.capacity = HEADER_LEN + max_payload + TRAILER_LEN
        self._buf = bytearray()
        self._last_byte_at: float | None = None
        self._garbage = 0

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes, now: float | None = None) -> list[Frame | DecodeEvent]:
        out: list[Frame | DecodeEvent] = []
        view = memoryview(data)
        pos = 0
        while pos < len(view):
            take = min(self.capacity - len(self._buf), len(view) - pos)
            self._buf += view[pos : pos + take]
            pos += take
            self._scan(out)
        self._last_byte_at = now if data else self._last_byte_at
        self._flush_garbage(out)
        return out

    def expire(self, now: float) -> list[Frame | DecodeEvent]:
        """Drop a partial frame that waited ``frame_timeout`` for its next byte; rescan what followed it."""
        out: list[Frame | DecodeEvent] = []
        if not self._in_frame():
            return out
        if self._last_byte_at is None:
            self._last_byte_at = now
            return out
        if now - self._last_byte_at < self.frame_timeout:
            return out
        # Only the false start is certainly bad; later bytes may hold a real frame whose SYNC sat inside. Any
        # partial frame left after the rescan has seen the same silence, so it goes too.
        while self._in_frame():
            partial = len(self._buf)
            self._reject(out, DecodeEventKind.TIMEOUT, 1, f"partial frame of {partial} bytes, then silence")
            self._scan(out)
        self._flush_garbage(out)
        return out

    def reset(self) -> None:
        self._buf.clear()
        self._last_byte_at = None
        self._garbage = 0

    def _in_frame(self) -> bool:
        return len(self._buf) >= len(SYNC) and self._buf.startswith(SYNC)

    def _flush_garbage(self, out: list[Frame | DecodeEvent]) -> None:
        if self._garbage:
            out.append(DecodeEvent(DecodeEventKind.GARBAGE, self._garbage))
            self._garbage = 0

    def _reject(
        self, out: list[Frame | DecodeEvent], kind: DecodeEventKind, dropped: int, detail: str
    ) -> None:
        self._flush_garbage(out)
        out.append(DecodeEvent(kind, dropped, detail))
        del self._buf[:1]

    def _scan(self, out: list[Frame | DecodeEvent]) -> None:
        buf = self._buf
        while buf:
            start = buf.find(SYNC)
            if start < 0:
                # A trailing first SYNC byte may be completed by the next read.
                keep = 1 if buf[-1] == SYNC[0] else 0
                self._garbage += len(buf) - keep
                del buf[: len(buf) - keep]
                return
            if start:
                self._garbage += start
                del buf[:start]
            if len(buf) < HEADER_LEN:
                return
            _sync, _ftype, length, hcrc = _HEADER.unpack_from(buf)
            if crc8(memoryview(buf)[: HEADER_LEN - 1]) != hcrc:
                self._reject(out, DecodeEventKind.BAD_HEADER, 1, "header check byte mismatch")
                continue
            if length > self.max_payload:
                self._reject(out, DecodeEventKind.OVERSIZE, 1, f"length {length} > {self.max_payload}")
                continue
            total = HEADER_LEN + length + TRAILER_LEN
            if len(buf) < total:
                return
            (received_crc,) = struct.unpack_from(">I", buf, total - TRAILER_LEN)
            if crc32(memoryview(buf)[: total - TRAILER_LEN]) != received_crc:
                self._reject(out, DecodeEventKind.BAD_CRC, 1, f"CRC-32 mismatch on a {total}-byte frame")
                continue
            self._flush_garbage(out)
            out.append(Frame(buf[2], bytes(buf[HEADER_LEN : total - TRAILER_LEN])))
            del buf[:total]
