"""SCEP throughput against the station LAN front end, same daemon, same run.

    python bench/scep.py [--clients 20] [--devices 10] [--rounds 3]

A fresh appliance (SoftHSM2 token, root/issuing/management CAs, durable journal) runs as its own process
(`birthline run`) with the LAN station listener and a SCEP label acting as one of the LAN stations, both on
one work order. In alternated rounds:
- LAN: `--clients` simulated stations over TLS, each enrolling and confirming `--devices` devices (P-256 keys);
- SCEP: `--clients` concurrent HTTP clients (appliance/scep/client.py, what the tests speak), each sending
  `--devices` PKCSReq (RSA-2048 keys, AES-256 and SHA-256, a work-order challenge password) over keep-alive
  connections and reading each CertRep (checking the RA's signature, decrypting the certificate).
Keys and CSRs are made before each clock starts; the clients run on this machine beside the daemon, and a SCEP
client's work per device (an RSA signature, an RSA encryption, an RSA decryption) is larger than a LAN
fixture's. Prints certificates/s and p50/p99 per device for each front end, and their ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import AttributeOID, NameOID

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.audit.log import AuditLog
from appliance.config import load_config
from appliance.production.users import Role, User
from appliance.runtime import open_core
from appliance.scep import challenges, client
from appliance.scep.oids import MessageType, PkiStatus
from bench.stations import _config, _free_port, _setup, _wait_listening
from stations.simulator import simulate

LABEL = "bench"
SCEP_SECTION = """
[scep]
listen = "127.0.0.1:{port}"
max_connections = 256
max_connections_per_peer = 256
[scep.labels.{label}]
station = "{station}"
"""


@dataclass
class Device:
    serial: str
    key_pem: bytes
    csr_der: bytes


@dataclass
class Round:
    front_end: str
    devices: int
    elapsed: float
    latencies: list[float] = field(default_factory=list)
    failures: int = 0

    @property
    def rate(self) -> float:
        return (self.devices - self.failures) / self.elapsed if self.elapsed else 0.0

    def line(self) -> str:
        lat = sorted(self.latencies) or [0.0]
        p99 = lat[min(len(lat) - 1, int(len(lat) * 0.99))]
        return (f"{self.front_end:4s} {self.devices} devices in {self.elapsed:.2f} s = {self.rate:.1f} certificates/s;"
                f" per device p50 {statistics.median(lat) * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms;"
                f" failures {self.failures}")  # fmt: skip


def _make_device(args: tuple[str, str]) -> Device:
    serial, challenge = args
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]))
        .add_attribute(AttributeOID.CHALLENGE_PASSWORD, challenge.encode())
        .sign(key, hashes.SHA256())
    )
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())  # fmt: skip
    return Device(serial, pem, csr.public_bytes(serialization.Encoding.DER))


def make_devices(count: int, prefix: str, challenge: str) -> list[Device]:
    """RSA-2048 keys take long to make: in worker processes, before the clock starts."""
    tag = secrets.token_hex(4)
    jobs = [(f"{prefix}-{tag}-{i:06d}", challenge) for i in range(count)]
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
        return list(pool.map(_make_device, jobs, chunksize=8))


async def scep_round(url: str, ra: x509.Certificate, batches: list[list[Device]]) -> Round:
    prepared = []
    for batch in batches:  # the signer certificates too, before the clock
        one = []
        for d in batch:
            key = serialization.load_pem_private_key(d.key_pem, None)
            assert isinstance(key, rsa.RSAPrivateKey)
            one.append((d, key, client.self_signed(key, d.serial)))
        prepared.append(one)
    report = Round("SCEP", sum(len(b) for b in batches), 0.0)

    async def one_client(devices: list[tuple[Device, rsa.RSAPrivateKey, x509.Certificate]]) -> None:
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as http:
            for device, key, signer in devices:
                t0 = time.perf_counter()
                tid, nonce = secrets.token_hex(16), secrets.token_bytes(16)
                data = client.request(MessageType.PKCS_REQ, device.csr_der, signer=signer, key=key, ra=ra,
                                      transaction_id=tid, sender_nonce=nonce)  # fmt: skip
                try:
                    async with http.post(f"{url}?operation=PKIOperation", data=data,
                                         headers={"Content-Type": "application/x-pki-message"}) as r:  # fmt: skip
                        body = await r.read()
                        status = r.status
                    ok = status == 200 and client.read_reply(
                        body, ra=ra, signer=signer, key=key, transaction_id=tid, sender_nonce=nonce
                    ).status is PkiStatus.SUCCESS  # fmt: skip
                except (aiohttp.ClientError, client.ReplyError, ValueError):
                    ok = False
                if ok:
                    report.latencies.append(time.perf_counter() - t0)
                else:
                    report.failures += 1

    start = time.perf_counter()
    await asyncio.gather(*(one_client(b) for b in prepared))
    report.elapsed = time.perf_counter() - start
    return report


async def bench(clients: int, devices: int, rounds: int) -> list[Round]:
    with tempfile.TemporaryDirectory(prefix="birthline-bench-scep-") as tmp:
        base = Path(tmp)
        lan_port, scep_port = _free_port(), _free_port()
        config = _config(base, lan_port)
        sims = [replace(s, host="127.0.0.1", tcp_port=lan_port) for s in _setup(config, base, 0, clients)]
        path = base / "birthline.toml"
        # Every simulated station connects from 127.0.0.1: the per-peer cap (16 by default) would refuse some.
        text = path.read_text().replace("[stations]\n", "[stations]\nmax_connections_per_peer = 128\n", 1)
        path.write_text(text + SCEP_SECTION.format(port=scep_port, label=LABEL, station=sims[0].name))
        config = load_config(path)
        with open_core(config) as core:
            admin = User("bench-admin", Role.ADMINISTRATOR)
            _, secret = challenges.add(
                core.journal, AuditLog(core.journal), admin, LABEL, work_order="WO-BENCH"
            )
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(path)],
            stderr=subprocess.DEVNULL,
        )
        results: list[Round] = []
        try:
            await _wait_listening(lan_port, proc)
            await _wait_listening(scep_port, proc)
            ra = x509.load_pem_x509_certificate((config.stations.tls_dir / "scep-ra.pem").read_bytes())
            url = f"http://127.0.0.1:{scep_port}/scep/{LABEL}"
            for r in range(rounds):
                report = await simulate(sims, devices, prefix=f"LAN{r}")
                results.append(Round("LAN", report.devices, report.elapsed, list(report.latencies),
                                     report.failures))  # fmt: skip
                batches = [make_devices(devices, f"SCEP{r}{i:03d}", secret) for i in range(clients)]
                results.append(await scep_round(url, ra, batches))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=60)
    return results


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=20, help="LAN stations, and SCEP clients")
    p.add_argument(
        "--devices", type=int, default=10, help="devices per station and per SCEP client, per round"
    )
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    results = asyncio.run(bench(args.clients, args.devices, args.rounds))
    for r in results:
        print(r.line())
    lan = statistics.median(r.rate for r in results if r.front_end == "LAN")
    scep = statistics.median(r.rate for r in results if r.front_end == "SCEP")
    print(f"median over rounds: LAN {lan:.1f} certificates/s, SCEP {scep:.1f} certificates/s; SCEP/LAN"
          f" {scep / lan:.0%}")  # fmt: skip
    return 0 if all(r.failures == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
