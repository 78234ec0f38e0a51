"""Shared pieces for the transport and client tests: throwaway TLS certificates and the two link harnesses
(TLS over 127.0.0.1, a socat pty pair) that serve a FakeAppliance and hand out client connectors."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from stations.client import Connector, client_ssl_context
from stations.simulator import PtyPair
from stations.transports.base import ChannelClosed, FrameChannel
from stations.transports.serial import SerialChannel
from stations.transports.stream import StreamChannel
from tests.stations.fake_appliance import FakeAppliance

STATION_ID = "line1-st03"
STATION_KEY = bytes(range(32))


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    if server:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return b.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=str(self.ca))
        ctx.load_cert_chain(str(self.server_cert), str(self.server_key))
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.client_cert, self.client_key, self.ca)


def make_tls_files(directory: Path) -> TlsFiles:
    def pem_key(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    ca_key, srv_key, cli_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = _cert("Test Management CA", ca_key, "Test Management CA", ca_key, ca=True)
    files = TlsFiles(
        *(directory / n for n in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key"))
    )
    files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    srv = _cert("127.0.0.1", srv_key, "Test Management CA", ca_key, ca=False, server=True)
    files.server_cert.write_bytes(srv.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(pem_key(srv_key))
    cli = _cert(f"station {STATION_ID}", cli_key, "Test Management CA", ca_key, ca=False)
    files.client_cert.write_bytes(cli.public_bytes(serialization.Encoding.PEM))
    files.client_key.write_bytes(pem_key(cli_key))
    return files


def fake_chain() -> tuple[bytes, ...]:
    return (b"\x30\x08issuing!", b"\x30\x05root!")


@contextlib.asynccontextmanager
async def tls_link(appliance: FakeAppliance, tmp: Path) -> AsyncIterator[Connector]:
    """A TLS listener on 127.0.0.1 serving ``appliance``; yields a connector for the client side."""
    files = make_tls_files(tmp)
    tasks: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await appliance.serve(StreamChannel(reader, writer))
        finally:
            tasks.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=files.server_context())
    port = server.sockets[0].getsockname()[1]
    client_ctx = files.client_context()

    async def connector() -> FrameChannel:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx)
        except OSError as exc:
            raise ChannelClosed(str(exc)) from exc
        return StreamChannel(reader, writer)

    try:
        yield connector
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


@contextlib.asynccontextmanager
async def serial_link(
    appliance: FakeAppliance, tmp: Path, *, baud: int = 115200, pace: bool = False
) -> AsyncIterator[Connector]:
    """A socat pty pair; the appliance end is served (and reopened after each drop, like the daemon)."""
    pair = PtyPair(tmp / "appliance-port", tmp / "fixture-port").start()
    opened = asyncio.Event()

    async def appliance_loop() -> None:
        while True:
            try:
                channel = await SerialChannel.open(pair.a, baud, pace=pace)
            except ChannelClosed:
                await asyncio.sleep(0.05)
                continue
            opened.set()
            await appliance.serve(channel)

    task = asyncio.create_task(appliance_loop())
    await asyncio.wait_for(opened.wait(), 5)  # bytes written before the appliance opens its end are lost

    async def connector() -> FrameChannel:
        return await SerialChannel.open(pair.b, baud, pace=pace)

    try:
        yield connector
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        pair.stop()
