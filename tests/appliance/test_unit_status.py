"""The daemon under systemd (appliance/sdnotify.py, appliance/unitstatus.py): notifications reach a real
NOTIFY_SOCKET datagram socket bound here; READY=1 only once every listener accepts, WATCHDOG=1 from the event loop
itself, STATUS= with the figures an administrator reads, STOPPING=1 on SIGTERM, and the clock-behind alarm."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from appliance.alarms import Alarm, Alarms
from appliance.ca import CaRecord
from appliance.issuance.journal import Journal
from appliance.issuance.service import IssueService
from appliance.profiles import Profile, builtin_profiles
from appliance.sdnotify import Notifier
from appliance.unitstatus import Figures, UnitReporter, issued_since, local_midnight, status_line
from hsm.token import Token
from stations.client import StationClient, client_ssl_context, read_station_key
from tests.ports import free_ports

ISSUED = ("issued", "confirmed", "reworked", "scrapped")


class Receiver:
    """The systemd side: a datagram socket bound at a path (or an abstract name), read without blocking."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        new = []
        self.sock.setblocking(False)  # a socket with a timeout would wait for it even with MSG_DONTWAIT
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            new.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
        self.messages += new
        return new

    def wait_for(
        self, cond: Callable[[dict[str, str]], bool], what: str, timeout: float = 120.0
    ) -> dict[str, str]:
        """The first message (from now on) that satisfies cond. A deadlock guard, not a speed requirement."""
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                break
            msg = dict(line.split("=", 1) for line in data.decode().split("\n"))
            self.messages.append(msg)
            if cond(msg):
                return msg
        raise AssertionError(f"no notification {what}; got {self.messages[-5:]}")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[Receiver]:
    r = Receiver(str(tmp_path / "notify.sock"))
    yield r
    r.close()


# -- the protocol ---------------------------------------------------------------------------------------------
def test_notifies_a_path_socket(receiver: Receiver, tmp_path: Path) -> None:
    n = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    assert n.enabled and n.watchdog_interval_s is None
    assert n.send(READY=1, STATUS="two\nlines")
    assert receiver.drain() == [{"READY": "1", "STATUS": "two lines"}]


def test_notifies_an_abstract_socket() -> None:
    name = f"birthline-test-{os.getpid()}-{time.monotonic_ns()}"
    r = Receiver("\0" + name)
    try:
        assert Notifier.from_environment({"NOTIFY_SOCKET": "@" + name}).send(STOPPING=1)
        assert r.drain() == [{"STOPPING": "1"}]
    finally:
        r.close()


def test_a_missing_socket_never_fails_and_a_new_one_is_found(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "notify.sock"
    n = Notifier.from_environment({"NOTIFY_SOCKET": str(path)})
    assert not n.send(STATUS="nobody listens")
    assert not n.send(STATUS="nobody listens")
    assert (
        len([r for r in caplog.records if "cannot notify systemd" in r.getMessage()]) == 1
    )  # once, not per send
    r = Receiver(str(path))  # systemd is back
    try:
        assert n.send(STATUS="back")
        assert r.drain() == [{"STATUS": "back"}]
    finally:
        r.close()


def test_without_systemd_nothing_is_sent() -> None:
    n = Notifier.from_environment({})
    assert not n.enabled and not n.send(READY=1) and n.watchdog_interval_s is None


def test_the_watchdog_is_this_process_only() -> None:
    env = {"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}
    assert Notifier.from_environment(env).watchdog_interval_s == 15.0
    assert Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s == 15.0
    assert (
        Notifier.from_environment({**env, "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s is None
    )


# -- the STATUS line --------------------------------------------------------------------------------------------
def _alarm(cause: str, severity: str = "critical") -> Alarm:
    return Alarm(cause, severity, "m", "a", 0.0, 0.0)  # type: ignore[arg-type]


def test_status_line() -> None:
    assert status_line(Figures(12, 1, 2)) == "12 issued today; 1 of 2 stations connected; no alarms"
    line = status_line(
        Figures(0, 0, 1, [_alarm("issuance.clock-not-trusted"), _alarm("disk.low", "warning")])
    )
    assert line.startswith("ISSUANCE REFUSED: the clock is behind the last issuance")
    assert (
        "0 of 1 station connected" in line
        and "2 alarms (1 critical): issuance.clock-not-trusted, disk.low" in line
    )
    many = status_line(Figures(0, 0, 0, [_alarm(f"a{i}", "warning") for i in range(5)]))
    assert many.endswith("5 alarms (0 critical): a0, a1, a2 and 2 more")


def _insert(conn: sqlite3.Connection, rows: list[tuple[float, str]]) -> None:
    for i, (created, state) in enumerate(rows):
        cert = b"c" if state in ISSUED else None
        conn.execute(
            "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256, csr_sha256,"
            " cert_serial, tbs_sha256, state, cert_der, created_at) VALUES (?, 's', 'p', 'issuing', ?, ?, x'00',"
            " ?, x'00', ?, ?, ?)",
            (f"r{i}", f"D{i}", os.urandom(32), f"{i:x}", state, cert, created),
        )


def test_issued_since_counts_the_period_by_bisection(journal: Journal) -> None:
    midnight = local_midnight(time.time())
    states = ["issued", "confirmed", "burned", "intent", "scrapped", "reworked"]
    rows = [(midnight - 86400 + i * 60, states[i % 6]) for i in range(500)]
    rows += [(midnight + i * 7, states[i % 6]) for i in range(333)]

    def check(conn: sqlite3.Connection) -> None:
        assert issued_since(conn, midnight) == 0
        _insert(conn, rows)
        for since in (midnight, midnight - 3600, midnight + 1000, midnight + 86400, 0.0):
            brute = conn.execute(
                "SELECT COUNT(*) FROM issuance WHERE created_at >= ? AND state IN (?, ?, ?, ?)",
                (since, *ISSUED),
            ).fetchone()[0]
            assert issued_since(conn, since) == brute

    journal.call(lambda: check(journal.conn))


def test_local_midnight() -> None:
    now = time.time()
    m = local_midnight(now)
    assert 0 <= now - m < 86400 + 3600  # a DST day is 25 hours
    assert datetime.datetime.fromtimestamp(m).time() == datetime.time(0, 0)


# -- the watchdog is the event loop's ------------------------------------------------------------------------------
async def test_a_wedged_event_loop_stops_the_watchdog_pings(receiver: Receiver, tmp_path: Path) -> None:
    env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "100000"}  # a ping every 50 ms

    async def figures() -> Figures:
        return Figures(0, 0, 0)

    def pings(messages: list[dict[str, str]]) -> int:
        return sum(1 for m in messages if m.get("WATCHDOG") == "1")

    async with UnitReporter(Notifier.from_environment(env), figures):
        assert receiver.drain()[0]["READY"] == "1"
        async with asyncio.timeout(60):
            while pings(receiver.messages) < 3:
                await asyncio.sleep(0.01)
                receiver.drain()

        def wedge() -> list[dict[str, str]]:
            """The fault: a callback that blocks the loop for twenty ping intervals. What was sent before it is
            drained first, so anything read at its end was sent while the loop was stuck."""
            receiver.drain()
            time.sleep(1.0)
            return receiver.drain()

        during = wedge()
        assert pings(during) == 0
        before = pings(receiver.messages)
        async with asyncio.timeout(60):
            while pings(receiver.messages) == before:
                await asyncio.sleep(0.01)
                receiver.drain()
    assert receiver.drain()[-1] == {"STOPPING": "1", "STATUS": "stopping"}


async def test_status_is_sent_when_it_changes_and_paced(receiver: Receiver, tmp_path: Path) -> None:
    now = [Figures(0, 0, 2)]

    async def figures() -> Figures:
        return now[0]

    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    async with UnitReporter(notifier, figures, check_s=0.01, pace_s=0.3):
        assert receiver.drain() == [
            {"READY": "1", "STATUS": "0 issued today; 0 of 2 stations connected; no alarms"}
        ]
        for issued in range(1, 30):  # thirty changes in ~0.3 s: a few lines, the last one the latest
            now[0] = Figures(issued, 1, 2)
            await asyncio.sleep(0.01)
        async with asyncio.timeout(60):
            while not receiver.messages or receiver.messages[-1].get("STATUS", "").split(" ")[0] != "29":
                await asyncio.sleep(0.02)
                receiver.drain()
        statuses = [m["STATUS"] for m in receiver.messages if "STATUS" in m]
        assert statuses[-1] == "29 issued today; 1 of 2 stations connected; no alarms"
        assert len(statuses) < 15  # paced: not one per change


# -- the clock alarm at start and between requests -----------------------------------------------------------------
async def test_clock_behind_raises_the_alarm_without_a_request_and_clears_when_set_right(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    future = time.time() + 7200  # the last issuance happened two hours "from now": the clock is behind
    journal.call(lambda: _insert(journal.conn, [(future, "issued")]))
    offset = [0.0]
    alarms, events = Alarms(), []
    alarms.subscribe(lambda event, alarm: events.append((event, alarm.cause)))
    profiles: dict[str, Profile] = dict(builtin_profiles())
    svc = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), profiles, alarms=alarms,
                       clock=lambda: time.time() + offset[0], health_interval_s=0.02)  # fmt: skip
    async with svc:
        alarm = alarms.get("issuance.clock-not-trusted")
        assert (
            alarm is not None and alarm.severity == "critical" and "behind the last issuance" in alarm.message
        )
        async with asyncio.timeout(60):  # several health passes see it: still one alarm, raised once
            while (a := alarms.get("issuance.clock-not-trusted")) is not None and a.count < 3:
                await asyncio.sleep(0.02)
        offset[0] = 7200.0  # the time is set right
        async with asyncio.timeout(60):
            while alarms.get("issuance.clock-not-trusted") is not None:
                await asyncio.sleep(0.02)
    assert events == [("raised", "issuance.clock-not-trusted"), ("cleared", "issuance.clock-not-trusted")]


# -- `birthline run` under a NOTIFY_SOCKET -----------------------------------------------------------------------
def _birthline(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "appliance.cli.main", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def _issued_today(journal: Path) -> int:
    with sqlite3.connect(f"file:{journal}?mode=ro", uri=True) as conn:
        return int(issued_since(conn, local_midnight(time.time())))


async def _station_connects(state: Path, port: int, receiver: Receiver) -> None:
    """A LAN station connects: STATUS says so (once paced), and again when it leaves."""
    bundle = state / "stations" / "demo-lan"
    ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
    client = await StationClient.connect_tcp("127.0.0.1", port, station_id="demo-lan",
                                             key=read_station_key(bundle / "station.key"), ssl_context=ctx,
                                             server_hostname="localhost", give_up_after=60)  # fmt: skip

    async def status_has(text: str) -> None:
        async with asyncio.timeout(120):
            while not any(text in m.get("STATUS", "") for m in receiver.drain()):
                await asyncio.sleep(0.05)

    await client.open()
    await status_has("; 1 of 2 stations connected; ")
    await client.close()
    await status_has("; 0 of 2 stations connected; ")


@pytest.mark.slow
def test_birthline_run_notifies_systemd(tmp_path: Path, receiver: Receiver) -> None:
    state, port = tmp_path / "demo", free_ports()
    demo = subprocess.run([sys.executable, "-m", "appliance.cli.main", "demo", "--state", str(state), "--devices",
                           "3", "--port", str(port)], capture_output=True, text=True, check=False)  # fmt: skip
    assert demo.returncode == 0, demo.stderr
    config = state / "birthline.toml"
    env = {**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "1000000"}
    env.pop("WATCHDOG_PID", None)
    issued = _issued_today(state / "journal.sqlite")
    assert issued >= 3

    proc = _birthline("run", "--config", config, env=env)
    try:
        ready = receiver.wait_for(lambda m: "READY" in m, "READY=1")
        # The daemon is frozen the moment READY arrives: every listener must already accept (the kernel completes
        # connections to a listening socket, so this needs listen() to have happened before READY=1 was sent).
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            for p in range(port, port + 6):  # LAN, VA, CMP, metrics, EST, SCEP (appliance/demo.py)
                socket.create_connection(("127.0.0.1", p), timeout=10).close()
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(state / "control.sock"))
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        assert receiver.messages[0] == {"STATUS": "starting: HSM login, journal, listeners"}
        # Six stations are registered; two have a link (demo-serial, demo-lan), four are CMP/EST/SCEP labels.
        assert ready["STATUS"].startswith(f"{issued} issued today; 0 of 2 stations connected; "), ready
        assert "clock" not in ready["STATUS"]
        asyncio.run(_station_connects(state, port, receiver))
        for _ in range(2):
            receiver.wait_for(lambda m: m.get("WATCHDOG") == "1", "WATCHDOG=1")
        proc.send_signal(signal.SIGTERM)
        receiver.wait_for(lambda m: m.get("STOPPING") == "1", "STOPPING=1")
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # The clock behind the last issuance (here: the last issuance moved two hours ahead): refused, and said so.
    with sqlite3.connect(state / "journal.sqlite") as conn:
        conn.execute("UPDATE issuance SET created_at = ? WHERE id = (SELECT MAX(id) FROM issuance)",
                     (time.time() + 7200,))  # fmt: skip
    receiver.messages.clear()
    proc = _birthline("run", "--config", config, env=env)
    try:
        ready = receiver.wait_for(lambda m: "READY" in m, "READY=1")
        assert ready["STATUS"].startswith("ISSUANCE REFUSED: the clock is behind the last issuance"), ready
        assert "(1 critical): issuance.clock-not-trusted" in ready["STATUS"], ready
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
