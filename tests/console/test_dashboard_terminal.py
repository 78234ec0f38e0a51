"""`birthline dashboard` in a real terminal (tmux) against a running daemon while simulated fixtures enrol: the
counts move, a pause typed on the keyboard takes effect, closing or killing the dashboard stops nothing, and a
daemon restart is shown and recovered from by itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from console.client import ControlClient
from tests.console.terminal import Terminal, grid_position, needs_tmux, station_row
from tests.ports import free_ports

pytestmark = [needs_tmux, pytest.mark.slow]
BIRTHLINE = f"{shlex.quote(sys.executable)} -m appliance.cli.launch"


def issued(sock: Path) -> int:
    """Certificates the daemon has issued since it started (its status document)."""

    async def read() -> int:
        async with ControlClient(sock) as api:
            return int((await api.status())["issuance"]["issued"])

    return asyncio.run(read())


def wait_issuing(sock: Path, more_than: int, what: str, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        now = issued(sock)
        if now > more_than:
            return now
        assert time.monotonic() < deadline, f"never: {what} (issued {now})"
        time.sleep(0.3)


def gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def stop(pid: int) -> None:
    """Stop a demo as Ctrl-C does; kill it if it does not go (the test must not leave it running)."""
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return
    if not gone(pid, 60):
        os.kill(pid, signal.SIGKILL)


@contextmanager
def served_demo(state: Path, port: int) -> Iterator[subprocess.Popen[str]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.launch", "demo", "--serve", "--state", str(state), "--devices", "2",
         "--port", str(port), "--gentle-rate", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while not (state / "demo.json").exists() or not (state / "control.sock").exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "demo.json never appeared"
            time.sleep(0.2)
        yield proc
    finally:
        # Our own child: stop() would see it as alive until it is reaped (a zombie still takes signal 0) and
        # wait its whole minute; communicate() reaps it as soon as it has gone.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate(timeout=30)


def test_demo_dashboard_pause_takes_effect_and_closing_it_stops_nothing(tmp_path: Path) -> None:
    """`birthline demo --dashboard` at 80x24: both stations and their counts moving; p on demo-lan, the
    password (pasted from the demo's secret file), a reason: demo-lan is paused and refused while demo-serial
    goes on; p again resumes it; q closes the dashboard and the appliance goes on issuing."""
    state = tmp_path / "demo"
    port = free_ports()
    term = Terminal(
        f"exec {BIRTHLINE} demo --dashboard --state {state} --port {port} --devices 2 --gentle-rate 4"
    )
    demo = term.pid()
    try:
        both = term.wait_for(
            lambda s: (station_row(s, "demo-serial") or ("", 0))[1] > 0 and (station_row(s, "demo-lan") or ("", 0))[1] > 0,
            "both demo stations issuing on the dashboard", timeout=180,
        )  # fmt: skip
        start = {name: station_row(both, name) for name in ("demo-serial", "demo-lan")}
        term.wait_for(
            lambda s: all((station_row(s, n) or ("", 0))[1] > c[1] for n, c in start.items() if c),
            "the counts moving",
        )  # fmt: skip
        term.keys(*["Down"] * grid_position(both, "demo-lan"), "p")
        term.wait_for(lambda s: "Log in" in s and "Password" in s, "the login form")
        term.paste_file(state / "demo-users.secret")
        term.keys("Enter")
        term.wait_for(lambda s: "Pause station demo-lan" in s, "the pause form")
        term.type("tmux test")
        term.keys("Enter")
        paused = term.wait_for(
            lambda s: (station_row(s, "demo-lan") or ("", 0))[0] == "paused", "demo-lan paused"
        )
        lan = station_row(paused, "demo-lan")
        serial = station_row(paused, "demo-serial")
        assert lan is not None and serial is not None
        later = term.wait_for(
            lambda s: (station_row(s, "demo-serial") or ("", 0))[1] >= serial[1] + 4
            and "STATION_PAU" in next((x for x in s.splitlines() if "demo-lan" in x), ""),
            "demo-serial issuing on while demo-lan is refused STATION_PAUSED",
        )  # fmt: skip
        # A request already being signed when the pause was recorded may finish; nothing after it.
        lan_then = station_row(later, "demo-lan")
        assert lan_then is not None and lan_then[0] == "paused" and lan_then[1] <= lan[1] + 1, (lan, lan_then)
        assert "demo-supervisor (supervisor)" in later
        term.keys("p")  # resume
        term.wait_for(
            lambda s: (station_row(s, "demo-lan") or ("", 0))[1] > lan_then[1], "demo-lan issuing again"
        )
        term.keys("q")
        term.wait_for(lambda s: "The dashboard closed; the appliance goes on serving" in s, "the demo's note")
        sock = Path(json.loads((state / "demo.json").read_text())["control"]["socket"])
        now = issued(sock)
        wait_issuing(sock, now + 3, "issuance after the dashboard closed")
    finally:
        stop(demo)
        term.close()


def test_dashboard_survives_a_daemon_restart_and_its_own_death_stops_nothing(tmp_path: Path) -> None:
    """`birthline dashboard` against a served demo: the daemon stops (DISCONNECTED shown), starts again (the
    dashboard reconnects by itself and the counts move again), hangs (SIGSTOP: DISCONNECTED) and goes on
    (SIGCONT: reconnected); then the dashboard is killed (SIGKILL) and issuance goes on."""
    state = tmp_path / "demo"
    port = free_ports()
    with served_demo(state, port):
        term = Terminal(f"exec {BIRTHLINE} dashboard --config {state / 'birthline.toml'}")
        try:
            term.wait_for(lambda s: "● connected" in s and (station_row(s, "demo-lan") or ("", 0))[1] > 0,
                          "the dashboard connected, demo-lan issuing", timeout=60)  # fmt: skip
        except BaseException:
            term.close()
            raise
    try:
        term.wait_for(lambda s: "DISCONNECTED" in s, "the daemon's absence shown")
        assert "demo-serial" in term.screen()  # the last known line stays on the screen, marked stale
        with served_demo(state, port) as again:
            screen = term.wait_for(
                lambda s: "● connected" in s and (station_row(s, "demo-serial") or ("", 0))[1] > 0
                and (station_row(s, "demo-lan") or ("", 0))[1] > 0,
                "reconnected by itself to the restarted daemon, both stations issuing", timeout=90,
            )  # fmt: skip
            assert "DISCONNECTED" not in screen
            # A daemon that stops answering without closing its socket (hung): the status request gives up.
            os.kill(again.pid, signal.SIGSTOP)
            try:
                term.wait_for(lambda s: "DISCONNECTED" in s, "a hung daemon shown", timeout=60)
            finally:
                os.kill(again.pid, signal.SIGCONT)
            term.wait_for(lambda s: "● connected" in s, "reconnected once it answers again", timeout=60)
            dashboard = term.pid()
            os.kill(dashboard, signal.SIGKILL)
            assert gone(dashboard, 30)
            sock = state / "control.sock"
            now = issued(sock)
            wait_issuing(sock, now + 3, "issuance after the dashboard was killed")
            assert again.poll() is None
    finally:
        term.close()
