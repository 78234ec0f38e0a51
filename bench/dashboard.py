"""What `birthline dashboard` costs and how closely it follows the line: its memory with 100 stations and a busy
event stream, and the time from an event to the screen, in a real terminal.

    python bench/dashboard.py [--stations 100] [--rate 300] [--seconds 60] [--size 80x24]

A real daemon (fresh SoftHSM2 token, durable journal, control socket) runs in this process with `--stations`
stations on five lines, and one more, `a-mark` on line `A0` (the grid's first row). The dashboard runs as its own
process in tmux (a private tmux server), exactly as an operator starts it. Then, for `--seconds`:

  load     certificate requests at `--rate` per second through the issuance core, as the station server makes
           them, spread over the stations, one in five refused (a serial outside the work order): issued and
           refused events, each with its station, serial and reason, on the stream the dashboard reads
  markers  every second a request for device MARK-<n> on `a-mark`; the time from its answer (the event
           is published then) to the first `tmux capture-pane` showing MARK-<n> in the grid is its lag
  memory   the dashboard's resident set (/proc/<pid>/status) once a second, and its peak (VmHWM)

It prints the start-up time (launch to the first screen listing the stations), the rate achieved, the lag's
median, 95th percentile and maximum, the RSS idle, under load and at peak, the dashboard's CPU, and whether the
daemon had to drop its stream. Targets (issue 12): at most 100 MB, the screen within a second of an event.
Figures from a shared 2-core machine: read them as such.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.config import (
    ApplianceSection,
    Config,
    ControlSection,
    IssuanceSection,
    JournalSection,
    MetricsSection,
    StationsSection,
    VaSection,
)
from appliance.daemon import Daemon
from appliance.errors import BirthlineError
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.production import store, users
from appliance.production.model import WorkOrderSpec
from appliance.profiles import builtin_profiles
from bench.issue import make_csrs
from hsm.softhsm import create_softhsm_token

MARK_STATION = "a-mark"
LINES = 5


def _setup(path: Path, stations: int, quantity: int) -> list[str]:
    names = [f"st-{i:03d}" for i in range(stations)]
    with Journal(path) as journal:
        audit = AuditLog(journal)
        admin = users.bootstrap(journal, audit, "bench-admin", secrets.token_urlsafe(16))
        store.add_tenant(journal, audit, admin, "bench")
        store.add_product(journal, audit, admin, "widget", tenant="bench", profile=builtin_profiles()["idevid"],
                          ca="issuing")  # fmt: skip
        lines = ["A0", *(f"L{n}" for n in range(1, LINES + 1))]
        for line in lines:
            store.add_line(journal, audit, admin, line)
        for i, name in enumerate([MARK_STATION, *names]):
            journal.call(journal.transaction, lambda conn, name=name: conn.execute(
                "INSERT INTO stations (name, kind, key, created_at) VALUES (?, 'lan', ?, ?)",
                (name, secrets.token_bytes(32), time.time())), "bench station")  # fmt: skip
            store.assign_station(journal, audit, admin, name, "A0" if i == 0 else lines[1 + (i - 1) % LINES])
        spec = WorkOrderSpec("WO-DASH", "widget", quantity, tuple(lines), pattern="(B|MARK)-[0-9]+")
        store.add_work_order(journal, audit, admin, spec, activate=True)
    return names


class Tmux:
    def __init__(self, command: str, width: int, height: int, name: str = "main") -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            raise SystemExit("bench/dashboard.py needs tmux (apt-get install tmux)")
        self.argv = [tmux, "-L", f"bl-bench-{os.getpid()}-{name}"]
        subprocess.run([*self.argv, "new-session", "-d", "-s", "d", "-x", str(width), "-y", str(height), command],
                       check=True)  # fmt: skip

    def screen(self) -> str:
        return subprocess.run([*self.argv, "capture-pane", "-p", "-t", "d"], capture_output=True, text=True,
                              check=False).stdout  # fmt: skip

    def pid(self) -> int:
        out = subprocess.run([*self.argv, "display-message", "-p", "-t", "d", "#{pane_pid}"], capture_output=True,
                             text=True, check=True).stdout  # fmt: skip
        return int(out.strip())

    def close(self) -> None:
        subprocess.run([*self.argv, "kill-server"], capture_output=True, check=False)


async def _first_screen(term: Tmux, launched: float) -> float:
    """Seconds from `launched` to the first screen listing the stations."""
    while MARK_STATION not in await asyncio.to_thread(term.screen):
        assert time.monotonic() - launched < 60, "the dashboard never showed the line"
        await asyncio.sleep(0.02)
    return time.monotonic() - launched


def _proc(pid: int) -> tuple[float, float, float]:
    """(RSS MB, peak RSS MB, CPU seconds) of a process."""
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line
    )
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024, cpu


async def _run(args: argparse.Namespace, config: Config, names: list[str], csrs: list[bytes]) -> None:
    width, height = (int(x) for x in args.size.split("x"))
    async with Daemon(config) as daemon:
        assert daemon.enroller is not None and daemon.control is not None
        service = daemon.enroller.service
        bus = daemon.control.hub.bus
        # For comparison: the same command through the whole CLI (appliance.cli.main, as `birthline -v
        # dashboard` goes), which imports the appliance core first.
        slow = Tmux(f"exec {sys.executable} -m appliance.cli.main dashboard --socket {config.control_socket}",
                    width, height, "slow")  # fmt: skip
        try:
            through_cli = await _first_screen(slow, time.monotonic())
        finally:
            slow.close()
        cmd = f"exec {sys.executable} -m appliance.cli.launch dashboard --socket {config.control_socket}"
        t_launch = time.monotonic()
        term = Tmux(cmd, width, height)
        try:
            startup = await _first_screen(term, t_launch)
            pid = await asyncio.to_thread(term.pid)
            await asyncio.sleep(2.0)
            idle_rss, _, cpu0 = _proc(pid)
            print(f"dashboard start-up: {startup:.2f} s from launch to the first screen listing the stations"
                  f" ({width}x{height}; {through_cli:.2f} s through appliance.cli.main, which loads the core);"
                  f" RSS idle with {len(names) + 1} stations: {idle_rss:.1f} MB", flush=True)  # fmt: skip

            sent = {"issued": 0, "refused": 0}
            csr_iter = iter(csrs)

            async def one(n: int) -> None:
                station = names[n % len(names)]
                refuse = n % 5 == 4
                serial = f"NOPE-{n}" if refuse else f"B-{n}"
                csr = csrs[0] if refuse else next(csr_iter)
                try:
                    await service.issue(IssueRequest(serial, csr, station=station))
                    sent["issued"] += 1
                except BirthlineError:
                    sent["refused"] += 1

            async def load() -> None:
                n, tick, start = 0, 0.02, time.monotonic()
                pending: set[asyncio.Task[None]] = set()
                while time.monotonic() - start < args.seconds:
                    due = int((time.monotonic() - start) * args.rate)
                    while n < due:
                        task = asyncio.create_task(one(n))
                        pending.add(task)
                        task.add_done_callback(pending.discard)
                        n += 1
                    await asyncio.sleep(tick)
                await asyncio.gather(*pending)

            lags: list[float] = []
            rss: list[float] = []

            async def markers() -> None:
                k = 0
                start = time.monotonic()
                while time.monotonic() - start < args.seconds - 1:
                    k += 1
                    serial = f"MARK-{k:06d}"
                    await service.issue(IssueRequest(serial, next(csr_iter), station=MARK_STATION))
                    answered = time.monotonic()
                    while serial not in await asyncio.to_thread(term.screen):
                        if time.monotonic() - answered > 30:
                            raise AssertionError(f"{serial} never reached the screen")
                    lags.append(time.monotonic() - answered)
                    await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - answered)))

            async def memory() -> None:
                while True:
                    rss.append(_proc(pid)[0])
                    await asyncio.sleep(1.0)

            sampler = asyncio.create_task(memory())
            t0 = time.monotonic()
            await asyncio.gather(load(), markers())
            elapsed = time.monotonic() - t0
            sampler.cancel()
            now_rss, peak, cpu1 = _proc(pid)
            total = sent["issued"] + sent["refused"]
            print(f"load: {total} requests in {elapsed:.1f} s ({total / elapsed:.0f}/s: {sent['issued']} issued,"
                  f" {sent['refused']} refused) over {len(names)} stations, {len(lags)} markers")  # fmt: skip
            q = statistics.quantiles(lags, n=20, method="inclusive") if len(lags) >= 2 else lags
            print(f"event-to-screen lag: median {statistics.median(lags) * 1000:.0f} ms, p95"
                  f" {q[-1] * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms (target: within 1 s)")  # fmt: skip
            print(f"dashboard RSS: idle {idle_rss:.1f} MB, under load median {statistics.median(rss):.1f} MB,"
                  f" max sampled {max(rss):.1f} MB, peak (VmHWM) {peak:.1f} MB (target: at most 100 MB)")  # fmt: skip
            step = max(1, len(rss) // 6)
            print(
                "dashboard RSS over the run (MB, every",
                step,
                "s):",
                " ".join(f"{r:.0f}" for r in rss[::step]),
            )
            print(f"dashboard CPU under load: {(cpu1 - cpu0) / elapsed:.0%} of one core;"
                  f" event streams the daemon dropped: {bus.dropped_subscribers}")  # fmt: skip
            del now_rss
        finally:
            term.close()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--stations", type=int, default=100)
    ap.add_argument(
        "--rate", type=float, default=300.0, help="certificate requests per second (1 in 5 refused)"
    )
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--size", default="80x24", help="the terminal, COLUMNSxLINES")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bl-bench-", dir="/tmp") as tmp_s:
        tmp = Path(tmp_s)
        state = tmp / "state"
        state.mkdir(mode=0o700)
        softhsm = create_softhsm_token(tmp / "softhsm", label="bench")
        from hsm.token import Token

        with Token.open(softhsm.hsm_config()) as token:
            path = state / "journal.sqlite"
            with Journal(path) as journal:
                ca_mod.create_root(journal, token, "root", "CN=Bench Root")
                ca_mod.create_issuing(journal, token, "issuing", "CN=Bench Issuing", "root")
                ca_mod.create_management(journal, token, "management", "CN=Bench Management")
        issued = int(args.rate * args.seconds * 0.8) + int(args.seconds) + 100
        names = _setup(path, args.stations, issued * 2)
        print(f"making {issued} device CSRs (not timed) ...", flush=True)
        csrs = make_csrs(issued)
        config = Config(
            appliance=ApplianceSection(state), hsm=softhsm.hsm_config(), journal=JournalSection(path),
            issuance=IssuanceSection(), stations=StationsSection(lan_listen="127.0.0.1:0", tls_dir=state / "tls"),
            va=VaSection(listen=""), profiles={"idevid": builtin_profiles()["idevid"]}, control=ControlSection(),
            metrics=MetricsSection(listen=""),
        )  # fmt: skip
        asyncio.run(_run(args, config, names, csrs))


if __name__ == "__main__":
    main()
