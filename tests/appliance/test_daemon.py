"""The daemon end to end: real SoftHSM token, real journal, real TLS on 127.0.0.1, the station protocol."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
import shutil
import ssl
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import ca as ca_mod
from appliance import daemon_enroller
from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.config import (
    ApplianceSection,
    Config,
    IssuanceSection,
    JournalSection,
    StationsSection,
    VaSection,
)
from appliance.daemon import Daemon
from appliance.issuance.journal import Journal
from appliance.profiles import builtin_profiles
from hsm.softhsm import SoftHsmToken
from stations.codec import SYNC, Frame, crc8
from stations.codes import Code
from stations.messages import (
    CaChain,
    Cert,
    Challenge,
    Confirm,
    Confirmed,
    Enroll,
    Error,
    GetCaChain,
    Message,
    Ping,
    Pong,
    decode_message,
)
from stations.session import Authenticated, Closed, HandshakeFailed, Received
from stations.transports.base import ChannelClosed
from stations.transports.stream import StreamChannel
from tests.appliance.conftest import make_csr, put_on_line
from tests.stations.station_link import Link, request_id, tls_client_context


def _config(state: Path, softhsm_token: SoftHsmToken, template: Path) -> Config:
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    shutil.copy(template, state / "journal.sqlite")
    return Config(
        appliance=ApplianceSection(state),
        hsm=softhsm_token.hsm_config(),
        journal=JournalSection(state / "journal.sqlite"),
        issuance=IssuanceSection(),
        stations=StationsSection(
            lan_listen="127.0.0.1:0",
            tls_dir=state / "tls",
            handshake_timeout_s=0.5,
            idle_timeout_s=5.0,
            frame_timeout_s=0.1,
            reopen_interval_s=0.05,
            registry_poll_s=0.1,
        ),
        va=VaSection(listen="127.0.0.1:0"),
        profiles={"idevid": builtin_profiles()["idevid"]},
    )


@pytest.fixture
async def daemon(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> AsyncIterator[Daemon]:
    async with Daemon(_config(tmp_path / "state", softhsm_token, production_journal_template)) as d:
        yield d


async def add_lan(d: Daemon, name: str, out: Path) -> Path:
    assert d.core is not None
    creds = reg.add_station(d.journal, d.core.token, name, "lan", audit=d.core.audit, actor="alice")
    put_on_line(d.journal, name)
    reg.write_bundle(creds, out / name)
    await d.refresh()
    return out / name


def _addr(d: Daemon) -> tuple[str, int]:
    assert d.lan_address is not None
    return d.lan_address


async def _enroll(
    link: Link, serial: str, rid: bytes | None = None, csr: bytes | None = None
) -> Cert | Error:
    csr = csr or make_csr(serial)[1]
    reply = await link.request(Enroll(rid or request_id(), serial, csr))
    assert isinstance(reply, Cert | Error), reply
    return reply


async def test_enrol_over_tls_verifies_and_confirm_marks_the_journal(daemon: Daemon, tmp_path: Path) -> None:
    bundle = await add_lan(daemon, "line1-st1", tmp_path)
    assert (bundle / "station.key").stat().st_mode & 0o777 == 0o600
    assert (bundle / "tls-client.key").stat().st_mode & 0o777 == 0o600
    link = await Link.tls(_addr(daemon), bundle)
    assert isinstance(await link.handshake(), Authenticated)
    chain_reply = await link.request(GetCaChain())
    assert isinstance(chain_reply, CaChain) and len(chain_reply.chain) == 2
    rid = request_id()
    cert_reply = await _enroll(link, "SN-TLS-1", rid)
    assert isinstance(cert_reply, Cert) and cert_reply.request_id == rid
    device = x509.load_der_x509_certificate(cert_reply.chain[0])
    issuer = x509.load_der_x509_certificate(cert_reply.chain[1])
    device.verify_directly_issued_by(issuer)
    x509.load_der_x509_certificate(chain_reply.chain[-1]).public_key()  # the root parses
    issuer.verify_directly_issued_by(x509.load_der_x509_certificate(chain_reply.chain[-1]))

    wrong = await link.request(Confirm(rid, bytes(32)))
    assert isinstance(wrong, Error) and wrong.code == Code.CONFIRM_MISMATCH
    unknown = await link.request(Confirm(request_id(), hashlib.sha256(cert_reply.chain[0]).digest()))
    assert isinstance(unknown, Error) and unknown.code == Code.UNKNOWN_REQUEST
    ok = await link.request(Confirm(rid, hashlib.sha256(cert_reply.chain[0]).digest()))
    assert isinstance(ok, Confirmed) and ok.request_id == rid
    again = await link.request(Confirm(rid, hashlib.sha256(cert_reply.chain[0]).digest()))
    assert isinstance(again, Confirmed)
    rows = daemon.journal.rows("request_id=?", (rid.hex(),))
    assert [(r.state, r.station) for r in rows] == [("confirmed", "line1-st1")]
    st = daemon.states["line1-st1"]
    assert st.connected and st.authenticated and st.last_device_serial == "SN-TLS-1"
    assert st.counters["enrolled"] == 1 and st.counters["confirmed"] == 2
    await link.close()


async def test_the_va_yields_to_the_daemons_issuance(daemon: Daemon, tmp_path: Path) -> None:
    """The responder's while-issuing budget (docs/revocation.md "Load") follows the daemon's own issuance: the
    one Activity of the core, which every IssueService of the process marks."""
    assert daemon.core is not None and daemon.va is not None
    daemon.core.activity.linger_s = 3600.0  # what is checked is the wiring, not the linger's length
    assert not daemon.va.responder.issuing()  # nothing issued yet
    bundle = await add_lan(daemon, "st-yield", tmp_path)
    link = await Link.tls(_addr(daemon), bundle)
    assert isinstance(await link.handshake(), Authenticated)
    assert isinstance(await _enroll(link, "SN-YIELD-1"), Cert)
    assert daemon.va.responder.issuing() and daemon.core.activity.open == 0
    await link.close()


async def test_the_daemon_reads_the_key_index_after_it_starts(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    """[journal] prewarm (default on): the public-key index read once in the background after the start
    (appliance/issuance/prewarm.py); off: not at all."""
    config = _config(tmp_path / "state", softhsm_token, production_journal_template)
    with Journal(
        config.journal.path
    ) as journal:  # a few certificates' rows (burned: no other table needs them)
        journal.call(journal.transaction, lambda conn: conn.executemany(
            "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256, csr_sha256,"
            " cert_serial, tbs_sha256, state, created_at) VALUES (?, 'st', 'idevid', 'issuing', ?, ?, x'00', ?,"
            " x'00', 'burned', 1)", [(f"r{i}", f"SN-PW{i}", bytes([i]) * 32, f"{i:x}") for i in range(1, 41)]),
            "test rows")  # fmt: skip
    async with Daemon(config) as d:
        assert d.prewarm is not None
        deadline = asyncio.get_running_loop().time() + 60
        while d.prewarm.result is None:
            assert asyncio.get_running_loop().time() < deadline, "the prewarm never ended"
            await asyncio.sleep(0.02)
        rows = d.journal.call(lambda: d.journal.conn.execute("SELECT COUNT(*) FROM issuance").fetchone()[0])
        assert rows >= 40 and d.prewarm.result.skipped is None and d.prewarm.result.keys == rows
    off = dataclasses.replace(config, journal=dataclasses.replace(config.journal, prewarm=False))
    async with Daemon(off) as d:
        assert d.prewarm is None


async def test_ca_chain_is_the_chain_of_the_profiles_issuing_ca_and_unknown_profiles_are_refused(
    daemon: Daemon, tmp_path: Path
) -> None:
    bundle = await add_lan(daemon, "st-chain", tmp_path)
    link = await Link.tls(_addr(daemon), bundle)
    assert isinstance(await link.handshake(), Authenticated)
    default = await link.request(GetCaChain())
    named = await link.request(GetCaChain("idevid"))
    assert isinstance(default, CaChain) and isinstance(named, CaChain)
    assert default.chain == named.chain
    assert named.chain[0] == ca_mod.load_ca(daemon.journal, "issuing").cert_der
    unknown = await link.request(GetCaChain("no-such-profile"))
    assert isinstance(unknown, Error) and unknown.code == Code.UNKNOWN_PROFILE
    assert "no-such-profile" in unknown.text
    # The refusal concerns that request only: the session goes on.
    assert isinstance(await link.request(GetCaChain("idevid")), CaChain)
    await link.close()


async def test_retry_after_lost_response_gets_identical_certificate(daemon: Daemon, tmp_path: Path) -> None:
    bundle = await add_lan(daemon, "st-retry", tmp_path)
    rid = request_id()
    csr = make_csr("SN-RETRY")[1]
    link = await Link.tls(_addr(daemon), bundle)
    assert isinstance(await link.handshake(), Authenticated)
    await link.send(Enroll(rid, "SN-RETRY", csr))
    await link.close()  # the CERT is lost with the connection
    await asyncio.sleep(0.2)

    link = await Link.tls(_addr(daemon), bundle)
    assert isinstance(await link.handshake(), Authenticated)
    first = await _enroll(link, "SN-RETRY", rid, csr)
    second = await _enroll(link, "SN-RETRY", rid, csr)
    # A fixture that lost its request id: a new one, same device and key.
    third = await _enroll(link, "SN-RETRY", request_id(), csr)
    assert isinstance(first, Cert) and isinstance(second, Cert) and isinstance(third, Cert)
    assert first.chain == second.chain == third.chain
    assert len(daemon.journal.rows("device_serial=?", ("SN-RETRY",))) == 1
    # The request id reused for another device is refused.
    other = await _enroll(link, "SN-OTHER", rid)
    assert isinstance(other, Error) and other.code == Code.BAD_REQUEST
    confirmed = await link.request(Confirm(third.request_id, hashlib.sha256(third.chain[0]).digest()))
    assert isinstance(confirmed, Confirmed)
    await link.close()


async def test_wrong_key_and_foreign_station_id_refused_while_another_station_enrols(
    daemon: Daemon, tmp_path: Path
) -> None:
    good = await add_lan(daemon, "st-good", tmp_path)
    bad = await add_lan(daemon, "st-bad", tmp_path)
    (bad / "station.key").write_text("00" * 32)
    link_bad = await Link.tls(_addr(daemon), bad)
    failed = await link_bad.handshake()
    assert isinstance(failed, HandshakeFailed) and failed.code == Code.AUTH_FAILED
    # st-bad's certificate with another station's id (and that station's real key): UNKNOWN_STATION, as the
    # protocol promises for an id that is not registered (on this certificate)...
    key_good = bytes.fromhex((good / "station.key").read_text())
    link_spoof = await Link.tls(_addr(daemon), bad)
    link_spoof.session = type(link_spoof.session)("st-good", key_good)
    spoof = await link_spoof.handshake()
    assert isinstance(spoof, HandshakeFailed) and spoof.code == Code.UNKNOWN_STATION
    # ... word for word the answer to an id nobody registered: the answer does not tell which ids exist.
    link_unknown = await Link.tls(_addr(daemon), bad)
    link_unknown.session = type(link_unknown.session)("nobody", key_good)
    unknown = await link_unknown.handshake()
    assert isinstance(unknown, HandshakeFailed) and unknown.code == Code.UNKNOWN_STATION
    assert unknown.text == spoof.text

    link = await Link.tls(_addr(daemon), good)
    assert isinstance(await link.handshake(), Authenticated)
    assert isinstance(await _enroll(link, "SN-GOOD"), Cert)
    counters = daemon.states["st-bad"].counters
    assert counters["auth_failed"] == 1 and counters["refused_unknown_station"] == 2
    for lk in (link, link_bad, link_spoof, link_unknown):
        await lk.close()


async def test_disabled_station_is_dropped_and_refused(daemon: Daemon, tmp_path: Path) -> None:
    bundle = await add_lan(daemon, "st-dis", tmp_path)
    link = await Link.tls(_addr(daemon), bundle)
    assert isinstance(await link.handshake(), Authenticated)
    assert daemon.core is not None
    reg.set_enabled(daemon.journal, "st-dis", False, audit=daemon.core.audit, actor="sam")
    # The watcher notices within registry_poll_s and drops the session with BYE STATION_DISABLED.
    events = await link.events(timeout=3)
    assert any(isinstance(e, Closed) and e.code == Code.STATION_DISABLED for e in events)
    assert daemon.server is not None and daemon.server.connected("st-dis") == 0
    await link.close()
    link = await Link.tls(_addr(daemon), bundle)
    refused = await link.handshake()
    assert isinstance(refused, HandshakeFailed) and refused.code == Code.STATION_DISABLED
    await link.close()


async def test_tls_certificate_of_another_ca_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    bundle = await add_lan(daemon, "st-ca", tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "station st-ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    forged = tmp_path / "forged"
    shutil.copytree(bundle, forged)
    (forged / "tls-client.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (forged / "tls-client.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises((ssl.SSLError, ConnectionError, Exception)):
        link = await Link.tls(_addr(daemon), forged)
        await link.handshake()
    assert "st-ca" not in daemon.states or not daemon.states["st-ca"].authenticated


async def test_rotated_away_tls_certificate_and_key_are_refused(daemon: Daemon, tmp_path: Path) -> None:
    assert daemon.core is not None
    old = await add_lan(daemon, "st-rot", tmp_path)
    link = await Link.tls(_addr(daemon), old)
    assert isinstance(await link.handshake(), Authenticated)
    new = reg.write_bundle(
        reg.rotate_key(daemon.journal, daemon.core.token, "st-rot", audit=daemon.core.audit, actor="alice"),
        tmp_path / "new",
    )
    await daemon.refresh()
    events = await link.events(timeout=3)
    assert any(isinstance(e, Closed) for e in events)
    await link.close()
    # The old certificate: the TLS handshake passes (same CA) but no station owns it any more.
    link = await Link.tls(_addr(daemon), old)
    refused = await link.handshake()
    assert isinstance(refused, HandshakeFailed) and refused.code == Code.UNKNOWN_STATION
    await link.close()
    # The new certificate with the old key: AUTH_FAILED. The new bundle works.
    link = await Link.tls(_addr(daemon), new)
    link.session = type(link.session)("st-rot", bytes.fromhex((old / "station.key").read_text()))
    failed = await link.handshake()
    assert isinstance(failed, HandshakeFailed) and failed.code == Code.AUTH_FAILED
    await link.close()
    link = await Link.tls(_addr(daemon), new, "st-rot")
    assert isinstance(await link.handshake(), Authenticated)
    await link.close()


async def test_line_noise_on_one_connection_does_not_disturb_another(daemon: Daemon, tmp_path: Path) -> None:
    noisy_bundle = await add_lan(daemon, "st-noisy", tmp_path)
    good_bundle = await add_lan(daemon, "st-clean", tmp_path)
    noisy = await Link.tls(_addr(daemon), noisy_bundle)
    assert isinstance(await noisy.handshake(), Authenticated)
    good = await Link.tls(_addr(daemon), good_bundle)
    assert isinstance(await good.handshake(), Authenticated)

    ping = noisy.session.send(Ping(7))
    bad_crc = ping[:-1] + bytes([ping[-1] ^ 0xFF])
    header = SYNC + struct.pack(">BH", 0xA1, 60000)
    oversize = header + bytes([crc8(header)])
    await noisy.channel.send(b"\x00garbage\xff" * 20 + bad_crc + oversize + ping[:9])  # then silence
    enrolled = await _enroll(good, "SN-CLEAN-1")  # meanwhile the other station is served
    assert isinstance(enrolled, Cert)
    await asyncio.sleep(0.3)  # the truncated frame times out on the appliance
    pong = await noisy.request(Ping(8))
    assert isinstance(pong, Pong) and pong.token == 8
    counters = daemon.states["st-noisy"].counters
    assert counters["garbage"] >= 1 and counters["bad_crc"] == 1 and counters["oversize"] >= 1
    assert counters["timeout"] >= 1
    # Disconnect mid-frame: the appliance drops the partial frame and the other station carries on.
    await noisy.channel.send(noisy.session.send(Ping(9))[:12])
    await noisy.close()
    assert isinstance(await _enroll(good, "SN-CLEAN-2"), Cert)
    await good.close()


async def test_replayed_sealed_frame_is_refused(daemon: Daemon, tmp_path: Path) -> None:
    bundle = await add_lan(daemon, "st-replay", tmp_path)
    link = await Link.tls(_addr(daemon), bundle)
    assert isinstance(await link.handshake(), Authenticated)
    assert isinstance(await link.request(Ping(1)), Pong)
    await link.channel.send(link.recorded[-1])
    (event,) = await link.events()
    assert isinstance(event, Received) and isinstance(event.message, Error)
    assert event.message.code == Code.REPLAY
    assert daemon.states["st-replay"].counters["rejected_replay"] == 1
    await link.close()


async def _plain_then_close(link: Link, timeout: float = 10.0) -> list[Message]:
    """The plain messages the appliance sends until it closes the connection."""
    out: list[Message] = []
    with pytest.raises(ChannelClosed):
        async with asyncio.timeout(timeout):
            while True:
                item = await link.channel.recv()
                if isinstance(item, Frame) and not item.sealed:
                    out.append(decode_message(item.kind, item.payload))
    return out


async def test_connection_without_handshake_gets_timeout_then_is_closed(
    daemon: Daemon, tmp_path: Path
) -> None:
    bundle = await add_lan(daemon, "st-slow", tmp_path)
    link = await Link.tls(_addr(daemon), bundle)
    # Connected but never says HELLO: told TIMEOUT, then closed, after handshake_timeout_s.
    (error,) = await _plain_then_close(link)
    assert isinstance(error, Error) and error.code == Code.TIMEOUT
    assert daemon.states["st-slow"].counters["handshake_timeout"] == 1


async def test_idle_tls_session_ends_with_bye_timeout_then_the_connection_closes(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path / "state", softhsm_token, production_journal_template)
    config = dataclasses.replace(
        config, stations=dataclasses.replace(config.stations, handshake_timeout_s=10.0, idle_timeout_s=0.5)
    )
    async with Daemon(config) as d:
        bundle = await add_lan(d, "st-idle", tmp_path)
        link = await Link.tls(_addr(d), bundle)
        assert isinstance(await link.handshake(), Authenticated)
        assert isinstance(await link.request(Ping(1)), Pong)
        # Then nothing: the appliance ends the session with an authentic reason, then the connection.
        (closed,) = await link.events(timeout=10)
        assert isinstance(closed, Closed) and closed.bye and closed.code == Code.TIMEOUT
        with pytest.raises(ChannelClosed):
            async with asyncio.timeout(10):
                await link.channel.recv()
        assert d.states["st-idle"].counters["idle_timeout"] == 1


async def _next_plain(link: Link, timeout: float = 10.0) -> Message:
    async with asyncio.timeout(timeout):
        while True:
            item = await link.channel.recv()
            if isinstance(item, Frame) and not item.sealed:
                return decode_message(item.kind, item.payload)


class _Pty:
    """A pseudo-terminal standing in for a USB-serial adapter; ``path`` is a stable symlink (like by-path)."""

    def __init__(self, link: Path) -> None:
        import tty

        self.master, self.slave = os.openpty()
        self.rx: asyncio.BaseTransport | None = None
        self.tx: asyncio.BaseTransport | None = None
        tty.setraw(self.slave)
        link.unlink(missing_ok=True)
        link.symlink_to(os.ttyname(self.slave))

    async def channel(self) -> StreamChannel:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        self.rx, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(os.dup(self.master), "rb", buffering=0)
        )
        self.tx, protocol = await loop.connect_write_pipe(
            asyncio.streams.FlowControlMixin, os.fdopen(os.dup(self.master), "wb", buffering=0)
        )
        return StreamChannel(reader, asyncio.StreamWriter(self.tx, protocol, reader, loop), peer="pty")

    def unplug(self) -> None:
        for t in (self.rx, self.tx):
            if t is not None:
                t.close()
        os.close(self.slave)
        os.close(self.master)


async def _port_open(d: Daemon, name: str) -> None:
    """Wait until the daemon has (re)opened the station's port: bytes sent before are flushed by the open."""
    assert d.server is not None
    async with asyncio.timeout(3):
        while not d.server.connected(name):
            await asyncio.sleep(0.02)


async def test_serial_station_enrols_survives_unplug_and_is_bound_to_its_port(
    daemon: Daemon, tmp_path: Path
) -> None:
    assert daemon.core is not None
    port = tmp_path / "ttyUSB-line1"
    pty = _Pty(port)
    creds = reg.add_station(
        daemon.journal, daemon.core.token, "st-serial", "serial", port=str(port), baud=115200,
        audit=daemon.core.audit, actor="alice",
    )  # fmt: skip
    key = creds.record.key
    put_on_line(daemon.journal, "st-serial")
    await daemon.refresh()
    link = Link(await pty.channel(), "st-serial", key)
    await _port_open(daemon, "st-serial")
    assert isinstance(await link.handshake(), Authenticated)
    assert isinstance(await _enroll(link, "SN-SERIAL-1"), Cert)
    # Another station's id on this port is refused even with the right key for it, as unknown here.
    link.session = type(link.session)("st-other", key)
    refused = await link.handshake()
    assert isinstance(refused, HandshakeFailed) and refused.code == Code.UNKNOWN_STATION

    # A CHALLENGE left unanswered: after handshake_timeout_s the appliance says TIMEOUT and forgets it; the
    # port stays open and the station authenticates again.
    link.session = type(link.session)("st-serial", key)
    await link.channel.send(link.session.hello())
    first = await _next_plain(link)
    assert isinstance(first, Challenge)
    second = await _next_plain(link)
    assert isinstance(second, Error) and second.code == Code.TIMEOUT
    assert isinstance(await link.handshake(), Authenticated)
    # A session left idle: ended with a sealed BYE TIMEOUT after idle_timeout_s; the port stays open.
    (closed,) = await link.events(timeout=20)
    assert isinstance(closed, Closed) and closed.bye and closed.code == Code.TIMEOUT
    assert isinstance(await link.handshake(), Authenticated)
    assert isinstance(await _enroll(link, "SN-SERIAL-3"), Cert)
    counters = daemon.states["st-serial"].counters
    assert counters["handshake_timeout"] == 1 and counters["idle_timeout"] == 1

    pty.unplug()  # the adapter disappears; the daemon retries until the port is back
    await asyncio.sleep(0.3)
    pty = _Pty(port)
    link = Link(await pty.channel(), "st-serial", key)
    await _port_open(daemon, "st-serial")
    assert isinstance(await link.handshake(), Authenticated)
    assert isinstance(await _enroll(link, "SN-SERIAL-2"), Cert)
    pty.unplug()


async def test_a_slow_usb_adapter_is_reported_once_per_port_and_value(
    daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """An adapter whose latency timer holds received bytes back (FTDI: 16 ms unless set) can cost the line a
    sixth of its rate: the daemon says so, with the fix, once per port and value, not at every reopen."""
    from stations.transports import serial as serial_mod
    from tests.stations.test_serial_channel import fake_latency_timer

    assert daemon.core is not None and daemon.server is not None
    port = tmp_path / "ttyUSB-slow"
    sysfs = tmp_path / "sys"
    monkeypatch.setattr(serial_mod, "SYSFS", str(sysfs))
    caplog.set_level(logging.WARNING, logger="appliance.daemon")

    def said() -> list[str]:
        return [r.getMessage() for r in caplog.records if "latency timer" in r.getMessage()]

    async def replug(text: str) -> tuple[_Pty, Path]:
        pty = _Pty(port)
        return pty, fake_latency_timer(sysfs, port, text)

    async def unplugged(pty: _Pty) -> None:
        pty.unplug()
        assert daemon.server is not None
        async with asyncio.timeout(10):  # the daemon notices before the port comes back
            while daemon.server.connected("st-slow"):
                await asyncio.sleep(0.02)
        await asyncio.sleep(0.2)

    pty, timer = await replug("16\n")
    creds = reg.add_station(
        daemon.journal, daemon.core.token, "st-slow", "serial", port=str(port), baud=115200,
        audit=daemon.core.audit, actor="alice",
    )  # fmt: skip
    await daemon.refresh()
    await _port_open(daemon, "st-slow")
    assert len(said()) == 1
    assert "st-slow" in said()[0] and "up to 16 ms" in said()[0] and f"echo 1 > {timer}" in said()[0]

    await unplugged(pty)  # reopened with the same timer: not said again
    pty, timer = await replug("16\n")
    link = Link(await pty.channel(), "st-slow", creds.record.key)
    await _port_open(daemon, "st-slow")
    assert isinstance(await link.handshake(), Authenticated)  # the port works all the same
    assert len(said()) == 1

    await unplugged(pty)  # another value: said
    pty, timer = await replug("8\n")
    await _port_open(daemon, "st-slow")
    assert len(said()) == 2 and "up to 8 ms" in said()[1]
    pty.unplug()


async def test_a_pem_csr_is_refused_bad_csr_on_the_wire(daemon: Daemon, tmp_path: Path) -> None:
    """The station protocol carries DER (section 5); PEM, which other front ends accept, is refused here."""
    bundle = await add_lan(daemon, "st-pem", tmp_path)
    link = await Link.tls(_addr(daemon), bundle)
    assert isinstance(await link.handshake(), Authenticated)
    der = make_csr("SN-PEM")[1]
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    refused = await _enroll(link, "SN-PEM", csr=pem)
    assert isinstance(refused, Error) and refused.code == Code.BAD_CSR and "DER" in refused.text
    assert isinstance(await _enroll(link, "SN-PEM", csr=der), Cert)
    await link.close()


async def test_disabled_serial_station_is_told_so_on_its_port_and_works_again_once_enabled(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Disabling ends the session with BYE STATION_DISABLED, and the port stays open so that every HELLO after
    is answered STATION_DISABLED (protocol sections 4.3, 14): not silence, which a fixture would retry."""
    assert daemon.core is not None
    port = tmp_path / "ttyUSB-disabled"
    pty = _Pty(port)
    creds = reg.add_station(
        daemon.journal, daemon.core.token, "st-serial-dis", "serial", port=str(port), baud=115200,
        audit=daemon.core.audit, actor="alice",
    )  # fmt: skip
    await daemon.refresh()
    link = Link(await pty.channel(), "st-serial-dis", creds.record.key)
    await _port_open(daemon, "st-serial-dis")
    assert isinstance(await link.handshake(), Authenticated)
    reg.set_enabled(daemon.journal, "st-serial-dis", False, audit=daemon.core.audit, actor="sam")
    events = await link.events(timeout=5)
    assert any(isinstance(e, Closed) and e.code == Code.STATION_DISABLED for e in events)
    assert daemon.server is not None
    async with asyncio.timeout(10):  # the old session lets go of the port, then the daemon reopens it
        while daemon.server.connected("st-serial-dis"):
            await asyncio.sleep(0.02)
    await _port_open(daemon, "st-serial-dis")
    refused = await link.handshake()
    assert isinstance(refused, HandshakeFailed) and refused.code == Code.STATION_DISABLED
    reg.set_enabled(daemon.journal, "st-serial-dis", True, audit=daemon.core.audit, actor="sam")
    await daemon.refresh()
    assert isinstance(await link.handshake(), Authenticated)
    pty.unplug()


async def test_quota_race_over_real_stations_issues_exactly_the_quantity(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Ten TLS stations on one line race for the last three units of a work order: exactly three certificates,
    every other request QUOTA_EXHAUSTED, and the counter equals the rows."""
    from appliance.production import reconcile, store
    from appliance.production.allowlist import SerialRange
    from appliance.production.model import WorkOrderSpec
    from appliance.production.users import Role, User

    assert daemon.core is not None
    spec = WorkOrderSpec("WO-RACE", "sensor", 3, ("L1",), ranges=(SerialRange("RACE-", 0, 99, 4),))
    store.add_work_order(
        daemon.journal, daemon.core.audit, User("alice", Role.ADMINISTRATOR), spec, activate=True
    )
    links = []
    for i in range(10):
        bundle = await add_lan(daemon, f"racer{i}", tmp_path)
        link = await Link.tls(_addr(daemon), bundle)
        assert isinstance(await link.handshake(), Authenticated)
        links.append(link)

    async def station(i: int, link: Link) -> list[Cert | Error]:
        return [await _enroll(link, f"RACE-{i * 3 + k:04d}") for k in range(3)]

    replies = [r for rs in await asyncio.gather(*(station(i, lk) for i, lk in enumerate(links))) for r in rs]
    certs = [r for r in replies if isinstance(r, Cert)]
    refused = [r for r in replies if isinstance(r, Error)]
    assert len(certs) == 3
    assert len(refused) == 27 and {r.code for r in refused} == {Code.QUOTA_EXHAUSTED}
    assert store.get_work_order(daemon.journal, "WO-RACE").consumed == 3
    assert reconcile.quota_problems(daemon.journal) == []
    for link in links:
        await link.close()


async def test_failed_handshakes_and_forged_frames_are_audited_bounded_logged_once_and_alarmed(
    softhsm_token: SoftHsmToken,
    production_journal_template: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A fixture with the wrong key hammering the appliance, and one whose frames are tampered with: every
    failure counts, the audit log gets at most a burst per station and window plus a summary, the log one
    line per cause, the station over its limit is answered BUSY and raises an alarm."""
    config = _config(tmp_path / "state", softhsm_token, production_journal_template)
    config = dataclasses.replace(
        config, stations=dataclasses.replace(config.stations, handshake_timeout_s=10.0, failure_limit=5)
    )
    with caplog.at_level(logging.DEBUG):
        async with Daemon(config) as d:
            assert d.core is not None and d.server is not None
            d.server.blocked_pause_s = (
                0.01  # answer the blocked station's HELLOs quickly: this test counts them
            )
            wrong = await add_lan(d, "st-wrongkey", tmp_path)
            (wrong / "station.key").write_text("00" * 32)
            codes = []
            link = await Link.tls(_addr(d), wrong)
            for _ in range(40):
                event = await link.handshake()
                assert isinstance(event, HandshakeFailed)
                codes.append(event.code)
                if event.code == Code.AUTH_FAILED and codes.count(Code.AUTH_FAILED) == 5:
                    # The limit: the appliance closed this TLS connection; the station comes back.
                    await link.close()
                    link = await Link.tls(_addr(d), wrong)
            await link.close()
            assert codes == [Code.AUTH_FAILED] * 5 + [Code.BUSY] * 35
            alarm = d.core.alarms.get("station.link-failing:st-wrongkey")
            assert alarm is not None and "AUTH_FAILED" in alarm.message

            tampered = await add_lan(d, "st-tampered", tmp_path)
            link = await Link.tls(_addr(d), tampered)
            assert isinstance(await link.handshake(), Authenticated)
            replies: list[object] = []
            with contextlib.suppress(ChannelClosed):
                for i in range(20):
                    wire = bytearray(link.session.send(Ping(i)))
                    wire[-5] ^= 0x80
                    await link.channel.send(bytes(wire[:-4]) + zlib.crc32(wire[:-4]).to_bytes(4, "big"))
                    replies.extend(await link.events())
                    if not link.session.established:
                        break
            await link.close()
            bad_tags = [r for r in replies if isinstance(r, Received) and isinstance(r.message, Error)]
            assert [r.message.code for r in bad_tags] == [Code.BAD_TAG] * 5  # type: ignore[attr-defined]
            assert any(isinstance(r, Closed) and r.bye and r.code == Code.BUSY for r in replies)
            assert d.core.alarms.get("station.link-failing:st-tampered") is not None
    # After a clean stop (its last pass audits the open windows' summaries), as an auditor reads the journal:
    with Journal(config.journal.path) as journal:
        entries = [e for e in AuditLog(journal).entries() if e.event.startswith("station.link-refused")]
    full = [i for e in entries if e.event == "station.link-refused" for i in json.loads(e.data)["items"]]
    assert [(i["station"], i["code"]) for i in full] == [("st-wrongkey", "AUTH_FAILED")] * 5 + [
        ("st-tampered", "BAD_TAG")
    ] * 5
    summaries = [
        i for e in entries if e.event == "station.link-refused-summary" for i in json.loads(e.data)["items"]
    ]
    assert {s["station"]: s["suppressed"] for s in summaries} == {"st-wrongkey": {"BUSY": 35}}
    # 50 failures; the log has one WARNING per cause and one per alarm, and nothing above DEBUG from the
    # station server itself.
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING and "st-" in r.getMessage()]
    assert len(warnings) <= 5, [r.getMessage() for r in warnings]
    assert not [r for r in caplog.records if r.name == "stations.server" and r.levelno > logging.DEBUG]


async def test_tls_certificate_no_station_owns_is_counted_by_certificate_not_address(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A rotated-away certificate presented from many addresses is one thing to audit and alarm about: the
    audit keeps a burst in full, and one alarm is raised, however many addresses are used."""
    assert daemon.core is not None
    old = await add_lan(daemon, "st-gone", tmp_path)
    reg.rotate_key(daemon.journal, daemon.core.token, "st-gone", audit=daemon.core.audit, actor="alice")
    await daemon.refresh()
    fingerprint = hashlib.sha256(x509.load_pem_x509_certificate((old / "tls-client.crt").read_bytes()).public_bytes(
        serialization.Encoding.DER)).hexdigest()[:16]  # fmt: skip
    for i in range(25):  # 25 source addresses
        reader, writer = await asyncio.open_connection(
            *_addr(daemon), ssl=tls_client_context(old), local_addr=(f"127.0.0.{2 + i}", 0)
        )
        link = Link(StreamChannel(reader, writer), "st-gone", bytes(32))
        refused = await link.handshake()
        assert isinstance(refused, HandshakeFailed) and refused.code == Code.UNKNOWN_STATION
        await link.close()
    async with asyncio.timeout(10):
        while len(items := _link_refused(daemon)) < daemon.config.stations.failure_limit:
            await asyncio.sleep(0.05)
    assert {i["station"] for i in items} == {f"tls-cert:{fingerprint}"}
    assert len(items) == daemon.config.stations.failure_limit  # the rest are counted for the summary
    assert len({i["peer"] for i in items}) == len(items)  # the audit names where each came from
    failing = [a for a in daemon.core.alarms.active() if a.cause.startswith("station.link-failing:")]
    assert [a.cause for a in failing] == [f"station.link-failing:tls-cert:{fingerprint}"]


def _link_refused(d: Daemon) -> list[dict[str, object]]:
    assert d.core is not None
    return [
        i
        for e in d.core.audit.entries()
        if e.event == "station.link-refused"
        for i in json.loads(e.data)["items"]
    ]


async def test_stopping_with_stations_connected_says_bye_busy_and_logs_no_error(
    softhsm_token: SoftHsmToken,
    production_journal_template: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = _config(tmp_path / "state", softhsm_token, production_journal_template)
    with caplog.at_level(logging.WARNING):
        async with Daemon(config) as d:
            bundle = await add_lan(d, "st-stop", tmp_path)
            link = await Link.tls(_addr(d), bundle)
            assert isinstance(await link.handshake(), Authenticated)
        (closed,) = await link.events()
        assert isinstance(closed, Closed) and closed.bye and closed.code == Code.BUSY
        await link.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [
        r.getMessage() for r in caplog.records
    ]


async def test_confirm_answered_from_the_enrolls_memory_is_per_station_and_marks_the_journal(
    daemon: Daemon, tmp_path: Path
) -> None:
    """CONFIRM right after ENROLL is answered from what the ENROLL returned (no journal lookup): that memory is
    keyed by station, so another station cannot confirm the request, and the confirm still reaches the
    journal; it is bounded, oldest out first."""
    links = [await Link.tls(_addr(daemon), await add_lan(daemon, f"recent-st{i}", tmp_path)) for i in (1, 2)]
    for link in links:
        assert isinstance(await link.handshake(), Authenticated)
    rid = request_id()
    cert = await _enroll(links[0], "SN-RECENT-1", rid)
    assert isinstance(cert, Cert)
    digest = hashlib.sha256(cert.chain[0]).digest()
    enroller = daemon.enroller
    assert enroller is not None and ("recent-st1", rid.hex()) in enroller._recent
    other = await links[1].request(Confirm(rid, digest))
    assert isinstance(other, Error) and other.code == Code.UNKNOWN_REQUEST
    ok = await links[0].request(Confirm(rid, digest))
    assert isinstance(ok, Confirmed)
    assert ("recent-st1", rid.hex()) not in enroller._recent
    assert [r.state for r in daemon.journal.rows("request_id=?", (rid.hex(),))] == ["confirmed"]
    for link in links:
        await link.close()

    sample = next(iter(daemon.journal.rows("request_id=?", (rid.hex(),))))
    for n in range(enroller.RECENT + 10):
        enroller._note_recent(
            "bounded", f"{n:032x}", daemon_enroller._Issued(sample.cert_serial, "x", None, b"", "issued")
        )
    keys = [k for k in enroller._recent if k[0] == "bounded"]
    assert len(enroller._recent) == enroller.RECENT and keys[0] == ("bounded", f"{10:032x}")


async def test_confirm_and_enroll_pipelined_confirms_one_device_and_issues_the_next(
    daemon: Daemon, tmp_path: Path
) -> None:
    """StationClient.confirm_and_enroll sends a device's CONFIRM and the next device's ENROLL back to back over
    one session (the appliance works on both at once): the first is confirmed in the journal, the second issued;
    a confirmation the appliance refuses raises as confirm() would, and the next device's ENROLL, sent again
    under last_request_id, is answered with the certificate already issued for it."""
    from stations.client import StationClient, client_ssl_context, read_station_key
    from stations.errors import StationError

    bundle = await add_lan(daemon, "pipe-st1", tmp_path)
    host, port = _addr(daemon)
    client = await StationClient.connect_tcp(
        host, port, station_id="pipe-st1", key=read_station_key(bundle / "station.key"),
        ssl_context=client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt"),
        server_hostname="localhost", keepalive_s=None,
    )  # fmt: skip
    try:
        serials = [f"SN-PIPE-{i}" for i in range(4)]
        chain = await client.enroll(serials[0], make_csr(serials[0])[1])
        rids = [client.last_request_id]
        for serial in serials[1:]:
            prev = rids[-1]
            assert prev is not None
            chain = await client.confirm_and_enroll(prev, chain[0], serial, make_csr(serial)[1])
            rids.append(client.last_request_id)
            x509.load_der_x509_certificate(chain[0])
        states = {r.device_serial: r.state for r in daemon.journal.rows("device_serial LIKE 'SN-PIPE-%'")}
        assert states == {**dict.fromkeys(serials[:-1], "confirmed"), serials[-1]: "issued"}

        # A refused confirmation (wrong hash): raised, and the next device's ENROLL is answered on a resend.
        last = rids[-1]
        assert last is not None
        csr = make_csr("SN-PIPE-X")[1]
        with pytest.raises(StationError) as refused:
            await client.confirm_and_enroll(last, b"not what was issued", "SN-PIPE-X", csr)
        assert refused.value.code == Code.CONFIRM_MISMATCH
        next_rid = client.last_request_id
        assert next_rid is not None and next_rid != last
        again = await client.enroll("SN-PIPE-X", csr, request_id=next_rid)
        (row,) = daemon.journal.rows("device_serial='SN-PIPE-X'")
        assert row.cert_der == again[0] and row.state == "issued"
        assert daemon.journal.rows("request_id=?", (last.hex(),))[0].state == "issued"  # not confirmed
    finally:
        await client.close()
