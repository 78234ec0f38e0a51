"""Where one device's request waits: per-stage latency through the real daemon, one station at a time.

    python bench/station_stages.py [--devices 200] [--stations 1] [--rate R]

The daemon runs in this process (appliance.daemon.Daemon on a fresh appliance, as bench/stations.py builds it:
SoftHSM2 token, durable journal, its CSR preparation worker process) so its steps can be timed: each step below
is wrapped with a timer (a bench-only wrapper, nothing in the daemon changes). `--stations` LAN stations each
enrol and confirm `--devices` devices back to back over TLS; per step the mean, p50 and p99 in ms, and how many
times it ran per device, are printed beside the whole ENROLL and CONFIRM turnarounds the station saw, and the
journal's COMMITs (fsyncs) per device. With `--rate R` the stations run open loop (bench/stations.py lan
--open-loop): each starts a device every 1/R s, and the latency from each device's scheduled start is printed.

A step's time includes its wait for the thread it runs on (the journal thread, the PKCS#11 thread, the worker
process): that wait, not CPU, is what a single device pays on a lightly loaded appliance.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.stations import _connect_all, _open_loop, _pct, appliance
from stations.simulator import make_devices

TIMES: dict[str, list[float]] = defaultdict(list)
COMMITS: list[float] = []


def _timed(name: str, fn: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            TIMES[name].append(time.perf_counter() - t)

    return wrapper


def _instrument(daemon: Any) -> None:
    enroller = daemon.enroller
    service = enroller.service
    journal = enroller.journal
    service.issue = _timed("service.issue (queue -> answer)", service.issue)
    service.confirm = _timed("service.confirm (queue -> commit)", service.confirm)
    if hasattr(enroller, "_find"):
        enroller._find = _timed("enroller._find (request id lookup)", enroller._find)
    if service._pool is not None:
        service._pool.run = _timed("prepare (worker process)", service._pool.run)
    service.key.asign_many = _timed("HSM sign + verify", service.key.asign_many)
    orig_tx = journal.atransaction

    async def atransaction(fn: Callable[..., Any], doing: str) -> Any:
        t = time.perf_counter()
        try:
            return await orig_tx(fn, doing)
        finally:
            TIMES[f"journal txn: {doing}"].append(time.perf_counter() - t)

    journal.atransaction = atransaction
    journal.commit_observer = COMMITS.append  # every COMMIT of the journal thread (grouped or not)


async def run(devices: int, stations: int, rate: float) -> None:
    with tempfile.TemporaryDirectory(prefix="birthline-stages-") as tmp:
        async with appliance(Path(tmp), 0, stations) as (daemon, sims):
            batches = [make_devices(devices, f"STG{i:02d}") for i in range(stations)]
            clients = await _connect_all(sims)
            _instrument(daemon)
            enroll_t: list[float] = []
            confirm_t: list[float] = []

            async def station(client: Any, batch: list[tuple[str, bytes]]) -> None:
                for serial, csr in batch:
                    t0 = time.perf_counter()
                    chain = await client.enroll(serial, csr)
                    t1 = time.perf_counter()
                    await client.confirm(client.last_request_id, chain[0])
                    t2 = time.perf_counter()
                    enroll_t.append(t1 - t0)
                    confirm_t.append(t2 - t1)

            t0 = time.perf_counter()
            if rate:
                # Open loop (bench/stations.py lan --open-loop): each station starts a device every 1/rate s.
                latencies, errors, wall = await _open_loop(clients, batches, rate)
                print(
                    f"open loop {stations} x {rate:g}/s: {len(latencies)} ok, {sum(errors.values())} failed;"
                    f" latency p50 {_pct(latencies, 0.5) * 1e3:.1f} ms, p99 {_pct(latencies, 0.99) * 1e3:.1f}"
                    f" ms, p99.9 {_pct(latencies, 0.999) * 1e3:.1f} ms"
                )
            else:
                await asyncio.gather(*(station(c, b) for c, b in zip(clients, batches, strict=True)))
                wall = time.perf_counter() - t0
            for c in clients:
                await c.close()
    n = devices * stations
    txns = sum(len(v) for k, v in TIMES.items() if k.startswith("journal txn"))
    print(f"{stations} station(s) x {devices} devices, {n / wall:.1f} certificates/s")
    print(
        f"  journal: {txns / n:.2f} async transactions and {len(COMMITS) / n:.2f} COMMITs (fsyncs) per device;"
        f" COMMIT p50 {_pct(COMMITS, 0.5) * 1e3:.2f} ms, p99 {_pct(COMMITS, 0.99) * 1e3:.2f} ms"
    )
    rows = [("ENROLL turnaround (station)", enroll_t), ("CONFIRM turnaround (station)", confirm_t)]
    rows += sorted(TIMES.items())
    for name, vals in rows:
        if not vals:  # open loop: the turnarounds are not split into ENROLL and CONFIRM
            continue
        print(
            f"  {name:44s} x{len(vals) / n:4.2f}/device  mean {statistics.fmean(vals) * 1e3:6.2f}"
            f"  p50 {_pct(vals, 0.5) * 1e3:6.2f}  p99 {_pct(vals, 0.99) * 1e3:6.2f} ms"
        )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--devices", type=int, default=200)
    p.add_argument("--stations", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.0, help="open loop: devices/s started by each station")
    args = p.parse_args()
    asyncio.run(run(args.devices, args.stations, args.rate))
    return 0


if __name__ == "__main__":
    sys.exit(main())
