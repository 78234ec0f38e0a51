"""Station link throughput.

    python bench/stations.py serial [--stations S] [--devices M] [--baud B]
    python bench/stations.py lan [--stations 50] [--devices M]      (in-process fake appliance over TLS)

(a) serial: each station is a socat pty pair paced to the baud rate at BOTH ends (a pty pair does not enforce
    a line rate), so every byte costs real wire time. Devices/s per station is set against the wire-time
    limit for the bytes actually exchanged per device in both directions (ENROLL, CERT, CONFIRM, CONFIRMED:
    bytes * 10 / baud seconds, half duplex in practice because each message waits for the previous one).
    Target: at least 90 % of that limit. The appliance here is ``stations.fake_appliance`` issuing real
    P-256 certificates in-process; ``bench_serial(serve=...)`` takes any other server loop (the real daemon).
(b) lan: ``bench_lan(stations, devices)`` runs N concurrent simulated stations (``SimStation`` credentials)
    against a running appliance and reports certs/s and p50/p99 latency; ``lan`` on the command line runs it
    against an in-process TLS fake appliance so the harness itself can be checked.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import ssl
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from stations.client import StationClient
from stations.fake_appliance import FakeAppliance
from stations.messages import Enroll
from stations.simulator import PtyPair, SimReport, SimStation, make_devices, simulate
from stations.transports.base import ChannelClosed, FrameChannel
from stations.transports.serial import SerialChannel, wire_time
from stations.transports.stream import StreamChannel

ServeFn = Callable[[FrameChannel], Coroutine[Any, Any, None]]


class _Issuer:
    """Root -> issuing CA -> device, all P-256, so the CERT frame carries realistic sizes."""

    def __init__(self) -> None:
        self.root_key = ec.generate_private_key(ec.SECP256R1())
        self.key = ec.generate_private_key(ec.SECP256R1())
        root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench"),
                               x509.NameAttribute(NameOID.COMMON_NAME, "Bench Device Root CA")])  # fmt: skip
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Bench"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "Bench Device Issuing CA")])  # fmt: skip
        self.root = self._ca(root_name, root_name, self.root_key.public_key(), self.root_key, 1)
        self.issuing = self._ca(name, root_name, self.key.public_key(), self.root_key, 0)

    @staticmethod
    def _ca(
        subject: x509.Name, issuer: x509.Name, public: ec.EllipticCurvePublicKey,
        signer: ec.EllipticCurvePrivateKey, path_len: int,
    ) -> x509.Certificate:  # fmt: skip
        now = dt.datetime.now(dt.UTC)
        return (
            x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
            .serial_number(x509.random_serial_number()).not_valid_before(now)
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=path_len), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(signer, hashes.SHA256())
        )  # fmt: skip

    def chain(self) -> tuple[bytes, ...]:
        return tuple(c.public_bytes(serialization.Encoding.DER) for c in (self.issuing, self.root))

    def __call__(self, enroll: Enroll) -> bytes:
        csr = x509.load_der_x509_csr(enroll.csr)
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder().subject_name(csr.subject).issuer_name(self.issuing.subject)
            .public_key(csr.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(dt.datetime(9999, 12, 31, 23, 59, 59, tzinfo=dt.UTC))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )  # fmt: skip
        return cert.public_bytes(serialization.Encoding.DER)


def fake_appliance(keys: dict[str, bytes]) -> FakeAppliance:
    issuer = _Issuer()
    return FakeAppliance(keys, issuer.chain(), issue=issuer)


async def bench_serial(
    stations: int = 1, devices: int = 20, baud: int = 115200, *, serve: ServeFn | None = None
) -> dict[str, float]:
    """Part (a). ``serve(channel)`` is the appliance loop for one opened port (default: the fake appliance,
    which returns when the link drops); the appliance end is opened paced, like the fixture end."""
    keys = {f"bench-st{i:02d}": bytes([i + 1]) * 32 for i in range(stations)}
    serve_fn: ServeFn = serve or fake_appliance(keys).serve
    batches = [make_devices(devices, f"B{i:02d}") for i in range(stations)]
    with tempfile.TemporaryDirectory(prefix="birthline-bench-") as tmp:
        pairs = [PtyPair(Path(tmp) / f"{n}.appliance", Path(tmp) / f"{n}.fixture").start() for n in keys]
        tasks: list[asyncio.Task[None]] = []
        try:
            for pair in pairs:
                channel = await SerialChannel.open(pair.a, baud, pace=True)
                tasks.append(asyncio.create_task(serve_fn(channel)))
            clients = [
                await StationClient.connect_serial(pair.b, baud, station_id=name, key=key, pace=True)
                for pair, (name, key) in zip(pairs, keys.items(), strict=True)
            ]
            snapshot = [_bytes(c) for c in clients]  # after the handshake: count devices only

            async def run(client: StationClient, batch: Sequence[tuple[str, bytes]]) -> float:
                start = time.perf_counter()
                for serial, csr in batch:
                    chain = await client.enroll(serial, csr)
                    assert client.last_request_id is not None
                    await client.confirm(client.last_request_id, chain[0])
                return time.perf_counter() - start

            elapsed = await asyncio.gather(*(run(c, b) for c, b in zip(clients, batches, strict=True)))
            moved = [sum(_bytes(c)) - sum(s) for c, s in zip(clients, snapshot, strict=True)]
            for c in clients:
                await c.close()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for pair in pairs:
                pair.stop()
    per_device = sum(moved) / (stations * devices)
    limit = 1 / wire_time(round(per_device), baud)
    rate = sum(devices / e for e in elapsed) / stations
    return {"bytes_per_device": per_device, "devices_per_s_per_station": rate, "wire_limit": limit,
            "ratio": rate / limit, "stations": stations, "baud": baud}  # fmt: skip


def _bytes(client: StationClient) -> tuple[int, int]:
    ch = client.channel
    assert isinstance(ch, SerialChannel)
    return ch.bytes_sent, ch.bytes_received


async def bench_lan(stations: Sequence[SimStation], devices: int) -> SimReport:
    """Part (b): N concurrent LAN stations against a running appliance (the lead wires ``stations`` from the
    registry's TLS bundles); prints certs/s and p50/p99 per-device latency (enrol + confirm)."""
    report = await simulate(stations, devices)
    print(report.summary())
    return report


async def _lan_with_fake(stations: int, devices: int) -> SimReport:
    from tests.stations.transport_support import make_tls_files

    keys = {f"lan-st{i:02d}": bytes([i + 1]) * 32 for i in range(stations)}
    appliance = fake_appliance(keys)
    with tempfile.TemporaryDirectory(prefix="birthline-bench-") as tmp:
        files = make_tls_files(Path(tmp))

        async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await appliance.serve(StreamChannel(r, w))

        server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=files.server_context(), backlog=256)
        port = server.sockets[0].getsockname()[1]
        ctx: ssl.SSLContext = files.client_context()
        sims = [SimStation(n, "lan", k, host=str(ipaddress.ip_address("127.0.0.1")), tcp_port=port, ssl_context=ctx)
                for n, k in keys.items()]  # fmt: skip
        try:
            return await bench_lan(sims, devices)
        finally:
            server.close()
            with contextlib.suppress(ChannelClosed):
                await server.wait_closed()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("serial")
    s.add_argument("--stations", type=int, default=1)
    s.add_argument("--devices", type=int, default=20)
    s.add_argument("--baud", type=int, default=115200)
    lan = sub.add_parser("lan")
    lan.add_argument("--stations", type=int, default=50)
    lan.add_argument("--devices", type=int, default=20)
    args = p.parse_args()
    if args.part == "serial":
        r = asyncio.run(bench_serial(args.stations, args.devices, args.baud))
        print(
            f"serial {r['baud']:.0f} baud, {r['stations']:.0f} station(s): {r['bytes_per_device']:.0f} bytes/device "
            f"both directions -> wire limit {r['wire_limit']:.3f} devices/s per station; "
            f"measured {r['devices_per_s_per_station']:.3f} devices/s per station = {r['ratio'] * 100:.1f} % "
            f"of the limit (target >= 90 %)"
        )
        return 0 if r["ratio"] >= 0.9 else 1
    report = asyncio.run(_lan_with_fake(args.stations, args.devices))
    return 0 if report.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
