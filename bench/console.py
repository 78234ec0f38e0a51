"""What a console costs issuance: the rate with the control plane and a subscribed console, against without.

    python bench/console.py [--certs N] [--rounds R]

Each round issues N certificates (P-256, fresh SoftHSM2 token, durable journal) through the issuance core as the
daemon runs it (work-order policy, audit log), alternating two modes in one run:

  bare     no observer: the core as it was before the control API
  console  the control plane: the hub counting every answer, signature and commit for the metrics, the control
           API on its Unix socket, and a console in another process subscribed to the event stream and polling
           the status document once a second, plus a metrics scrape once a second (what a dashboard and a
           Prometheus server do)

It prints the medians, their ratio (target: at most 3% slower), the events the console received, and the cost
of one observer call on the hot path, timed alone. Figures are ratios within one run: the machine is shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance import ca as ca_mod
from appliance.alarms import Alarms
from appliance.audit.log import AuditLog
from appliance.config import (
    ApplianceSection,
    Config,
    ControlSection,
    IssuanceSection,
    JournalSection,
)
from appliance.control.actions import Actions
from appliance.control.events import EventBus
from appliance.control.hub import ControlHub
from appliance.control.metrics import ApplianceCollector, Metrics
from appliance.control.server import ControlApi, ControlServer
from appliance.control.sessions import Sessions
from appliance.control.status import StatusBuilder, StatusSources
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.observe import Outcome
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.production.policy import WorkOrderPolicy
from appliance.profiles import builtin_profiles
from bench.issue import floor, make_csrs
from hsm.softhsm import create_softhsm_token
from hsm.token import Token

FOLLOWER = """
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[2])
from console.client import ControlClient

async def main():
    events = 0
    async with ControlClient(sys.argv[1]) as api:
        async def poll():
            while True:
                await api.status()
                await asyncio.sleep(1.0)
        poller = asyncio.create_task(poll())
        print("ready", flush=True)
        cpu0 = time.process_time()  # after start-up and imports: what following the stream costs
        async for event in api.events():
            events += 1
            if event["type"] == "bench-end":
                break
        poller.cancel()
    print(json.dumps({"events": events, "cpu_s": time.process_time() - cpu0}), flush=True)

asyncio.run(main())
"""


async def _console_round(
    service: IssueService, journal: Journal, config: Config, csrs: list[bytes], sock: Path
) -> tuple[float, int, int]:
    alarms = Alarms()
    hub = ControlHub(alarms, EventBus(config.control.subscriber_queue, config.control.max_subscribers))
    sessions = Sessions(3600, 8)
    async with hub:
        service.observer = hub
        journal.commit_observer = hub.journal_committed
        actions = Actions(journal, AuditLog(journal), alarms, service.pauses, hub.bus, sessions, "issuing")
        status = StatusBuilder(StatusSources(config, journal, hub, alarms, service.pauses, sessions, dict))
        api = ControlApi(config.control, hub, status, sessions, actions)
        collector = ApplianceCollector(hub.stats, alarms, hub.bus, service.pauses, dict, False)
        metrics = Metrics(collector, journal)
        async with ControlServer(api, sock, config.control):
            root = str(Path(__file__).resolve().parents[1])
            follower = await asyncio.create_subprocess_exec(
                sys.executable, "-c", FOLLOWER, str(sock), root, stdout=subprocess.PIPE
            )
            assert follower.stdout is not None
            assert (await follower.stdout.readline()).strip() == b"ready"
            while hub.bus.subscribers < 1:
                await asyncio.sleep(0.01)
            scrapes = 0

            async def scrape() -> None:
                nonlocal scrapes
                while True:
                    await metrics.render("application/openmetrics-text")
                    scrapes += 1
                    await asyncio.sleep(1.0)

            scraper = asyncio.create_task(scrape())
            t0 = time.perf_counter()
            await asyncio.gather(*(
                service.issue(IssueRequest(f"BENCH{n:08d}", c, station="bench-st")) for n, c in enumerate(csrs)
            ))  # fmt: skip
            elapsed = time.perf_counter() - t0
            scraper.cancel()
            hub.bus.publish("bench-end", {})
            out, _ = await follower.communicate()
            result = json.loads(out.decode().strip().splitlines()[-1])
            events = int(result["events"])
            CONSOLE_CPU.append(float(result["cpu_s"]))
        service.observer = None
        journal.commit_observer = None
    return elapsed, events, scrapes


CONSOLE_CPU: list[float] = []  # the console process's CPU seconds, per console round


def observer_call_ns(n: int = 200_000) -> tuple[float, float]:
    """One hub.answered() per issued certificate: timed alone, without and with one subscriber."""
    hub = ControlHub(Alarms())
    outcome = Outcome("st", "SN1", "r", "idevid", "WO-1", "widget", "0a", False, None, False)
    t0 = time.perf_counter()
    for _ in range(n):
        hub.answered(outcome)
    bare = (time.perf_counter() - t0) / n * 1e9
    hub.bus.max_subscribers, hub.bus.queue_size = 1, n + 10
    assert hub.bus.subscribe() is not None
    t0 = time.perf_counter()
    for _ in range(n):
        hub.answered(outcome)
    subscribed = (time.perf_counter() - t0) / n * 1e9
    refused = Outcome("st", "SN1", "r", "idevid", None, None, None, False,
                      IssuanceRefused("x", ReasonCode.NOT_AUTHORISED), False)  # fmt: skip
    hub.answered(refused)
    return bare, subscribed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--certs", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bl-bench-", dir="/tmp") as tmp_s:
        tmp = Path(tmp_s)
        softhsm = create_softhsm_token(tmp / "softhsm", label="bench")
        with Token.open(softhsm.hsm_config()) as token:
            template = tmp / "template.sqlite"
            with Journal(template) as journal:
                ca_mod.create_root(journal, token, "root", "CN=Bench Root")
                ca_mod.create_issuing(journal, token, "issuing", "CN=Bench Issuing", "root")
                floor(journal, 10 * args.certs, pattern="BENCH[0-9]{8}")
            print(f"making {args.certs} device CSRs (not timed) ...", flush=True)
            csrs = make_csrs(args.certs)
            profiles = {"idevid": builtin_profiles()["idevid"]}
            rates: dict[str, list[float]] = {"bare": [], "console": []}
            cpu: dict[str, list[float]] = {"bare": [], "console": []}  # this process's CPU us per certificate
            delivered: list[int] = []
            scrapes: list[int] = []
            for i, mode in enumerate(("bare", "console") * args.rounds):
                path = tmp / f"round-{i}.sqlite"
                shutil.copy(template, path)
                with Journal(path) as journal:
                    issuing = ca_mod.load_ca(journal, "issuing")
                    config = Config(ApplianceSection(tmp), softhsm.hsm_config(), JournalSection(path),
                                    IssuanceSection(), control=ControlSection())  # fmt: skip

                    async def one(journal: Journal = journal, issuing: ca_mod.CaRecord = issuing,
                                  mode: str = mode, config: Config = config, i: int = i) -> float:  # fmt: skip
                        service = IssueService(
                            journal, issuing, token.get_key(issuing.key_label), profiles, batch_max=args.batch,
                            prepare_workers=args.workers, policy=WorkOrderPolicy("issuing"), audit=AuditLog(journal),
                        )  # fmt: skip
                        async with service:
                            if mode == "bare":
                                t0 = time.perf_counter()
                                await asyncio.gather(*(
                                    service.issue(IssueRequest(f"BENCH{n:08d}", c, station="bench-st"))
                                    for n, c in enumerate(csrs)
                                ))  # fmt: skip
                                return time.perf_counter() - t0
                            elapsed, events, n_scrapes = await _console_round(
                                service, journal, config, csrs, tmp / f"c{i}.sock"
                            )
                            delivered.append(events)
                            scrapes.append(n_scrapes)
                            return elapsed

                    c0 = time.process_time()
                    elapsed = asyncio.run(one())
                    cpu[mode].append((time.process_time() - c0) / len(csrs) * 1e6)
                    assert journal.counts() == {"issued": len(csrs)}
                rates[mode].append(len(csrs) / elapsed)
            bare, console = statistics.median(rates["bare"]), statistics.median(rates["console"])
            print(f"\n{len(csrs)} certificates per round, {args.rounds} alternated rounds of bare/console, work orders"
                  f" and audit log on, {os.cpu_count()} cores (medians):")  # fmt: skip
            print(
                f"  bare (no control plane):  {bare:7.0f} certificates/s  ({', '.join(f'{r:.0f}' for r in rates['bare'])})"
            )
            print(
                f"  console subscribed:       {console:7.0f} certificates/s  ({', '.join(f'{r:.0f}' for r in rates['console'])})"
            )
            print(f"  cost:                     {1 - console / bare:7.1%} slower  (target <= 3%)")
            cb, cc = statistics.median(cpu["bare"]), statistics.median(cpu["console"])
            print(f"  daemon CPU / certificate: {cb:7.0f} us bare, {cc:.0f} us with the console ({cc / cb - 1:+.1%};"
                  f" the prepare worker's is the same in both)")  # fmt: skip
            per_cert = statistics.median(CONSOLE_CPU) / len(csrs) * 1e6
            print(f"  console process CPU:      {per_cert:7.0f} us per certificate (another process: it competes"
                  f" for the cores only)")  # fmt: skip
            print(
                f"  events the console got:   {', '.join(map(str, delivered))} (certificates + 1 end marker each)"
            )
            print(f"  metrics scrapes:          {', '.join(map(str, scrapes))}")
            bare_ns, sub_ns = observer_call_ns()
            per_cert_ns = 1e9 / bare
            print(f"  one observer call alone:  {bare_ns:5.0f} ns, {sub_ns:5.0f} ns with a subscriber"
                  f" ({sub_ns / per_cert_ns:.2%} of a certificate's {per_cert_ns / 1000:.0f} us)")  # fmt: skip


if __name__ == "__main__":
    main()
