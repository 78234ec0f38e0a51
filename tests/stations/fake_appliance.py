"""An appliance loop for transport and client tests (tests only: the real station server is stations.server).

It runs the real ``ApplianceSession`` over any FrameChannel but answers requests from a fixed CA chain and an
injectable ``issue`` callable instead of the issuance core, so fixture software (and the transports) can be
exercised without an appliance. It is NOT the station server: no audit, no journal, no rate limits.
Idempotency is kept the way the protocol asks (same request id, same answer).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

from stations.codec import DecodeEvent
from stations.codes import Code
from stations.messages import (
    NO_REQUEST,
    CaChain,
    Cert,
    Confirm,
    Confirmed,
    Enroll,
    Error,
    GetCaChain,
    Message,
    Pending,
)
from stations.session import ApplianceSession, Received
from stations.transports.base import ChannelClosed, FrameChannel

IssueFn = Callable[[Enroll], bytes]  # returns the device certificate DER


def _placeholder_cert(enroll: Enroll) -> bytes:
    body = hashlib.sha256(enroll.request_id + enroll.csr).digest() + enroll.device_serial.encode()
    return b"\x30" + bytes([len(body)]) + body


@dataclass
class FakeAppliance:
    """``keys`` maps station id to its 32-byte key; ``chain`` is issuing CA first, root last.

    Test knobs: ``drop_after_enroll`` closes the connection (without answering) on the first N ENROLL frames
    received; ``pending_first`` answers the first ENROLL of each request id with PENDING(``pending_ms``)."""

    keys: dict[str, bytes]
    chain: tuple[bytes, ...]
    issue: IssueFn = _placeholder_cert
    drop_after_enroll: int = 0
    pending_first: bool = False
    pending_ms: int = 50
    issued: dict[bytes, tuple[Enroll, tuple[bytes, ...]]] = field(default_factory=dict)
    confirmed: set[bytes] = field(default_factory=set)
    enroll_frames: int = 0
    decode_events: list[DecodeEvent] = field(default_factory=list)
    _pended: set[bytes] = field(default_factory=set)

    async def serve(self, channel: FrameChannel) -> None:
        """Serve one connection until the peer goes away (or a drop is injected). Never raises ChannelClosed."""
        session = ApplianceSession(self.keys.get)
        try:
            while True:
                item = await channel.recv()
                if isinstance(item, DecodeEvent):
                    self.decode_events.append(item)
                    continue
                step = session.receive(item)
                for wire in step.send:
                    await channel.send(wire)
                for event in step.events:
                    if not isinstance(event, Received):
                        continue
                    if isinstance(event.message, Enroll):
                        self.enroll_frames += 1
                        if self.drop_after_enroll > 0:
                            self.drop_after_enroll -= 1
                            return
                    reply = self.answer(event.message)
                    if reply is not None:
                        await channel.send(session.send(reply))
        except ChannelClosed:
            return
        finally:
            await channel.close()

    def answer(self, message: Message) -> Message | None:
        if isinstance(message, GetCaChain):
            return CaChain(self.chain)
        if isinstance(message, Enroll):
            return self._enroll(message)
        if isinstance(message, Confirm):
            stored = self.issued.get(message.request_id)
            if stored is None:
                return Error(Code.UNKNOWN_REQUEST, "request id not issued", message.request_id)
            if hashlib.sha256(stored[1][0]).digest() != message.cert_sha256:
                return Error(
                    Code.CONFIRM_MISMATCH, "hash differs from the issued certificate", message.request_id
                )
            self.confirmed.add(message.request_id)
            return Confirmed(message.request_id)
        return None

    def _enroll(self, enroll: Enroll) -> Message:
        stored = self.issued.get(enroll.request_id)
        if stored is not None:
            if (stored[0].device_serial, stored[0].csr) != (enroll.device_serial, enroll.csr):
                return Error(Code.BAD_REQUEST, "request id reused for another request", enroll.request_id)
            return Cert(enroll.request_id, stored[1])
        if self.pending_first and enroll.request_id not in self._pended:
            self._pended.add(enroll.request_id)
            return Pending(enroll.request_id, self.pending_ms)
        try:
            cert = self.issue(enroll)
        except Exception as exc:  # noqa: BLE001 - a fake: any failure becomes a refusal on the wire
            return Error(Code.INTERNAL, str(exc), enroll.request_id or NO_REQUEST)
        chain = (cert, *self.chain[:-1]) if len(self.chain) > 1 else (cert, *self.chain)
        self.issued[enroll.request_id] = (enroll, chain)
        return Cert(enroll.request_id, chain)
