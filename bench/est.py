"""EST throughput against the station LAN front end, in the same run of the same daemon.

    python bench/est.py [--clients 8] [--devices 50]

A fresh appliance (SoftHSM2 token, CAs, journal) runs as its own process (`birthline run`) with the station LAN
listener and an EST listener. `--clients` LAN stations are registered, each with an EST label acting as it
(authenticated by the station's TLS client certificate). Then, one after the other:

- station LAN: every station enrols and confirms `--devices` devices over the station protocol (stations.simulator);
- EST: one fixture client per label (stations/est.py, one kept-alive TLS connection, in its own thread) enrols
  `--devices` devices with simpleenroll.

Keys and CSRs are made before each clock starts. Prints certificates/s and p50/p99 per device for both, and
their ratio. Both front ends share this machine's cores with the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import dataclasses
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.config import load_config
from bench.stations import CONFIG, _free_port, _setup, _wait_listening
from hsm.softhsm import create_softhsm_token
from stations.est import EstClient
from stations.simulator import simulate


def _csr(serial: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def _percentile(values: list[float], q: float) -> float:
    if len(values) < 2:
        return values[0] if values else 0.0
    return statistics.quantiles(values, n=100, method="inclusive")[min(98, max(0, round(q * 100) - 1))]


def _est_line(url: str, ca: Path, bundle: Path, csrs: list[bytes]) -> list[float]:
    latencies = []
    with EstClient(url, cafile=ca, cert=bundle / "tls-client.crt", key=bundle / "tls-client.key") as client:
        client.connect()
        for csr in csrs:
            t0 = time.perf_counter()
            client.simpleenroll(csr)
            latencies.append(time.perf_counter() - t0)
    return latencies


async def run(clients: int, devices: int) -> int:
    with tempfile.TemporaryDirectory(prefix="birthline-bench-est-") as tmp:
        base = Path(tmp)
        port, est_port = _free_port(), _free_port()
        token = create_softhsm_token(base / "softhsm", label="bench")
        text = CONFIG.format(base=base, module=token.module, label=token.label, pin=token.pin_file,
                             conf=token.conf_path, port=port)  # fmt: skip
        text += f'[est]\nlisten = "127.0.0.1:{est_port}"\n'
        for i in range(clients):
            text += f'[est.labels.l{i:02d}]\nstation = "lan{i:02d}"\nstation_certificate = true\n'
        (base / "birthline.toml").write_text(text)
        config = load_config(base / "birthline.toml")
        sims = [
            dataclasses.replace(s, host="127.0.0.1", tcp_port=port) for s in _setup(config, base, 0, clients)
        ]
        run_id = secrets.token_hex(4)
        est_csrs = [[_csr(f"EST{i:02d}-{run_id}-{n:06d}") for n in range(devices)] for i in range(clients)]
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(base / "birthline.toml")],
            stderr=subprocess.DEVNULL,
        )
        try:
            await _wait_listening(port, proc)
            await _wait_listening(est_port, proc)
            lan = await simulate(sims, devices, prefix="LAN")
            ca = base / "tls" / "management-ca.crt"
            loop = asyncio.get_running_loop()
            with concurrent.futures.ThreadPoolExecutor(clients) as pool:
                t0 = time.perf_counter()
                lines = await asyncio.gather(*(
                    loop.run_in_executor(pool, _est_line, f"https://127.0.0.1:{est_port}/.well-known/est/l{i:02d}",
                                         ca, base / "bundles" / f"lan{i:02d}", est_csrs[i])
                    for i in range(clients)
                ))  # fmt: skip
                est_elapsed = time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
    latencies = [x for line in lines for x in line]
    est_rate = len(latencies) / est_elapsed
    print(f"{clients} clients x {devices} devices, one daemon (`birthline run`), this machine's cores shared")
    print(f"  station LAN (enrol + confirm): {lan.ok}/{lan.devices} in {lan.elapsed:.1f} s ="
          f" {lan.devices_per_s:.0f} certificates/s; p50 {lan.percentile(0.5) * 1000:.0f} ms,"
          f" p99 {lan.percentile(0.99) * 1000:.0f} ms")  # fmt: skip
    print(f"  EST simpleenroll:              {len(latencies)}/{clients * devices} in {est_elapsed:.1f} s ="
          f" {est_rate:.0f} certificates/s; p50 {_percentile(latencies, 0.5) * 1000:.0f} ms,"
          f" p99 {_percentile(latencies, 0.99) * 1000:.0f} ms")  # fmt: skip
    print(f"  EST / station LAN: {est_rate / lan.devices_per_s:.2f}")
    return 0 if lan.failures == 0 and len(latencies) == clients * devices else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--devices", type=int, default=50)
    args = p.parse_args()
    return asyncio.run(run(args.clients, args.devices))


if __name__ == "__main__":
    sys.exit(main())
