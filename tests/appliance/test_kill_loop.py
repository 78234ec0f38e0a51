"""SIGKILL the running daemon (`birthline run`, a real process) at random moments while stations enrol, restart
it, let the fixtures retry, and check the promises of reliability.md section 1 afterwards:

- every certificate a fixture received is in the journal as issued or confirmed (never released unstored);
- no certificate serial is used twice; every intent left by a kill is burned, never issued;
- each device has at most one live certificate, and a retry got the same one;
- the work order's quota equals its live rows; the audit chain verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509

from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.audit.verify import verify as audit_verify
from appliance.issuance.journal import Journal
from appliance.production import reconcile, store
from appliance.production.allowlist import SerialRange
from appliance.production.model import WorkOrderSpec
from appliance.production.users import Role, User
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key
from stations.errors import StationError
from tests.appliance.conftest import put_on_line
from tests.daemon_config import lan_daemon_config
from tests.ports import free_ports

pytestmark = pytest.mark.slow

STATIONS = 3
DEVICES = 240  # KL-0000.. : the test's own work order, 300 units


def _start(config: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(config)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip


async def _listening(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.poll() is None, "birthline run exited"
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        w.close()
        return
    raise AssertionError("birthline run never listened")


def test_random_sigkill_loop_keeps_every_promise(
    tmp_path: Path, softhsm_token: SoftHsmToken, production_journal_template: Path, hsm_token: Token
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
    shutil.copy(production_journal_template, state / "journal.sqlite")
    port = free_ports(1)
    config = tmp_path / "birthline.toml"
    config.write_text(lan_daemon_config(state, softhsm_token, port))
    with Journal(state / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        for i in range(STATIONS):
            creds = reg.add_station(journal, hsm_token, f"k{i}", "lan", audit=audit, actor="alice")
            put_on_line(journal, f"k{i}")
            reg.write_bundle(creds, tmp_path / f"k{i}")
        spec = WorkOrderSpec("WO-KILL", "sensor", 300, ("L1",), ranges=(SerialRange("KL-", 0, 999, 4),))
        store.add_work_order(journal, audit, User("alice", Role.ADMINISTRATOR), spec, activate=True)

    # Each device keeps its key and CSR across kills: a retry is the same request.
    devices = {f"KL-{n:04d}": make_csr(generate_device_key(), f"KL-{n:04d}") for n in range(DEVICES)}
    received: dict[str, bytes] = {}
    rng = random.Random(int(os.environ.get("BIRTHLINE_KILL_SEED", "7")))

    async def fixture(i: int, serials: list[str]) -> None:
        """Enrol `serials` until done; reconnect after every failure (the daemon is killed under us)."""
        bundle = tmp_path / f"k{i}"
        ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
        while any(s not in received for s in serials):
            try:
                client = await StationClient.connect_tcp(
                    "127.0.0.1", port, station_id=f"k{i}", key=read_station_key(bundle / "station.key"),
                    ssl_context=ctx, server_hostname="localhost", request_timeout=10.0, give_up_after=60.0,
                )  # fmt: skip
            except (StationError, OSError):
                await asyncio.sleep(0.1)
                continue
            try:
                for serial in serials:
                    if serial in received:
                        continue
                    chain = await client.enroll(serial, devices[serial])
                    if serial in received:  # a retry after a kill: must be the very same certificate
                        assert chain[0] == received[serial]
                    received[serial] = chain[0]
            except (StationError, OSError):
                await asyncio.sleep(0.1)  # the daemon was killed under us; reconnect and retry
            finally:
                with contextlib.suppress(StationError, OSError):
                    await client.close()

    async def round_(kill_after: int | None) -> None:
        """Run the daemon; with kill_after, SIGKILL it once that many more devices have their certificate (so
        the kill lands mid-work however slow the machine is), then stop the fixtures."""
        proc = _start(config)
        try:
            await _listening(port, proc)
            serials = [s for s in devices if s not in received]
            work = asyncio.gather(*(fixture(i, serials[i::STATIONS]) for i in range(STATIONS)))
            if kill_after is None:
                await work
                return
            target = len(received) + kill_after
            while len(received) < target and not work.done():
                await asyncio.sleep(0.005)
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await work
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    interrupted = 0

    async def scenario() -> None:
        nonlocal interrupted
        for _ in range(4):
            before = len(received)
            await round_(rng.randint(1, 40))
            # A kill that landed while devices were still being served (the case this test is about).
            interrupted += before < len(received) < len(devices)
        await round_(None)  # the last run completes, and its start burned whatever the last kill left

    asyncio.run(scenario())

    assert set(received) == set(devices), "every device got its certificate in the end"
    assert interrupted >= 1, "no kill landed in the middle of the work: the test proved nothing"
    with Journal(state / "journal.sqlite") as journal:
        rows = journal.rows()
        assert journal.integrity_check() == "ok"
        serials = [r.cert_serial for r in rows]
        assert len(serials) == len(set(serials)), "a certificate serial was reused"
        assert not [r for r in rows if r.state == "intent"], "an intent survived a restart"
        live = {r.device_serial: r for r in rows if r.state in ("issued", "confirmed")}
        assert len(live) == len([r for r in rows if r.state in ("issued", "confirmed")]), "two live rows"
        for serial, cert in received.items():
            assert live[serial].cert_der == cert, (
                f"{serial}: the station holds a certificate the journal lacks"
            )
            assert x509.load_der_x509_certificate(cert).serial_number == int(live[serial].cert_serial, 16)
        for r in rows:
            if r.state == "burned":
                assert r.cert_der is None
        assert reconcile.quota_problems(journal) == []
        report = audit_verify(journal)
        assert report.ok, report.text()


def _children(pid: int) -> set[int]:
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.add(int(entry.name))
    return out


def test_prepare_workers_do_not_outlive_a_killed_daemon(
    tmp_path: Path, softhsm_token: SoftHsmToken, production_journal_template: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
    shutil.copy(production_journal_template, state / "journal.sqlite")
    port = free_ports(1)
    config = tmp_path / "birthline.toml"
    config.write_text(lan_daemon_config(state, softhsm_token, port))
    proc = _start(config)
    try:
        asyncio.run(_listening(port, proc))
        children = _children(proc.pid)
        assert children, "the daemon started no prepare worker"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(Path(f"/proc/{c}").exists() for c in children):
        time.sleep(0.2)
    alive = [
        c
        for c in children
        if Path(f"/proc/{c}").exists() and "Z" not in Path(f"/proc/{c}/stat").read_text().split(")")[1][:3]
    ]
    assert not alive, f"processes of the killed daemon still run: {alive}"
