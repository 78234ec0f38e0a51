"""Station link throughput against the real daemon (`birthline run` in its own process, HSM-backed issuance,
durable journal), with the load generator's own CPU time printed beside the daemon's.

    python bench/stations.py serial [--stations 1,2,8] [--devices 20] [--baud 115200] [--pipeline]
    python bench/stations.py lan [--stations 50] [--devices 40] [--core-certs 5000]
    python bench/stations.py lan --open-loop 50x2 [--seconds 20 | --minutes 30] [--rss-every 60]

Each part builds a fresh appliance in a temporary directory (SoftHSM2 token, root/issuing/management CAs, a
production floor with an active work order) and starts `birthline run` on it. Device keys and CSRs are made and
the stations connected and authenticated before the clock starts. The daemon's CPU time (all its threads and its
CSR preparation worker process, from /proc/<pid>/stat) and this generator's (resource.getrusage) are printed for
the timed window: both share this machine's cores, which a real line (fixtures on their own machines) does not.

serial: each station is a socat pty pair paced to the baud rate in both directions (the fixture paces its writes
    and the bytes it reads). The wire limit is computed from the frame bytes actually exchanged per certificate
    (ENROLL, CERT, CONFIRM, CONFIRMED; 10 bits a byte at 8N1): a station cannot do better than 1 / wire time.
    One run per station count in --stations. Goal: >= 95% of the limit. --pipeline: each count is run a
    second time, right after, each fixture sending a device's CONFIRM and the next device's ENROLL back to back
    (StationClient.confirm_and_enroll): the appliance's confirmation commit overlaps the ENROLL's line time.
    The limit is computed the same way. --start: when each fixture starts its first device within one device's
    line time: random (default, seeded: --seed repeats it; fixtures loaded at their own pace), even (the best
    case) or lockstep (the worst: the stations stay in step, their requests meeting at the appliance). A
    pipelined run also prints its percentage of the station's own bound (its CONFIRMEDs but the last come down
    while an ENROLL goes up). The fixtures pace on a select() event loop (microsecond timeouts; epoll's are
    milliseconds, rounded up), and how late its timers still were is printed: an estimate of the time counted
    against the appliance. The socat relays' CPU is printed beside the daemon's and the generator's.
lan (closed loop): N TLS stations each enrol and confirm M devices back to back: certificates/s, latency per
    device, the raw C_Sign rate of the same token key, and bench/issue.py's issuance core rate measured in the same
    run (its own process, before the daemon starts). Goal: >= 60% of the core rate.
lan --open-loop SxR: S stations each START a device every 1/R s whatever happened before (staggered), for
    --seconds or --minutes; latency is measured from each device's scheduled start (a late answer delays the
    next device's clock and is counted, no coordinated omission): p50/p99/p99.9 and the achieved rate. Goal: p99
    <= 20 ms at 50x2. With --rss-every the daemon's RSS (its processes together) is printed over time: the memory
    bench is `--open-loop 100x0.2 --minutes 30 --rss-every 60` (100 stations connected and enrolling, goal
    <= 150 MB and flat).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import math
import os
import random
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
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
from stations.codec import FRAME_OVERHEAD, SEALED_BIT, DecodeEvent, Frame
from stations.errors import StationError
from stations.messages import CONFIRMED
from stations.simulator import PtyPair, SimReport, SimStation, make_devices, run_fixture
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


def _config(base: Path, port: int = 0, workers: int | None = None) -> Config:
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
        + ("" if workers is None else f"[issuance]\nprepare_workers = {workers}\n")
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


def _serial(client: StationClient) -> SerialChannel:
    ch = client.channel
    assert isinstance(ch, SerialChannel)
    return ch


def _bytes(client: StationClient) -> tuple[int, int]:
    ch = _serial(client)
    return ch.bytes_sent, ch.bytes_received


def _count_confirmed(client: StationClient) -> list[int]:
    """A one-item list that from now on adds up the frame bytes of the CONFIRMEDs the client receives."""
    ch = _serial(client)
    total = [0]
    recv = ch.recv

    async def counting() -> Frame | DecodeEvent:
        item = await recv()
        if isinstance(item, Frame) and item.type & ~SEALED_BIT == CONFIRMED:
            total[0] += FRAME_OVERHEAD + len(item.payload)
        return item

    ch.recv = counting  # type: ignore[method-assign]
    return total


def _late(client: StationClient) -> tuple[float, int]:
    ch = _serial(client)
    return ch.pace_late_s, ch.pace_events


# Frame bytes of one device both ways, about (1,800 in every run so far): sets the stations' start offsets only.
DEVICE_BYTES = 1800
STARTS = ("random", "even", "lockstep")


def start_offsets(start: str, n: int, baud: int, rng: random.Random) -> list[float]:
    """When each of n fixtures starts its first device, in seconds, within one device's line time.

    random: each at its own uniformly random point, as fixtures that operators load at their own pace (the
    stations' requests then meet by chance); even: spread evenly (the best case: they never meet while the
    appliance is quick); lockstep: all at once (the worst case: each fixture's cycle is the same line time, so
    they stay in step and their ENROLLs keep reaching the appliance within milliseconds of each other)."""
    cycle = wire_time(DEVICE_BYTES, baud)
    if start == "lockstep":
        return [0.0] * n
    if start == "even":
        return [i * cycle / n for i in range(n)]
    return sorted(rng.uniform(0, cycle) for _ in range(n))


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


# -- measuring the two processes ------------------------------------------------------------------------------


def _family(pid: int) -> list[int]:
    """`pid` and its descendants (the daemon's CSR preparation worker is a child process)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) `pid` and its descendants have used so far (/proc/<pid>/stat)."""
    total = 0
    for p in _family(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def _self_cpu_s() -> float:
    """This process's CPU seconds: the load generator (fixtures, TLS, pacing) and its threads."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _family_kb(pid: int, proc_file: str, field: str) -> int:
    """`field` (kB) of /proc/<p>/<proc_file> summed over `pid` and its descendants."""
    total = 0
    for p in _family(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/{proc_file}").read_text().splitlines():
                if line.startswith(field):
                    total += int(line.split()[1])
    return total


def _rss_mb(pid: int) -> float:
    """Resident memory of `pid` and its descendants together (MB): the daemon as a whole. A page its processes
    share (the Python binary, libcrypto, cryptography's library) counts once in each: an upper bound."""
    return _family_kb(pid, "status", "VmRSS:") / 1024


def _pss_mb(pid: int) -> float:
    """Proportional set size of `pid` and its descendants together (MB): a page mapped by N processes counts 1/N
    in each, so pages shared with processes outside the daemon (this bench's own Python) are partly left out: a
    lower bound, where the summed RSS is an upper one."""
    return _family_kb(pid, "smaps_rollup", "Pss:") / 1024


@dataclasses.dataclass
class Cpu:
    """CPU used by the daemon, by this generator and by the pty relays (socat, serial only: they carry every
    byte between a fixture and the appliance, on the same cores) over one timed window, with its wall time."""

    pid: int
    relays: Sequence[int] = ()
    wall: float = 0.0
    daemon: float = 0.0
    generator: float = 0.0
    relay: float = 0.0
    _t0: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)

    def _relays_s(self) -> float:
        return sum(_cpu_s(p) for p in self.relays)

    def start(self) -> None:
        self._t0 = (time.perf_counter(), _cpu_s(self.pid), _self_cpu_s(), self._relays_s())

    def stop(self) -> None:
        t, d, g, r = self._t0
        self.wall = time.perf_counter() - t
        self.daemon = _cpu_s(self.pid) - d
        self.generator = _self_cpu_s() - g
        self.relay = self._relays_s() - r

    def line(self, per: int) -> str:
        per = max(1, per)
        relays = (
            f", pty relays {self.relay:.1f} s ({self.relay / self.wall:.2f} cores,"
            f" {self.relay / per * 1e3:.2f} ms/certificate)"
            if self.relays
            else ""
        )
        return (
            f"CPU over {self.wall:.1f} s: daemon {self.daemon:.1f} s ({self.daemon / self.wall:.2f} cores,"
            f" {self.daemon / per * 1e3:.2f} ms/certificate), generator {self.generator:.1f} s"
            f" ({self.generator / self.wall:.2f} cores, {self.generator / per * 1e3:.2f} ms/certificate){relays}"
        )


# C_Sign calls per raw-rate sample: one PKCS#11 call holds them all, and the token thread gives up on a call after
# 10 s, which 20,000 signatures passed on this machine under a load average of 16.
RAW_SIGNS = 5000


def core_rate(certs: int) -> float | None:
    """bench/issue.py's issuance core rate (certificates/s) measured now, in its own process, while nothing
    else of this bench runs: the ceiling the LAN figure is compared with. None (said why) when it fails: the LAN
    figures are still worth printing."""
    proc = subprocess.run(
        # One round, on an empty journal as the daemon's is: the median of rounds would be a round on a journal
        # already holding the first round's certificates, a few percent slower, which would flatter the LAN figure.
        [sys.executable, str(Path(__file__).with_name("issue.py")), "--certs", str(certs), "--rounds", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    m = re.search(r"issuance core:\s+([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or m is None:
        why = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        print(f"bench/issue.py --certs {certs} gave no core rate (exit {proc.returncode}): {why}", flush=True)
        return None
    return float(m.group(1))


@asynccontextmanager
async def daemon_process(base: Path, config: Config, port: int | None) -> AsyncIterator[int]:
    """`birthline run` as its own process, as on the appliance; yields its pid once it listens (LAN)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(base / "birthline.toml")],
        stderr=subprocess.DEVNULL,
    )
    try:
        if port is not None:
            await _wait_listening(port, proc)
        yield proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


# -- serial -------------------------------------------------------------------------------------------------


async def bench_serial(
    counts: Sequence[int],
    devices: int,
    baud: int,
    pipeline: bool = False,
    starts: str = "random",
    seed: int | None = None,
) -> None:
    """One appliance with max(counts) serial stations; for each count, that many fixtures enrol `devices` each
    over paced ptys. The wire limit comes from the frame bytes actually exchanged per certificate (ENROLL,
    CERT, CONFIRM, CONFIRMED both ways, 8N1 at `baud`): a station can do no better than 1 / wire time."""
    with tempfile.TemporaryDirectory(prefix="birthline-bench-") as tmp:
        base = Path(tmp)
        config = _config(base)
        sims = _setup(config, base, max(counts), 0)
        # With --pipeline each station count runs twice, one at a time and pipelined, back to back on the same
        # daemon: the pair compares under the same load (this machine's load drifts within minutes).
        plan = [(n, mode) for n in counts for mode in ((False, True) if pipeline else (False,))]
        print(f"making {len(plan) * max(counts) * devices} device keys and CSRs (not timed) ...", flush=True)
        batches = {
            (n, mode): [make_devices(devices, f"S{n}{'P' if mode else 'N'}{i:02d}") for i in range(n)]
            for n, mode in plan
        }
        pairs = [PtyPair(s.port or "", base / "pty" / f"{s.name}.fixture").start() for s in sims]
        seed = random.randrange(2**32) if seed is None else seed
        print(f"start offsets seeded with --seed {seed}", flush=True)
        rng = random.Random(seed)  # the fixtures' start offsets: not a secret
        try:
            async with daemon_process(base, config, None) as pid:
                for n, mode in plan:
                    clients = [
                        await StationClient.connect_serial(pair.b, baud, station_id=s.name, key=s.key, pace=True,
                                                           pace_reads=True, give_up_after=60)
                        for pair, s in zip(pairs[:n], sims[:n], strict=True)
                    ]  # fmt: skip
                    for c in clients:
                        await c.ca_chain()  # authenticated and warm before the clock starts
                    snapshot = [_bytes(c) for c in clients]
                    confirmed = [_count_confirmed(c) for c in clients]
                    late0 = [_late(c) for c in clients]

                    async def run(
                        client: StationClient,
                        batch: Sequence[tuple[str, bytes]],
                        pipelined: bool,
                        offset: float,
                    ) -> float:
                        await asyncio.sleep(offset)  # start_offsets
                        start = time.perf_counter()
                        if pipelined:
                            # Each CONFIRM goes out with the next device's ENROLL (confirm_and_enroll).
                            chain = await client.enroll(*batch[0])
                            for serial, csr in batch[1:]:
                                assert client.last_request_id is not None
                                chain = await client.confirm_and_enroll(
                                    client.last_request_id, chain[0], serial, csr
                                )
                            assert client.last_request_id is not None
                            await client.confirm(client.last_request_id, chain[0])
                            return time.perf_counter() - start
                        for serial, csr in batch:
                            chain = await client.enroll(serial, csr)
                            assert client.last_request_id is not None
                            await client.confirm(client.last_request_id, chain[0])
                        return time.perf_counter() - start

                    cpu = Cpu(pid, [p for pair in pairs[:n] if (p := pair.pid) is not None])
                    offsets = start_offsets(starts, n, baud, rng)
                    # The CPU window opens with the first station's first device.
                    await asyncio.sleep(offsets[0])
                    cpu.start()
                    elapsed = await asyncio.gather(
                        *(
                            run(c, b, mode, o - offsets[0])
                            for c, b, o in zip(clients, batches[(n, mode)], offsets, strict=True)
                        )
                    )
                    cpu.stop()
                    moved = [sum(_bytes(c)) - sum(s) for c, s in zip(clients, snapshot, strict=True)]
                    late = [
                        (a - a0, k - k0) for (a, k), (a0, k0) in zip(map(_late, clients), late0, strict=True)
                    ]
                    for c in clients:
                        await c.close()
                    per_device = sum(moved) / (n * devices)
                    limit = 1 / wire_time(round(per_device), baud)
                    rate = sum(devices / e for e in elapsed) / n
                    # A pipelined station's own bound: every CONFIRMED but the last comes down while the next
                    # ENROLL goes up (a full-duplex line), so its bytes are off the device's path.
                    overlap = (
                        sum(c[0] for c in confirmed) / (n * devices) * (devices - 1) / devices
                        if mode
                        else 0.0
                    )
                    own = 1 / wire_time(round(per_device - overlap), baud)
                    print(
                        f"serial {baud} baud{', CONFIRM pipelined with the next ENROLL' if mode else ''}"
                        f", {starts} starts,"
                        f" {n} station(s) x {devices} devices: {per_device:.0f} frame bytes per"
                        f" certificate both ways -> wire limit {limit:.3f}/s per station; measured {rate:.3f}/s"
                        f" per station = {rate / limit:.1%} of the limit (goal >= 95%)"
                    )
                    if mode:
                        print(
                            f"    against the pipelined station's own bound ({per_device - overlap:.0f} bytes a"
                            f" device on its path: the CONFIRMEDs but the last overlap an ENROLL) {own:.3f}/s:"
                            f" {rate / own:.1%}"
                        )
                    print(f"    starts: {', '.join(f'{1000 * o:.0f}' for o in offsets)} ms")
                    print(f"    {cpu.line(n * devices)}")
                    print(
                        f"    fixture pacing: {sum(k for _, k in late)} paced frames and reads, late by"
                        f" {1000 * sum(a for a, _ in late) / max(1, sum(k for _, k in late)):.2f} ms on average,"
                        f" {1000 * sum(a for a, _ in late) / (n * devices):.2f} ms a device, an estimate: not all of"
                        " them are on a device's path (this process's timers; counted against the appliance)",
                        flush=True,
                    )
        finally:
            for pair in pairs:
                pair.stop()


# -- LAN ----------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class OpenLoop:
    stations: int
    rate: float  # devices/s offered by each station

    @classmethod
    def parse(cls, text: str) -> OpenLoop:
        s, _, r = text.partition("x")
        return cls(int(s), float(r))


def _pct(values: Sequence[float], q: float) -> float:
    """The q-quantile (nearest rank) of `values`; 0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


async def _connect_all(sims: Sequence[SimStation]) -> list[StationClient]:
    clients = []
    for s in sims:
        assert s.host is not None and s.tcp_port is not None
        client = await StationClient.connect_tcp(s.host, s.tcp_port, station_id=s.name, key=s.key,
                                                 ssl_context=s.ssl_context, server_hostname=s.server_hostname,
                                                 give_up_after=60)  # fmt: skip
        await client.ca_chain()  # authenticated and warm before the clock starts
        clients.append(client)
    return clients


async def _rss_sampler(pid: int, every: float, samples: list[tuple[float, float]], t0: float) -> None:
    while True:
        t = time.perf_counter() - t0
        rss = _rss_mb(pid)
        samples.append((t, rss))
        print(f"    t={t:7.0f} s  daemon RSS {rss:6.1f} MB (PSS {_pss_mb(pid):6.1f} MB)", flush=True)
        await asyncio.sleep(every)


async def _open_loop(
    clients: Sequence[StationClient], batches: Sequence[Sequence[tuple[str, bytes]]], rate: float
) -> tuple[list[float], Counter[str], float]:
    """Each station starts device i at t0 + phase + i / rate whatever happened before (open loop). Latency is
    measured from that scheduled start, so a late answer also delays the next device's clock (no coordinated
    omission). Returns latencies, errors and the time from t0 to the last answer."""
    loop = asyncio.get_running_loop()
    t0 = loop.time() + 0.05
    latencies: list[float] = []
    errors: Counter[str] = Counter()
    last = [t0]

    async def station(k: int, client: StationClient, batch: Sequence[tuple[str, bytes]]) -> None:
        phase = k / (len(clients) * rate)  # spread the stations' starts evenly over one period
        for i, (serial, csr) in enumerate(batch):
            due = t0 + phase + i / rate
            delay = due - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            try:
                chain = await client.enroll(serial, csr)
                assert client.last_request_id is not None
                await client.confirm(client.last_request_id, chain[0])
            except StationError as exc:
                errors[exc.code.name] += 1
                continue
            now = loop.time()
            latencies.append(now - due)
            last[0] = max(last[0], now)

    await asyncio.gather(*(station(k, c, b) for k, (c, b) in enumerate(zip(clients, batches, strict=True))))
    return latencies, errors, last[0] - t0


async def bench_lan(args: argparse.Namespace) -> int:
    """The daemon runs as its own process (`birthline run`), as on the appliance; the simulated fixtures,
    which on a line are separate machines, run here, on the same two cores: their CPU is printed beside."""
    open_loop = OpenLoop.parse(args.open_loop) if args.open_loop else None
    n = open_loop.stations if open_loop else args.stations
    if open_loop:
        seconds = args.minutes * 60 if args.minutes else args.seconds
        per_station = max(1, math.ceil(open_loop.rate * seconds))
    else:
        per_station = args.devices
    core = core_rate(args.core_certs) if args.core_certs and not open_loop else None
    with tempfile.TemporaryDirectory(prefix="birthline-bench-") as tmp:
        base = Path(tmp)
        port = _free_port()
        config = _config(base, port, args.workers)
        sims = [dataclasses.replace(s, host="127.0.0.1", tcp_port=port) for s in _setup(config, base, 0, n)]
        with open_core(config) as c:
            label = c.issuing_ca().key_label
            raw_before = raw_sign_rate(c.token, label, RAW_SIGNS)
        print(f"making {n * per_station} device keys and CSRs (not timed) ...", flush=True)
        batches = [make_devices(per_station, f"LAN{i:03d}") for i in range(n)]
        async with daemon_process(base, config, port) as pid:
            clients = await _connect_all(sims)
            print(f"{n} stations connected and authenticated; daemon RSS {_rss_mb(pid):.1f} MB", flush=True)
            samples: list[tuple[float, float]] = []
            sampler = (
                asyncio.create_task(_rss_sampler(pid, args.rss_every, samples, time.perf_counter()))
                if args.rss_every
                else None
            )
            cpu = Cpu(pid)
            cpu.start()
            if open_loop:
                latencies, errors, elapsed = await _open_loop(clients, batches, open_loop.rate)
            else:
                report = SimReport(n, n * per_station)
                t0 = time.perf_counter()
                await asyncio.gather(
                    *(run_fixture(c, b, report) for c, b in zip(clients, batches, strict=True))
                )
                elapsed = time.perf_counter() - t0
                latencies, errors = report.latencies, report.errors
            cpu.stop()
            rss_end, pss_end = _rss_mb(pid), _pss_mb(pid)
            if sampler is not None:
                sampler.cancel()
            for client in clients:
                with contextlib.suppress(StationError, OSError):
                    await client.close()
        with open_core(config) as c:
            raw_after = raw_sign_rate(c.token, label, RAW_SIGNS)
    ok = len(latencies)
    rate = ok / elapsed if elapsed > 0 else 0.0
    raw = (raw_before + raw_after) / 2
    mode = (
        f"open loop {open_loop.stations} stations x {open_loop.rate:g} devices/s"
        f" (offered {open_loop.stations * open_loop.rate:g}/s)"
        if open_loop
        else f"closed loop {n} stations x {per_station} devices"
    )
    print(f"LAN over TLS, real daemon (`birthline run`), {mode}:")
    print(
        f"    {ok} certificates ok, {sum(errors.values())} failed, in {elapsed:.2f} s = {rate:.1f} certificates/s"
    )
    print(
        f"    latency per device (enrol + confirm{', from its scheduled start' if open_loop else ''}):"
        f" p50 {_pct(latencies, 0.5) * 1e3:.1f} ms, p99 {_pct(latencies, 0.99) * 1e3:.1f} ms,"
        f" p99.9 {_pct(latencies, 0.999) * 1e3:.1f} ms, max {max(latencies, default=0) * 1e3:.1f} ms"
    )
    print(f"    {cpu.line(ok)}")
    print(
        f"    raw HSM C_Sign {raw:.0f}/s (before {raw_before:.0f}, after {raw_after:.0f}); LAN = {rate / raw:.1%}"
    )
    if core is not None:
        print(
            f"    bench/issue.py core rate in this run {core:.0f}/s; LAN = {rate / core:.1%} of it (goal >= 60%)"
        )
    if samples:
        rss = [r for _, r in samples] + [rss_end]
        print(
            f"    daemon RSS: first {rss[0]:.1f} MB, max {max(rss):.1f} MB, last {rss[-1]:.1f} MB (goal <= 150 MB);"
            f" PSS last {pss_end:.1f} MB; prepare_workers {'default' if args.workers is None else args.workers}"
        )
    for name, count in errors.most_common():
        print(f"    error {name}: {count}")
    return 0 if not errors else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="part", required=True)
    s = sub.add_parser("serial")
    s.add_argument("--stations", default="1,2,8", help="comma-separated station counts, one run each")
    s.add_argument("--devices", type=int, default=20)
    s.add_argument("--baud", type=int, default=115200)
    s.add_argument(
        "--pipeline",
        action="store_true",
        help="send each CONFIRM with the next device's ENROLL (StationClient.confirm_and_enroll)",
    )
    s.add_argument(
        "--start",
        choices=STARTS,
        default="random",
        help="when the fixtures start within one device's line time (start_offsets; default random)",
    )
    s.add_argument(
        "--seed", type=int, default=None, help="seed of the random start offsets (default: a new one)"
    )
    lan = sub.add_parser("lan")
    lan.add_argument("--stations", type=int, default=50, help="closed loop: stations")
    lan.add_argument("--devices", type=int, default=40, help="closed loop: devices per station")
    lan.add_argument(
        "--core-certs", type=int, default=5000, help="closed loop: bench/issue.py --certs (0: skip)"
    )
    lan.add_argument("--open-loop", metavar="SxR", help="open loop: S stations offering R devices/s each")
    lan.add_argument("--seconds", type=float, default=20.0, help="open loop: how long")
    lan.add_argument("--minutes", type=float, default=0.0, help="open loop: how long (overrides --seconds)")
    lan.add_argument("--rss-every", type=float, default=0.0, help="print the daemon's RSS every this many s")
    lan.add_argument(
        "--workers",
        type=int,
        default=None,
        help="[issuance] prepare_workers of the daemon (default: its own)",
    )
    args = p.parse_args()
    if args.part == "serial":
        # select() takes its timeout in microseconds, epoll in milliseconds (rounded up): on epoll each paced
        # write and read of the simulated fixtures came out 0.7 to 0.9 ms late on average, time a real UART
        # does not lose and that the figure charged to the appliance. select() takes descriptors below 1,024
        # only: enough for hundreds of stations. (The LAN open loop's scheduler still waits on epoll.)
        with asyncio.Runner(
            loop_factory=lambda: asyncio.SelectorEventLoop(selectors.SelectSelector())
        ) as runner:
            runner.run(
                bench_serial([int(x) for x in args.stations.split(",")], args.devices, args.baud, args.pipeline,
                             args.start, args.seed)
            )  # fmt: skip
        return 0
    return asyncio.run(bench_lan(args))


if __name__ == "__main__":
    sys.exit(main())
