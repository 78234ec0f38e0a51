"""The independent station (tests/conformance/station.py, written from docs/station-protocol.md alone) against a
real `birthline run` in its own process: over TLS on 127.0.0.1 with the credential bundle `station add` wrote,
and over a serial line (a socat pty pair, as the demo uses). Enrolment end to end with a real CSR, the chain
checked by `openssl verify`, confirmation, idempotent retries, and the error cases the specification promises.

The appliance is provisioned with its own core API (that is the administrator's side, not the protocol); the
station side uses nothing but the specification and the bundle's files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.issuance.journal import Journal
from appliance.production import store
from appliance.production.allowlist import SerialRange
from appliance.production.model import WorkOrderSpec
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from tests.conformance import station as st
from tests.conformance.conftest import ADMIN, ISSUING, LINE, MANAGEMENT
from tests.daemon_config import daemon_config
from tests.ports import free_ports

pytestmark = pytest.mark.slow

SECTIONS = """\
[issuance]
issuing_ca = "{issuing}"
prepare_workers = {workers}
[stations]
lan_listen = "127.0.0.1:{port}"
tls_dir = "{state}/tls"
management_ca = "{management}"
handshake_timeout_s = {handshake}
idle_timeout_s = {idle}
reopen_interval_s = 0.1
failure_limit = 1000
[va]
listen = ""
"""
LAN, LAN_2, SERIAL = "conf-lan", "conf-lan-2", "conf-serial"


@dataclass
class Appliance:
    bundles: Path
    fixture_port: str  # the fixture's end of the serial line
    log: Path


@contextlib.contextmanager
def _running(
    tmp: Path,
    softhsm: SoftHsmToken,
    template: Path,
    token: Token,
    *,
    handshake: float,
    idle: float,
    workers: int,
) -> Iterator[Appliance]:
    state, bundles = tmp / "state", tmp / "bundles"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
    shutil.copy(template, state / "journal.sqlite")
    port = free_ports(1)
    appliance_port, fixture_port = str(tmp / "tty-appliance"), str(tmp / "tty-fixture")
    with Journal(state / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        for name in (LAN, LAN_2):
            creds = reg.add_station(
                journal, token, name, "lan", management_ca=MANAGEMENT, audit=audit, actor=ADMIN.name
            )
            reg.write_bundle(creds, bundles / name, lan_host=f"127.0.0.1:{port}")
        creds = reg.add_station(
            journal, token, SERIAL, "serial", port=appliance_port, audit=audit, actor=ADMIN.name
        )
        reg.write_bundle(creds, bundles / SERIAL)
        for name in (LAN, LAN_2, SERIAL):
            store.assign_station(journal, audit, ADMIN, name, LINE)
        spec = WorkOrderSpec("WO-CONF", "conf-sensor", 500, (LINE,), ranges=(SerialRange("CF-", 0, 999, 4),))
        store.add_work_order(journal, audit, ADMIN, spec, activate=True)
    config = tmp / "birthline.toml"
    config.write_text(
        daemon_config(state, softhsm, SECTIONS.format(state=state, port=port, handshake=handshake, idle=idle, workers=workers,
                      issuing=ISSUING, management=MANAGEMENT)))  # fmt: skip
    socat = subprocess.Popen(
        ["socat", f"pty,raw,echo=0,link={appliance_port}", f"pty,raw,echo=0,link={fixture_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    log = tmp / "daemon.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(config)],
            stdout=out,
            stderr=out,
        )
    try:
        deadline = time.monotonic() + 120
        while not (os.path.exists(fixture_port) and _listening(port)):
            assert proc.poll() is None, f"birthline run exited: {log.read_text()[-2000:]}"
            assert time.monotonic() < deadline, "birthline run never listened"
            time.sleep(0.05)
        yield Appliance(bundles, fixture_port, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        socat.terminate()
        socat.wait(10)
    # Nothing the station sent broke anything: a clean stop and no traceback in the daemon's log.
    assert proc.returncode == 0, log.read_text()[-2000:]
    assert "Traceback" not in log.read_text(), log.read_text()[-4000:]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def appliance(
    tmp_path_factory: pytest.TempPathFactory,
    softhsm_token: SoftHsmToken,
    conformance_template: Path,
    hsm_token: Token,
) -> Iterator[Appliance]:
    """The appliance as shipped: default timers, a prepare worker process."""
    with _running(tmp_path_factory.mktemp("conformance"), softhsm_token, conformance_template, hsm_token,
                  handshake=10.0, idle=90.0, workers=1) as running:  # fmt: skip
        yield running


@pytest.fixture(scope="module")
def quick_timers(
    tmp_path_factory: pytest.TempPathFactory,
    softhsm_token: SoftHsmToken,
    conformance_template: Path,
    hsm_token: Token,
) -> Iterator[Appliance]:
    """The same with short handshake and idle timers, for the timer cases."""
    with _running(tmp_path_factory.mktemp("timers"), softhsm_token, conformance_template, hsm_token,
                  handshake=3.0, idle=2.0, workers=0) as running:  # fmt: skip
        yield running


# -- helpers: what a station needs, from the bundle alone -------------------------------------------------------------
def _tls(appliance: Appliance, name: str = LAN) -> tuple[st.Bundle, st.TlsTransport]:
    bundle = st.Bundle.load(appliance.bundles / name)
    host, _, port = str(bundle.meta["host"]).rpartition(":")
    return bundle, st.TlsTransport.connect(host, int(port), bundle)


def _tls_station(appliance: Appliance, name: str = LAN) -> st.Station:
    bundle, transport = _tls(appliance, name)
    station = st.Station(transport, bundle.name, bundle.key)
    station.handshake()
    return station


def _serial_station(appliance: Appliance) -> st.Station:
    bundle = st.Bundle.load(appliance.bundles / SERIAL)
    assert bundle.kind == "serial" and bundle.meta["baud"] == 115200
    station = st.Station(st.PtyTransport(appliance.fixture_port), bundle.name, bundle.key)
    station.handshake(timeout=60)  # retransmits until the appliance has its port open
    return station


def _device(serial: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A device key and its CSR; the subject says nothing useful: the profile decides it (section 13.4)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ignored by the appliance")]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.DER)


def _check_chain(tmp: Path, serial: str, key: ec.EllipticCurvePrivateKey, cert_chain: list[bytes],
                 ca_chain: list[bytes]) -> None:  # fmt: skip
    device, issuing, root = (
        x509.load_der_x509_certificate(d) for d in (cert_chain[0], ca_chain[0], ca_chain[-1])
    )
    assert cert_chain[1] == ca_chain[0], "CERT's chain: the device certificate, then its issuing CA"
    assert device.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == serial
    assert device.public_key() == key.public_key()
    device.verify_directly_issued_by(issuing)
    issuing.verify_directly_issued_by(root)
    pem = serialization.Encoding.PEM
    (tmp / "root.pem").write_bytes(root.public_bytes(pem))
    (tmp / "issuing.pem").write_bytes(issuing.public_bytes(pem))
    (tmp / "device.pem").write_bytes(device.public_bytes(pem))
    out = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", tmp / "root.pem", "-untrusted", tmp / "issuing.pem",
         tmp / "device.pem"], capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def _refused(station: st.Station, message_type: int, body: bytes) -> st.Refused:
    reply = station.request(message_type, body)
    assert reply.type == st.ERROR, reply
    _, code, text = st.parse_error(reply.body)
    return st.Refused(code, text, sealed=reply.sealed)


def _plain_error(station: st.Station) -> tuple[int, str]:
    reply = station.receive()
    assert reply.type == st.ERROR and not reply.sealed, reply
    _, code, text = st.parse_error(reply.body)
    return code, text


def _closed(station: st.Station, timeout: float = 30.0) -> None:
    with pytest.raises(st.Closed):
        station.receive(timeout)


# -- enrolment, end to end ------------------------------------------------------------------------------------------
def test_tls_parameters_and_the_appliance_certificate(appliance: Appliance) -> None:
    """Section 13.3: TLS 1.2 or later with an AEAD suite; the appliance's certificate is the management CA's,
    names the address in the bundle, and is for a server."""
    bundle, transport = _tls(appliance)
    with contextlib.closing(transport):
        assert transport.sock.version() in ("TLSv1.2", "TLSv1.3")
        suite = transport.sock.cipher()[0]
        assert "GCM" in suite or "CHACHA20" in suite, suite
        server = x509.load_der_x509_certificate(transport.sock.getpeercert(binary_form=True))
        ca = x509.load_pem_x509_certificate(bundle.ca_file.read_bytes())
        server.verify_directly_issued_by(ca)
        assert server.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "birthline appliance"
        san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert {"localhost", "birthline"} <= set(san.get_values_for_type(x509.DNSName))
        assert (
            ExtendedKeyUsageOID.SERVER_AUTH
            in server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        )
        client = x509.load_pem_x509_certificate(bundle.tls_cert_file.read_bytes())
        assert client.issuer == ca.subject
        assert client.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == f"station {LAN}"
    assert (bundle.directory / "station.key").stat().st_mode & 0o777 == 0o600
    assert bundle.tls_key_file.stat().st_mode & 0o777 == 0o600


def test_tls_enrolment_confirmation_and_idempotent_retries(appliance: Appliance, tmp_path: Path) -> None:
    station = _tls_station(appliance)
    ca_chain = station.ca_chain()
    assert station.ca_chain("idevid") == ca_chain and len(ca_chain) == 2
    with pytest.raises(st.Refused) as unknown:
        station.ca_chain("no-such-profile")
    assert unknown.value.code == st.UNKNOWN_PROFILE and unknown.value.sealed

    key, csr = _device("CF-0001")
    rid = os.urandom(16)
    chain = station.enroll(rid, "CF-0001", csr)
    _check_chain(tmp_path, "CF-0001", key, chain, ca_chain)
    # CONFIRM with what the device stored; a wrong hash and an unknown request id are refused, sealed.
    wrong = _refused(station, st.CONFIRM, rid + bytes(32))
    assert (wrong.code, wrong.sealed) == (st.CONFIRM_MISMATCH, True)
    unknown_rid = _refused(station, st.CONFIRM, os.urandom(16) + bytes(32))
    assert unknown_rid.code == st.UNKNOWN_REQUEST
    station.confirm(rid, chain[0])
    station.confirm(rid, chain[0])  # idempotent
    # Section 7: the same request id gets the same certificate; so does a new id for the same serial and key.
    assert station.enroll(rid, "CF-0001", csr) == chain
    assert station.enroll(os.urandom(16), "CF-0001", csr) == chain
    # Another key for the same serial is refused; the request id reused for another device too.
    refused = _refused(station, st.ENROLL, st.enroll_body(os.urandom(16), "CF-0001", _device("CF-0001")[1]))
    assert refused.code == 8  # DEVICE_ALREADY_ISSUED
    reused = _refused(station, st.ENROLL, st.enroll_body(rid, "CF-0009", _device("CF-0009")[1]))
    assert reused.code == 1  # BAD_REQUEST
    # PING is answered at once with its token.
    pong = station.request(st.PING, struct.pack(">I", 0xB1D5))
    assert (pong.type, pong.body, pong.sealed) == (st.PONG, struct.pack(">I", 0xB1D5), True)
    station.bye()
    station.transport.close()


def test_serial_enrolment_over_a_pty_pair(appliance: Appliance, tmp_path: Path) -> None:
    station = _serial_station(appliance)
    ca_chain = station.ca_chain()
    key, csr = _device("CF-0002")
    rid = os.urandom(16)
    chain = station.enroll(rid, "CF-0002", csr)
    _check_chain(tmp_path, "CF-0002", key, chain, ca_chain)
    station.confirm(rid, chain[0])
    assert station.enroll(rid, "CF-0002", csr) == chain
    station.bye()
    station.transport.close()


# -- the error cases the specification promises --------------------------------------------------------------------
def _forged(station: st.Station, message_type: int, body: bytes) -> bytes:
    """A sealed frame with one tag bit flipped and a CRC that matches: tampering, not noise."""
    wire = bytearray(station.seal(message_type, body))
    wire[-5] ^= 0x01
    return bytes(wire[:-4]) + struct.pack(">I", st.zlib.crc32(bytes(wire[:-4])))


@pytest.mark.parametrize("transport", ["tls", "serial"])
def test_bad_tag_replay_and_no_session(appliance: Appliance, transport: str) -> None:
    station = _tls_station(appliance) if transport == "tls" else _serial_station(appliance)
    station.send_raw(_forged(station, st.PING, struct.pack(">I", 1)))
    reply = station.receive()
    assert (
        reply.sealed and reply.type == st.ERROR and st.parse_error(reply.body)[:2] == (bytes(16), st.BAD_TAG)
    )
    pong = station.request(st.PING, struct.pack(">I", 2))  # the session goes on
    assert pong.type == st.PONG
    station.send_raw(station.sent[-1])  # that PING again, byte for byte
    reply = station.receive()
    assert reply.sealed and reply.type == st.ERROR and st.parse_error(reply.body)[1] == st.REPLAY
    # A plain request inside a session is refused (sealed).
    station.send_raw(st.frame(st.GET_CA_CHAIN, b"\x00"))
    reply = station.receive()
    assert reply.sealed and st.parse_error(reply.body)[1] == st.UNEXPECTED_MESSAGE
    # After BYE there is no session: a sealed frame (under the old keys) gets a plain NO_SESSION.
    keys = station.keys
    station.bye()
    station.keys = keys
    station.send(st.PING, struct.pack(">I", 3))
    assert _plain_error(station)[0] == st.NO_SESSION
    station.transport.close()


def test_station_ids_other_than_the_certificates_owner_are_unknown_alike(appliance: Appliance) -> None:
    other = st.Bundle.load(appliance.bundles / LAN_2)
    answers = {}
    for station_id, key in (
        ("nobody", other.key),
        (LAN_2, other.key),
    ):  # unregistered, and registered elsewhere
        _, transport = _tls(appliance, LAN)
        with contextlib.closing(transport), pytest.raises(st.Refused) as refused:
            st.Station(transport, station_id, key).handshake()
        assert (refused.value.code, refused.value.sealed) == (st.UNKNOWN_STATION, False)
        answers[station_id] = refused.value.text
    assert answers["nobody"] == answers[LAN_2], "the answer must not tell which station ids exist"
    _, transport = _tls(appliance, LAN)
    with contextlib.closing(transport), pytest.raises(st.Refused) as wrong_key:
        st.Station(transport, LAN, bytes(32)).handshake()
    assert wrong_key.value.code == st.AUTH_FAILED
    _tls_station(appliance, LAN_2).transport.close()  # its own certificate with its own id works


def test_a_station_id_other_than_the_ports_owner_is_unknown(appliance: Appliance) -> None:
    transport = st.PtyTransport(appliance.fixture_port)
    with contextlib.closing(transport):
        lan = st.Bundle.load(appliance.bundles / LAN)
        with pytest.raises(st.Refused) as refused:
            st.Station(transport, LAN, lan.key).handshake(timeout=60)
    assert (refused.value.code, refused.value.sealed) == (st.UNKNOWN_STATION, False)


# -- timers (section 9) ---------------------------------------------------------------------------------------------
def test_tls_handshake_and_idle_timers(quick_timers: Appliance) -> None:
    bundle, transport = _tls(quick_timers)
    silent = st.Station(transport, bundle.name, bundle.key)  # connects and never says HELLO
    assert _plain_error(silent)[0] == st.TIMEOUT
    _closed(silent)
    idle = _tls_station(quick_timers)
    assert idle.request(st.PING, b"\x00\x00\x00\x01").type == st.PONG
    bye = idle.receive()  # then nothing: the appliance ends the session, authentically, and the connection
    assert (bye.type, bye.sealed, bye.body) == (st.BYE, True, struct.pack(">H", st.TIMEOUT))
    _closed(idle)


def test_serial_handshake_and_idle_timers(quick_timers: Appliance) -> None:
    station = _serial_station(quick_timers)  # the port is open and answering
    station.bye()
    station.hello()
    challenge = station.receive()
    assert challenge.type == st.CHALLENGE and not challenge.sealed
    assert _plain_error(station)[0] == st.TIMEOUT  # AUTH never came: the half-open handshake is forgotten
    station.handshake()  # the port stays open
    bye = station.receive()
    assert (bye.type, bye.sealed, bye.body) == (st.BYE, True, struct.pack(">H", st.TIMEOUT))
    station.handshake()  # and again after an idle session
    assert station.request(st.PING, b"\x00\x00\x00\x02").type == st.PONG
    station.transport.close()
