"""Station link throughput against the real daemon (HSM-backed issuance, durable journal).

    python bench/stations.py serial [--stations S] [--devices M] [--baud B]
    python bench/stations.py lan [--stations 50] [--devices M]

Both parts build a fresh appliance in a temporary directory (SoftHSM2 token, root/issuing/management CAs,
journal) and run `appliance.daemon.Daemon` in-process with simulated fixtures (`stations.client`).

(a) serial: each station is a socat pty pair. A pty pair does not enforce a line rate, so the fixture paces
    its writes and the bytes it reads to the baud rate: every byte in both directions costs wire time.
    Devices/s per station is set against the wire-time limit for the bytes actually exchanged per device
    (ENROLL, CERT, CONFIRM, CONFIRMED: bytes * 10 / baud, 8N1). Target: at least 90 % of that limit.
(b) lan: N concurrent stations over TLS, each enrolling and confirming M devices: certificates/s and p50/p99
    latency per device, with the raw HSM sign rate (C_Sign in a loop, same token key) of the same run beside.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance import ca as ca_mod
from appliance import stations_registry as registry
from appliance.config import Config, load_config
from appliance.daemon import Daemon
from appliance.runtime import open_core
from bench.issue import floor, raw_sign_rate
from hsm.softhsm import create_softhsm_token
from stations.client import StationClient, client_ssl_context
from stations.simulator import PtyPair, SimReport, SimStation, make_devices, simulate
from stations.transports.serial import SerialChannel, wire_time

CONFIG = """\
[appliance]
state_dir = "{base}/state"
[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "{pin}"
softhsm_conf = "{conf}"
[stations]
lan_listen = "127.0.0.1:{port}"
tls_dir = "{base}/tls"
reopen_interval_s = 0.1
# Every simulated station connects from 127.0.0.1: one address holds all of them (a plant's stations each
# have their own), so the per-address cap is raised to the whole listener's.
max_connections = 512
max_connections_per_peer = 512
[va]
listen = "127.0.0.1:0"
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _config(base: Path, port: int = 0) -> Config:
    token = create_softhsm_token(base / "softhsm", label="bench")
    path = base / "birthline.toml"
    path.write_text(
        CONFIG.format(
            base=base,
            module=token.module,
            label=token.label,
            pin=token.pin_file,
            conf=token.conf_path,
            port=port,
        )
    )
    return load_config(path)


def _setup(config: Config, base: Path, serial: int, lan: int) -> list[SimStation]:
    sims: list[SimStation] = []
    with open_core(config) as core:
        ca_mod.create_root(core.journal, core.token, "root", "O=Bench,CN=Bench Root CA")
        ca_mod.create_issuing(core.journal, core.token, "issuing", "O=Bench,CN=Bench Birth CA", "root")
        ca_mod.create_management(core.journal, core.token, "management", "O=Bench,CN=Bench Management CA")
        for i in range(serial):
            port = str(base / "pty" / f"serial{i:02d}.appliance")
            creds = registry.add_station(
                core.journal,
                core.token,
                f"serial{i:02d}",
                "serial",
                port=port,
                audit=core.audit,
                actor="bench",
            )
            sims.append(SimStation(creds.record.name, "serial", creds.record.key, port=port))
        for i in range(lan):
            creds = registry.add_station(
                core.journal, core.token, f"lan{i:02d}", "lan", audit=core.audit, actor="bench"
            )
            bundle = registry.write_bundle(creds, base / "bundles" / creds.record.name)
            ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
            sims.append(SimStation(creds.record.name, "lan", creds.record.key, ssl_context=ctx,
                                   server_hostname="localhost"))  # fmt: skip
        # The daemon always enforces work orders: put the stations on a line with one for the bench's serials.
        floor(
            core.journal,
            10_000_000,
            stations=[s.name for s in sims],
            pattern="[A-Z0-9]+-[0-9a-f]{8}-[0-9]{6}",
        )
    (base / "pty").mkdir(exist_ok=True)
    return sims


@asynccontextmanager
async def appliance(base: Path, serial: int, lan: int) -> AsyncIterator[tuple[Daemon, list[SimStation]]]:
    """A fresh appliance with `serial` serial and `lan` LAN stations registered, running."""
    config = _config(base)
    sims = _setup(config, base, serial, lan)
    async with Daemon(config) as daemon:
        addr = daemon.lan_address
        assert addr is not None
        yield (
            daemon,
            [dataclasses.replace(s, host=addr[0], tcp_port=addr[1]) if s.kind == "lan" else s for s in sims],
        )


async def bench_serial(stations: int, devices: int, baud: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="birthline-bench-") as tmp:
        base = Path(tmp)
        async with appliance(base, stations, 0) as (_daemon, sims):
            batches = [make_devices(devices, f"B{i:02d}") for i in range(stations)]
            pairs = [PtyPair(s.port or "", base / "pty" / f"{s.name}.fixture").start() for s in sims]
            try:
                clients = [
                    await StationClient.connect_serial(
                        pair.b,
                        baud,
                        station_id=s.name,
                        key=s.key,
                        pace=True,
                        pace_reads=True,
                        give_up_after=30,
                    )
                    for pair, s in zip(pairs, sims, strict=True)
                ]
                for c in clients:
                    await c.ca_chain()  # authenticated and warm before the clock starts
                snapshot = [_bytes(c) for c in clients]

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


async def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"birthline run exited with {proc.returncode}")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.1)
            continue
        writer.close()
        return
    raise RuntimeError("birthline run did not start listening")


async def bench_lan(stations: int, devices: int) -> tuple[SimReport, float, float]:
    """The daemon runs as its own process (`birthline run`), as on the appliance; the simulated fixtures,
    which on a line are separate machines, run here. Both share this machine's cores."""
    with tempfile.TemporaryDirectory(prefix="birthline-bench-") as tmp:
        base = Path(tmp)
        port = _free_port()
        config = _config(base, port)
        sims = [
            dataclasses.replace(s, host="127.0.0.1", tcp_port=port) for s in _setup(config, base, 0, stations)
        ]
        with open_core(config) as core:
            label = core.issuing_ca().key_label
            raw_before = raw_sign_rate(core.token, label, 20000)
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(base / "birthline.toml")],
            stderr=subprocess.DEVNULL,
        )
        try:
            await _wait_listening(port, proc)
            report = await simulate(sims, devices, prefix="LAN")
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        with open_core(config) as core:
            raw_after = raw_sign_rate(core.token, label, 20000)
    return report, raw_before, raw_after


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("serial")
    s.add_argument("--stations", type=int, default=2)
    s.add_argument("--devices", type=int, default=20)
    s.add_argument("--baud", type=int, default=115200)
    lan = sub.add_parser("lan")
    lan.add_argument("--stations", type=int, default=50)
    lan.add_argument("--devices", type=int, default=40)
    args = p.parse_args()
    if args.part == "serial":
        r = asyncio.run(bench_serial(args.stations, args.devices, args.baud))
        print(
            f"(a) serial {r['baud']:.0f} baud, {r['stations']:.0f} station(s), real daemon:"
            f" {r['bytes_per_device']:.0f} bytes/device both directions -> wire limit"
            f" {r['wire_limit']:.3f} devices/s per station; measured {r['devices_per_s_per_station']:.3f}"
            f" devices/s per station = {r['ratio']:.1%} of the limit (target >= 90%)"
        )
        return 0
    report, before, after = asyncio.run(bench_lan(args.stations, args.devices))
    raw = (before + after) / 2
    print(f"(b) LAN over TLS, real daemon: {report.summary()}")
    print(f"    certificates/s {report.devices_per_s:.0f}; raw HSM C_Sign {raw:.0f}/s (before {before:.0f},"
          f" after {after:.0f}); ratio {report.devices_per_s / raw:.1%}")  # fmt: skip
    return 0 if report.failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
