"""Simulated fixtures: N stations enrolling M devices each against a running appliance.

The engine only needs each station's credentials (``SimStation``); where they come from (the appliance's
registry, or ``station add`` bundles) is the caller's business, so this module stays fixture-side.

Serial stations: for each one a socat pty pair is made whose *appliance-side* end is the port path the
appliance has registered for that station (its daemon keeps retrying to open a registered port until it
appears), and whose other end the simulated fixture opens. socat does not enforce a baud rate, so with
``baud`` given the fixture end paces its writes and its reads to that line rate: one paced end models both
directions of a real full-duplex line even though the appliance writes unpaced.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import ssl
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Literal

from stations.client import StationClient, generate_device_key, make_csr
from stations.errors import StationError


@dataclass(frozen=True)
class SimStation:
    name: str
    kind: Literal["serial", "lan"]
    key: bytes = field(repr=False)
    port: str | None = None  # serial: the APPLIANCE-side port path (the socat link the appliance opens)
    host: str | None = None  # lan
    tcp_port: int | None = None
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False, compare=False)
    server_hostname: str | None = None


class PtyPair:
    """``socat -d -d pty,raw,echo=0,link=A pty,raw,echo=0,link=B``: two linked ptys, reachable as A and B.

    ``start`` removes stale links first (a SIGKILLed socat leaves them) and waits until both exist; ``kill``
    simulates an unplug (SIGKILL: the ptys vanish, both ends get EIO); ``stop`` ends it cleanly."""

    def __init__(self, link_a: str | Path, link_b: str | Path) -> None:
        self.a = str(link_a)
        self.b = str(link_b)
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 5.0) -> PtyPair:
        if shutil.which("socat") is None:
            raise RuntimeError("socat is not installed")
        for link in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(link)
        self._proc = subprocess.Popen(
            ["socat", f"pty,raw,echo=0,link={self.a}", f"pty,raw,echo=0,link={self.b}"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        end = time.monotonic() + timeout
        while not (os.path.exists(self.a) and os.path.exists(self.b)):
            if self._proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError(f"socat did not create {self.a} and {self.b}")
            time.sleep(0.002)
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """socat's process id while it runs (a bench counts its CPU: it relays every byte)."""
        return self._proc.pid if self.running and self._proc is not None else None

    def kill(self) -> None:
        """Unplug: SIGKILL socat (the links stay behind, dangling, as after a crash)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()
        self._proc = None

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for link in (self.a, self.b):
            with contextlib.suppress(FileNotFoundError):
                if os.path.islink(link):
                    os.unlink(link)

    def __enter__(self) -> PtyPair:
        return self.start() if not self.running else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


@dataclass
class SimReport:
    stations: int
    devices: int  # attempted
    ok: int = 0
    elapsed: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds per device, enrol + confirm
    errors: Counter[str] = field(default_factory=Counter)
    bytes_sent: int = 0  # fixture -> appliance, serial only
    bytes_received: int = 0

    @property
    def failures(self) -> int:
        return self.devices - self.ok

    @property
    def devices_per_s(self) -> float:
        return self.ok / self.elapsed if self.elapsed > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        if len(self.latencies) == 1:
            return self.latencies[0]
        cuts = statistics.quantiles(self.latencies, n=100, method="inclusive")
        return cuts[min(98, max(0, round(q * 100) - 1))]

    def summary(self) -> str:
        lines = [
            f"{self.stations} station(s), {self.devices} device(s): {self.ok} ok, {self.failures} failed "
            f"in {self.elapsed:.2f} s = {self.devices_per_s:.2f} devices/s "
            f"({self.devices_per_s / max(1, self.stations):.2f} per station)",
            f"latency per device (enrol + confirm): p50 {self.percentile(0.5) * 1000:.1f} ms, "
            f"p99 {self.percentile(0.99) * 1000:.1f} ms",
        ]
        if self.bytes_sent or self.bytes_received:
            lines.append(f"serial bytes: {self.bytes_sent} sent, {self.bytes_received} received")
        lines.extend(f"  error {name}: {count}" for name, count in self.errors.most_common())
        return "\n".join(lines)


def make_devices(count: int, prefix: str) -> list[tuple[str, bytes]]:
    """``count`` (device serial, DER CSR) pairs with fresh P-256 keys; serials are unique per call."""
    tag = secrets.token_hex(4)
    out = []
    for i in range(count):
        serial = f"{prefix}-{tag}-{i:06d}"
        out.append((serial, make_csr(generate_device_key(), serial)))
    return out


async def run_fixture(
    client: StationClient,
    devices: Sequence[tuple[str, bytes]],
    report: SimReport,
    *,
    profile: str | None = None,
) -> None:
    """One fixture's loop: enrol and confirm each device in turn, recording latency and failures."""
    for serial, csr in devices:
        start = time.perf_counter()
        try:
            chain = await client.enroll(serial, csr, profile=profile)
            rid = client.last_request_id
            assert rid is not None
            await client.confirm(rid, chain[0])
        except StationError as exc:
            report.errors[exc.code.name] += 1
            continue
        report.latencies.append(time.perf_counter() - start)
        report.ok += 1


async def _connect(
    station: SimStation, *, fixture_port: str | None, baud: int | None, give_up_after: float
) -> StationClient:
    if station.kind == "serial":
        assert fixture_port is not None
        return await StationClient.connect_serial(
            fixture_port,
            baud or 115200,
            station_id=station.name,
            key=station.key,
            pace=baud is not None,
            pace_reads=baud is not None,
            give_up_after=give_up_after,
        )
    if station.host is None or station.tcp_port is None:
        raise ValueError(f"LAN station {station.name} has no appliance address")
    return await StationClient.connect_tcp(
        station.host,
        station.tcp_port,
        station_id=station.name,
        key=station.key,
        ssl_context=station.ssl_context,
        server_hostname=station.server_hostname,
        give_up_after=give_up_after,
    )


async def simulate(
    stations: Sequence[SimStation],
    devices_per_station: int,
    *,
    baud: int | None = None,
    profile: str | None = None,
    prefix: str = "SIM",
    workdir: str | Path | None = None,
    give_up_after: float = 60.0,
) -> SimReport:
    """Run every station concurrently, ``devices_per_station`` devices each; returns the figures.

    Devices (keys, CSRs) are made before the clock starts. Connection and authentication are timed too,
    since a real shift pays them once per station."""
    report = SimReport(len(stations), len(stations) * devices_per_station)
    batches = [make_devices(devices_per_station, f"{prefix}{i:03d}") for i in range(len(stations))]
    pairs: list[PtyPair] = []
    tmp = tempfile.TemporaryDirectory(prefix="birthline-sim-") if workdir is None else None
    base = Path(tmp.name if tmp is not None else str(workdir))
    clients: list[StationClient] = []
    try:
        fixture_ports: list[str | None] = []
        for station in stations:
            if station.kind == "serial":
                if not station.port:
                    raise ValueError(f"serial station {station.name} has no registered port")
                Path(station.port).parent.mkdir(parents=True, exist_ok=True)
                pair = PtyPair(station.port, base / f"{station.name}.fixture").start()
                pairs.append(pair)
                fixture_ports.append(pair.b)
            else:
                fixture_ports.append(None)

        async def one(station: SimStation, port: str | None, devices: list[tuple[str, bytes]]) -> None:
            try:
                client = await _connect(station, fixture_port=port, baud=baud, give_up_after=give_up_after)
            except StationError as exc:
                report.errors[f"connect:{exc.code.name}"] += len(devices)
                return
            clients.append(client)
            await run_fixture(client, devices, report, profile=profile)

        start = time.perf_counter()
        await asyncio.gather(
            *(one(s, p, d) for s, p, d in zip(stations, fixture_ports, batches, strict=True))
        )
        report.elapsed = time.perf_counter() - start
    finally:
        for client in clients:
            channel = client.channel
            report.bytes_sent += int(getattr(channel, "bytes_sent", 0))
            report.bytes_received += int(getattr(channel, "bytes_received", 0))
            with contextlib.suppress(StationError, OSError):
                await client.close()
        for pair in pairs:
            pair.stop()
        if tmp is not None:
            tmp.cleanup()
    return report
