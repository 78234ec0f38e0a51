"""The fixture library's edges: credential bundles, the station-client CLI, the sync wrapper and the simulator."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import stat
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from stations.client import connect, enroll_device, load_credentials
from stations.codes import Code
from stations.errors import GaveUp, StationError
from stations.messages import Enroll
from stations.simulator import SimStation, simulate
from stations.transports.base import ChannelClosed
from stations.transports.serial import SerialChannel
from stations.transports.stream import StreamChannel
from tests.stations.fake_appliance import FakeAppliance
from tests.stations.transport_support import STATION_ID, STATION_KEY, make_tls_files


class RealIssuer:
    """Issues genuine X.509 certificates so the PEM output can be checked."""

    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name.from_rfc4514_string("CN=Test Issuing CA")
        now = dt.datetime.now(dt.UTC)
        self.ca = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(self.key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip

    def chain(self) -> tuple[bytes, ...]:
        der = self.ca.public_bytes(serialization.Encoding.DER)
        return (der, der)

    def __call__(self, enroll: Enroll) -> bytes:
        csr = x509.load_der_x509_csr(enroll.csr)
        assert csr.is_signature_valid
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self.ca.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        return cert.public_bytes(serialization.Encoding.DER)


@contextlib.asynccontextmanager
async def lan_appliance(tmp: Path) -> AsyncIterator[tuple[FakeAppliance, int, Path]]:
    """A TLS FakeAppliance and a LAN bundle for it (in the layout `station add --out` writes)."""
    issuer = RealIssuer()
    appliance = FakeAppliance({STATION_ID: STATION_KEY}, issuer.chain(), issue=issuer)
    files = make_tls_files(tmp)

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await appliance.serve(StreamChannel(r, w))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=files.server_context())
    port = server.sockets[0].getsockname()[1]
    bundle = tmp / "bundle"
    bundle.mkdir()
    (bundle / "station.key").write_text(STATION_KEY.hex() + "\n")
    for src, dst in (
        (files.client_cert, "tls-client.crt"),
        (files.client_key, "tls-client.key"),
        (files.ca, "ca.crt"),
    ):
        (bundle / dst).write_bytes(src.read_bytes())
    meta = {
        "name": STATION_ID, "kind": "lan", "key_file": "station.key", "host": f"127.0.0.1:{port}",
        "tls_key_file": "tls-client.key", "tls_cert_file": "tls-client.crt", "ca_file": "ca.crt",
    }  # fmt: skip
    (bundle / "station.json").write_text(json.dumps(meta))
    for secret in ("station.key", "tls-client.key"):  # as `station add` writes them; the CLI refuses wider
        (bundle / secret).chmod(0o600)
    try:
        yield appliance, port, bundle
    finally:
        server.close()
        await server.wait_closed()


def test_load_serial_bundle(tmp_path: Path) -> None:
    (tmp_path / "station.key").write_text("ab" * 32)
    meta = {
        "name": "st1",
        "kind": "serial",
        "port": "/dev/serial/by-path/x",
        "baud": 57600,
        "key_file": "station.key",
    }
    (tmp_path / "station.json").write_text(json.dumps(meta))
    creds = load_credentials(tmp_path)
    assert (creds.kind, creds.port, creds.baud, creds.key) == (
        "serial",
        "/dev/serial/by-path/x",
        57600,
        b"\xab" * 32,
    )
    (tmp_path / "station.key").write_text("abc")
    with pytest.raises(ValueError, match="64 hex"):
        load_credentials(tmp_path)


async def test_cli_enroll_over_tls(tmp_path: Path) -> None:
    from appliance.cli.main import main

    async with lan_appliance(tmp_path) as (appliance, port, bundle):
        out = tmp_path / "out"
        argv = ["station-client", "enroll", "--host", f"127.0.0.1:{port}", "--credentials", str(bundle),
                "--serial", "SN-CLI-1", "--keygen", "--out", str(out)]  # fmt: skip
        assert await asyncio.to_thread(main, argv) == 0
        certs = x509.load_pem_x509_certificates((out / "SN-CLI-1.pem").read_bytes())
        assert len(certs) == 2
        assert stat.S_IMODE((out / "SN-CLI-1.key").stat().st_mode) == 0o600
        assert len(appliance.confirmed) == 1
        # The synchronous wrapper, with a CSR made here and the host from the bundle.
        device = await asyncio.to_thread(enroll_device, bundle, "SN-SYNC-1")
        assert device.key_pem is not None and len(device.chain) == 2
        assert device.request_id in appliance.confirmed


async def test_simulator_serial_paced(tmp_path: Path) -> None:
    issuer = RealIssuer()
    keys = {f"st{i}": bytes([i]) * 32 for i in range(2)}
    appliance = FakeAppliance(keys, issuer.chain(), issue=issuer)
    stations = [SimStation(n, "serial", k, port=str(tmp_path / "dev" / n)) for n, k in keys.items()]

    async def daemon_port(path: str) -> None:  # like the daemon: retry a registered port until it appears
        while True:
            try:
                channel = await SerialChannel.open(path)
            except ChannelClosed:
                await asyncio.sleep(0.02)
                continue
            await appliance.serve(channel)

    tasks = [asyncio.create_task(daemon_port(s.port or "")) for s in stations]
    try:
        report = await simulate(stations, 2, baud=460800, workdir=tmp_path)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert report.ok == 4 and report.failures == 0, report.summary()
    assert len(appliance.confirmed) == 4
    assert report.bytes_sent > 0 and report.bytes_received > 0


def test_a_handshake_round_fits_within_the_appliances_handshake_limit() -> None:
    """docs/station-protocol.md section 9: a station's round (identical HELLO/AUTH resent twice, each try
    waiting the step timer, then the pause before a new nonce) ends before the appliance's handshake timer,
    so a new round never lands on a LAN connection the appliance has already closed."""
    from stations import client, server

    round_s = client.HANDSHAKE_TRIES * client.HANDSHAKE_STEP_TIMEOUT + client.HANDSHAKE_PAUSE
    assert round_s < server.DEFAULT_HANDSHAKE_TIMEOUT
    doc = (Path(__file__).parents[2] / "docs" / "station-protocol.md").read_text(encoding="utf-8")
    row = next(line for line in doc.splitlines() if line.startswith("| handshake step |"))
    assert f"after {client.HANDSHAKE_TRIES} tries wait {client.HANDSHAKE_PAUSE:g} s" in row


@pytest.mark.parametrize(
    ("host", "code", "cause"),
    [
        ("localhost", Code.AUTH_FAILED, "TLS: the appliance's certificate is refused (Hostname mismatch"),
        ("no-such-host.invalid", Code.BAD_REQUEST, "no-such-host.invalid: DNS: no such host"),
    ],
)
async def test_a_certificate_or_name_that_cannot_work_is_said_at_once(
    tmp_path: Path, host: str, code: Code, cause: str
) -> None:
    """Review finding 5: a name the server certificate lacks (or a name that does not resolve) was retried
    silently until give_up_after, then reported as TIMEOUT."""
    async with lan_appliance(tmp_path) as (_, port, bundle):
        with pytest.raises(StationError) as info:
            await connect(load_credentials(bundle), host=f"{host}:{port}", give_up_after=60)
    assert not isinstance(info.value, GaveUp)
    assert info.value.code == code and cause in info.value.text, info.value
