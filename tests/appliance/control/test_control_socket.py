"""The control socket as a listener: its permissions, its bounds, and a slow console that never slows issuance."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.control.events import EventBus
from appliance.daemon import Daemon
from console import wire
from console.client import ControlClient, ControlError
from hsm.softhsm import SoftHsmToken
from tests.appliance.control.conftest import control_config

# The probe runs as nobody, who cannot read root's virtualenv: the system's interpreter (stdlib only) runs it.
PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
GROUP = "daemon"  # an existing group that root's tests can hand the socket to; nobody is not in it

# A client as another user: connect and GET the status; prints the HTTP status line or the error.
PROBE = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except OSError as exc:
    print("ERR", exc.errno); sys.exit(0)
s.sendall(b"GET /v1/status HTTP/1.0\\r\\n\\r\\n")
print(s.recv(64).split(b"\\r\\n")[0].decode())
"""


def _as(uid: int, gid: int, extra: list[int], path: Path) -> str:
    out = subprocess.run([PYTHON, "-c", PROBE, str(path)], user=uid, group=gid, extra_groups=extra,
                         capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    return out.stdout.strip()


@pytest.mark.skipif(os.geteuid() != 0, reason="runs clients as other users")
async def test_socket_is_0660_in_its_group_and_only_that_group_gets_in(
    softhsm_token: SoftHsmToken, people_journal_template: Path, short_dir: Path
) -> None:
    state = short_dir / "state"
    config = control_config(state, softhsm_token, people_journal_template, group=GROUP)
    gid = grp.getgrnam(GROUP).gr_gid
    nobody, nogroup = 65534, 65534
    async with Daemon(config):
        sock = config.control_socket
        st = sock.stat()
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o660 and st.st_gid == gid
        dir_st = state.stat()
        assert stat.S_IMODE(dir_st.st_mode) == 0o710 and dir_st.st_gid == gid  # traverse only, nothing listed
        member = await asyncio.to_thread(_as, nobody, nogroup, [gid], sock)
        outsider = await asyncio.to_thread(_as, nobody, nogroup, [], sock)
        assert member.split()[1:2] == ["200"], member
        assert outsider == "ERR 13", outsider  # EACCES
    assert not sock.exists()  # removed on exit


async def test_a_second_daemon_does_not_steal_a_live_socket_but_replaces_a_dead_one(
    softhsm_token: SoftHsmToken, people_journal_template: Path, short_dir: Path
) -> None:
    from appliance.control.unix import ControlSocketBusy, bind_control_socket

    config = control_config(short_dir / "state", softhsm_token, people_journal_template)
    async with Daemon(config):
        with pytest.raises(ControlSocketBusy):
            bind_control_socket(config.control_socket)
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(config.control_socket))  # a socket file nobody listens on (a daemon that was killed)
    dead.close()
    async with Daemon(config), ControlClient(config.control_socket) as api:
        assert (await api.status())["api"] == wire.API_VERSION


async def test_connection_cap_and_request_deadline(
    softhsm_token: SoftHsmToken, people_journal_template: Path, short_dir: Path
) -> None:
    config = control_config(short_dir / "state", softhsm_token, people_journal_template, max_connections=4,
                            max_subscribers=2, request_timeout_s=0.5)  # fmt: skip
    async with Daemon(config) as d:
        assert d.control is not None and d.control.server is not None
        gate = d.control.server.gate
        held = [await asyncio.open_unix_connection(str(config.control_socket)) for _ in range(4)]
        reader, writer = await asyncio.open_unix_connection(str(config.control_socket))
        answer = await asyncio.wait_for(reader.read(), 10)
        assert answer.startswith(b"HTTP/1.1 503") and b'"busy"' in answer
        writer.close()
        # The held connections sent nothing: each is closed by the request deadline, and the cap frees up.
        for r, _w in held:
            assert await asyncio.wait_for(r.read(), 10) == b""
        assert gate.timed_out >= 4 and gate.refused >= 1
        async with ControlClient(config.control_socket) as api:
            assert (await api.status())["api"] == wire.API_VERSION
        # A partial request is no request: it is cut off too.
        r, w = await asyncio.open_unix_connection(str(config.control_socket))
        w.write(b"GET /v1/status HTTP/1.1\r\nHost: x\r\n")
        assert await asyncio.wait_for(r.read(), 10) == b""


async def test_a_console_that_stops_reading_is_dropped_and_the_others_get_every_event(
    softhsm_token: SoftHsmToken, people_journal_template: Path, short_dir: Path
) -> None:
    config = control_config(short_dir / "state", softhsm_token, people_journal_template, subscriber_queue=16)
    async with Daemon(config) as d, ControlClient(config.control_socket) as api:
        assert d.control is not None
        bus = d.control.hub.bus
        # The stalled console: subscribes, then never reads.
        _stalled, w = await asyncio.open_unix_connection(str(config.control_socket), limit=1024)
        w.write(b"GET /v1/events HTTP/1.1\r\nHost: x\r\n\r\n")
        await w.drain()
        got: list[int] = []

        async def follow() -> None:
            async for event in api.events():
                if event["type"] == "test":
                    got.append(event["n"])
                    if event["n"] == 4_999:
                        return

        async with asyncio.timeout(30):
            while bus.subscribers < 1:
                await asyncio.sleep(0.01)
        reader = asyncio.create_task(follow())
        async with asyncio.timeout(30):
            while bus.subscribers < 2:
                await asyncio.sleep(0.01)
        healthy = bus._subscribers[1]
        for n in range(5_000):
            bus.publish("test", {"n": n, "pad": "x" * 200})  # never waits, whoever reads or not
            if n % 8 == 7:
                # A console that keeps up: its queue is empty again before the next few events. (The stalled one's
                # socket buffer fills after a few hundred kB; then its queue does, and it is dropped.)
                async with asyncio.timeout(30):
                    while not healthy.queue.empty():
                        await asyncio.sleep(0.001)
        await asyncio.wait_for(reader, 60)
        assert got == list(range(5_000))
        assert bus.dropped_subscribers == 1 and not healthy.dropped
        w.close()


def test_a_full_queue_drops_only_that_subscriber_and_publish_never_blocks() -> None:
    bus = EventBus(queue_size=16, max_subscribers=3)
    slow, fast = bus.subscribe(), bus.subscribe()
    assert slow is not None and fast is not None
    for n in range(40):
        bus.publish("x", {"n": n})
        fast.queue.get_nowait()
    assert slow.dropped and not fast.dropped and bus.subscribers == 1
    last = [slow.queue.get_nowait(), slow.queue.get_nowait()]
    assert last[0] is not None and last[0]["type"] == wire.EVENT_DROPPED and last[1] is None
    assert bus.subscribe() is not None and bus.subscribe() is not None and bus.subscribe() is None


async def test_metrics_are_openmetrics_with_the_documented_families(
    softhsm_token: SoftHsmToken, people_journal_template: Path, short_dir: Path
) -> None:
    import aiohttp
    from prometheus_client.openmetrics.parser import text_string_to_metric_families

    from appliance.audit.log import AuditLog
    from appliance.issuance.policy import IssueRequest
    from appliance.production.users import Role, User
    from appliance.va.revocation import Reason, revoke
    from tests.appliance.conftest import make_csr

    config = control_config(short_dir / "state", softhsm_token, people_journal_template)
    async with Daemon(config) as d:
        assert d.control is not None and d.control.metrics_url is not None and d.enroller is not None
        svc = d.enroller.service
        result = await svc.issue(IssueRequest("SN-0060", make_csr("SN-0060")[1], station="fixture-1"))
        await svc.confirm(result.cert_serial)
        # Revoked by another process's CLI in real life: the journal is what the scrape reads.
        revoke(d.journal, AuditLog(d.journal), User("sam", Role.SUPERVISOR), cert_serial=result.cert_serial,
               reason=Reason.KEY_COMPROMISE)  # fmt: skip
        with pytest.raises(Exception):  # noqa: B017 - any refusal will do
            await svc.issue(IssueRequest("BAD-1", make_csr("BAD-1")[1], station="fixture-1"))
        async with aiohttp.ClientSession() as http:
            async with http.get(
                d.control.metrics_url, headers={"Accept": "application/openmetrics-text"}
            ) as r:
                assert r.headers["Content-Type"].startswith("application/openmetrics-text")
                text = await r.text()
            async with http.get(d.control.metrics_url) as r:
                assert "# TYPE birthline_issued_total counter" in await r.text()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples
    }
    assert samples[("birthline_issued_total", (("product", "sensor"), ("station", "fixture-1")))] == 1
    assert samples[("birthline_refused_total", (("product", ""), ("reason", "NOT_AUTHORISED"),
                                                ("station", "fixture-1")))] == 1  # fmt: skip
    assert samples[("birthline_confirmed_total", (("station", "fixture-1"),))] == 1
    assert samples[("birthline_hsm_sign_seconds_count", ())] >= 1
    assert samples[("birthline_journal_commit_seconds_count", ())] >= 3
    assert samples[("birthline_confirmation_lag_seconds_count", ())] == 1
    assert samples[("birthline_upstream_queue_depth", ())] == 1  # standalone: the revocation's record alone
    assert ("birthline_alarms_active", (("severity", "critical"),)) in samples
    assert samples[("birthline_revoked_certificates", (("reason", "keyCompromise"),))] == 1
    doc = (Path(__file__).resolve().parents[3] / "docs" / "metrics.md").read_text()
    for name in families:
        if name.startswith("birthline_") and not name.startswith("birthline_process"):
            assert f"`{name}" in doc, f"{name} is not in docs/metrics.md"
    json.dumps(sorted(families))


async def test_metrics_scrapes_come_from_a_snapshot_and_each_address_is_paced(
    softhsm_token: SoftHsmToken, people_journal_template: Path, short_dir: Path
) -> None:
    """16 connections scraping as fast as they are answered cut issuance from 168 to 13-16 certificates/s: every
    scrape read the journal and built the text. Now a scrape is answered from a snapshot at most SNAPSHOT_S old
    (the journal read once per snapshot), and an address scraping faster than SCRAPE_RATE waits and then gets
    503: a scraper cannot make the daemon work more than a few times a second."""
    import time

    import aiohttp

    from appliance.control.metrics import SCRAPE_BURST, SCRAPE_MAX_DELAY_S, SCRAPE_RATE, SNAPSHOT_S

    config = control_config(short_dir / "state", softhsm_token, people_journal_template)
    async with Daemon(config) as d:
        assert d.control is not None and d.control.metrics is not None and d.control.metrics_url is not None
        metrics, url = d.control.metrics, d.control.metrics_url
        reads = 0
        queue = metrics._queue

        def counted() -> object:
            nonlocal reads
            reads += 1
            return queue()

        metrics._queue = counted  # type: ignore[method-assign]
        statuses: list[int] = []

        async def scraper(http: aiohttp.ClientSession, n: int) -> None:
            for _ in range(n):
                async with http.get(url) as r:
                    body = await r.read()
                    statuses.append(r.status)
                    if r.status == 200:
                        assert b"birthline_issued_total" in body
                    else:
                        assert r.headers["Retry-After"] == "1"

        connector = aiohttp.TCPConnector(limit=8, force_close=False)
        async with aiohttp.ClientSession(connector=connector) as http:
            started = time.monotonic()
            await asyncio.gather(*(scraper(http, 8) for _ in range(8)))
            elapsed = time.monotonic() - started
    ok, busy = statuses.count(200), statuses.count(503)
    assert ok + busy == 64
    # Within the address's rate (a burst, then SCRAPE_RATE a second, each waiting at most SCRAPE_MAX_DELAY_S) ...
    assert SCRAPE_BURST <= ok <= SCRAPE_BURST + SCRAPE_RATE * (elapsed + SCRAPE_MAX_DELAY_S) + 1, (
        ok,
        elapsed,
    )
    assert busy > 0
    # ... and the journal read once per snapshot, however many scrapes were answered.
    assert 1 <= reads <= 1 + elapsed / SNAPSHOT_S, (reads, ok, elapsed)


async def _raw(path: Path, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """One request as bytes; the answer's status, headers and body (read to the end: these close)."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(request)
        answer = await asyncio.wait_for(reader.read(), 30)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def test_malformed_requests_answer_json_and_are_logged_once_without_their_bytes(
    softhsm_token: SoftHsmToken,
    people_journal_template: Path,
    short_dir: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import logging

    caplog.set_level(logging.DEBUG)
    config = control_config(short_dir / "state", softhsm_token, people_journal_template)
    secret = b"Sup3rSecretPW"
    long_url = b"POST /v1/login?password=" + secret + b"&pad=" + b"a" * 9000 + b" HTTP/1.1\r\nHost: b\r\n"
    long_header = b"GET /v1/status HTTP/1.1\r\nHost: b\r\nX-Pad: " + secret + b"a" * 9000 + b"\r\n\r\n"
    async with Daemon(config):
        sock = config.control_socket
        for request in (long_url + b"Content-Length: 2\r\n\r\n{}",) * 3 + (long_header,) * 3:
            status, headers, body = await _raw(sock, request)
            assert status == 400 and headers["content-type"].startswith("application/json"), (status, headers)
            assert json.loads(body)["error"] == wire.ERR_BAD_REQUEST
        # A body nested too deeply is a bad request, not a defect (500).
        deep = b'{"user": "olga", "password": ' + b"[" * 5000 + b"]" * 5000 + b"}"
        status, _, body = await _raw(sock, b"POST /v1/login HTTP/1.1\r\nHost: b\r\nConnection: close\r\n"
                                     b"Content-Length: %d\r\n\r\n%s" % (len(deep), deep))  # fmt: skip
        assert status == 400 and "nested too deeply" in json.loads(body)["message"], body
        # A wrong method is 405 with its own code; an overlong password is said to be too long.
        status, _, body = await _raw(sock, b"GET /v1/login HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
        assert status == 405 and json.loads(body)["error"] == wire.ERR_METHOD_NOT_ALLOWED
        async with ControlClient(sock) as api:
            with pytest.raises(ControlError) as too_long:
                await api.login("olga", "x" * 15_000)
        assert "longer than" in str(too_long.value)
    refused = [r for r in caplog.records if "refused before it was read" in r.getMessage()]
    assert 1 <= len(refused) <= 2, [r.getMessage() for r in refused]  # once per kind (URL, header)
    assert secret.decode() not in caplog.text
    assert not [r for r in caplog.records if r.name == "aiohttp.server" and r.levelno >= logging.WARNING]


async def test_the_connection_cap_holds_for_a_burst(
    softhsm_token: SoftHsmToken, people_journal_template: Path, short_dir: Path
) -> None:
    """Connections opened at once (asyncio accepts them in one batch) are counted one by one: exactly the cap
    gets in, the rest get 503 busy."""
    config = control_config(short_dir / "state", softhsm_token, people_journal_template, max_connections=4)

    def burst() -> list[bytes]:
        socks = []
        for _ in range(20):  # all connected before the daemon accepts any: one batch
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(config.control_socket))
            socks.append(s)
        lines = []
        for s in socks:
            s.settimeout(30)
            with contextlib.suppress(
                BrokenPipeError, ConnectionResetError
            ):  # refused and closed: its 503 waits
                s.sendall(b"GET /v1/alarms HTTP/1.1\r\nHost: b\r\n\r\n")
            lines.append(s.recv(12))
        for s in socks:
            s.close()
        return lines

    async with Daemon(config):
        lines = await asyncio.to_thread(burst)
    assert lines.count(b"HTTP/1.1 200") == 4, lines
    assert lines.count(b"HTTP/1.1 503") == 16, lines


async def test_a_stream_whose_socket_accepts_nothing_is_closed_and_counted_dropped(
    softhsm_token: SoftHsmToken,
    people_journal_template: Path,
    short_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A console that never reads, with a queue too large to fill: its socket fills, the write times out, and the
    stream is closed and counted in birthline_control_event_streams_dropped_total (no `dropped` event can reach
    it)."""
    from appliance.control import server

    monkeypatch.setattr(server, "WRITE_TIMEOUT_S", 0.5)
    config = control_config(
        short_dir / "state", softhsm_token, people_journal_template, subscriber_queue=1_000_000
    )
    async with Daemon(config) as d:
        assert d.control is not None
        bus = d.control.hub.bus
        s = socket.socket(socket.AF_UNIX)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(str(config.control_socket))
        s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: b\r\n\r\n")  # and never read
        try:
            async with asyncio.timeout(120):  # a hang guard: the stream goes once its socket is full
                while not bus.subscribers:
                    await asyncio.sleep(0.01)
                while bus.subscribers:
                    for _ in range(50):
                        bus.publish("test", {"pad": "x" * 1000})
                    await asyncio.sleep(0.02)
        finally:
            s.close()
        assert bus.dropped_subscribers == 1
