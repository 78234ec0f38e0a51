"""Disk full on the state directory combined with SIGKILL, on the real daemon (`birthline run`, a child process)
whose state directory is a 16 MiB tmpfs that fills up for real (ENOSPC):

1. stations enrol; the filesystem is filled; enrolments are refused with JOURNAL_UNAVAILABLE and the daemon
   logs the alarm line;
2. the daemon is SIGKILLed while the disk is full, and started again while it is still full: it refuses to start
   (exit status 2, "journal unavailable while recording the start: disk full");
3. space returns: the daemon (started once more) issues every device, including those refused before.

Then: PRAGMA integrity_check ok, no intent left, no serial used twice, every certificate a station received is
in the journal with the same bytes, the work order's quota equals its live rows, the audit chain verifies.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

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
from stations.codes import Code
from stations.errors import GaveUp
from tests.appliance.conftest import put_on_line
from tests.daemon_config import lan_daemon_config
from tests.ports import free_ports
from tests.real_faults import fill, small_tmpfs

pytestmark = pytest.mark.slow

ALARM = "ALARM issuance.journal-unavailable"


class _Daemon:
    def __init__(self, config: Path, log: Path) -> None:
        self.log = log
        with open(log, "a") as f:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(config)],
                stdout=subprocess.DEVNULL, stderr=f,
            )  # fmt: skip

    async def listening(self, port: int) -> bool:
        """True once it accepts connections; False if it exited first."""
        async with asyncio.timeout(120):  # a deadlock guard only
            while self.proc.poll() is None:
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                w.close()
                return True
        return False

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)


def test_disk_full_then_sigkill_loses_nothing_and_resumes(
    tmp_path: Path, softhsm_token: SoftHsmToken, production_journal_template: Path, hsm_token: Token
) -> None:
    with small_tmpfs(tmp_path / "state", "16m") as state:
        shutil.copy(production_journal_template, state / "journal.sqlite")
        port = free_ports(1)
        config = tmp_path / "birthline.toml"
        config.write_text(lan_daemon_config(state, softhsm_token, port))
        with Journal(state / "journal.sqlite") as journal:
            audit = AuditLog(journal)
            creds = reg.add_station(journal, hsm_token, "df", "lan", audit=audit, actor="alice")
            put_on_line(journal, "df")
            reg.write_bundle(creds, tmp_path / "df")
            spec = WorkOrderSpec("WO-DF", "sensor", 100, ("L1",), ranges=(SerialRange("DF-", 0, 999, 4),))
            store.add_work_order(journal, audit, User("alice", Role.ADMINISTRATOR), spec, activate=True)
        bundle = tmp_path / "df"
        ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
        devices = {f"DF-{n:04d}": make_csr(generate_device_key(), f"DF-{n:04d}") for n in range(12)}
        received: dict[str, bytes] = {}

        async def enrol(serials: list[str], give_up_after: float) -> dict[str, int]:
            """Enrol each serial; returns the code each refused one was last answered with."""
            client = await StationClient.connect_tcp(
                "127.0.0.1", port, station_id="df", key=read_station_key(bundle / "station.key"),
                ssl_context=ctx, server_hostname="localhost", request_timeout=10.0, give_up_after=give_up_after,
            )  # fmt: skip
            refused: dict[str, int] = {}
            try:
                for serial in serials:
                    try:
                        chain = await client.enroll(serial, devices[serial])
                    except GaveUp as exc:
                        refused[serial] = int(exc.last_code or 0)
                        continue
                    if serial in received:
                        assert chain[0] == received[serial], "a retry got another certificate"
                    received[serial] = chain[0]
            finally:
                with contextlib.suppress(Exception):
                    await client.close()
            return refused

        log = tmp_path / "daemon.log"
        names = sorted(devices)
        daemon = _Daemon(config, log)
        try:
            assert asyncio.run(daemon.listening(port)), log.read_text()
            assert asyncio.run(enrol(names[:4], 120)) == {}

            # The WAL is reused after a checkpoint: empty it, so that the next commit needs new space.
            with contextlib.closing(sqlite3.connect(state / "journal.sqlite")) as conn:
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            filler = fill(state)
            refused = asyncio.run(enrol(names[4:8], 4))
            assert refused == dict.fromkeys(names[4:8], int(Code.JOURNAL_UNAVAILABLE)), refused
            assert ALARM in log.read_text()

            daemon.kill()  # while the disk is full
            daemon = _Daemon(config, log)
            # Still full: it refuses to start, saying why (systemd would try again; nothing is issued meanwhile).
            assert not asyncio.run(daemon.listening(port))
            assert daemon.proc.returncode == 2
            assert "journal unavailable while recording the start: disk full" in log.read_text()
            filler.unlink()

            daemon = _Daemon(config, log)
            assert asyncio.run(daemon.listening(port)), log.read_text()
            assert asyncio.run(enrol(names, 120)) == {}
        finally:
            daemon.stop()
        assert set(received) == set(devices)

        with Journal(state / "journal.sqlite") as journal:
            assert journal.integrity_check() == "ok"
            rows = journal.rows()
            serials = [r.cert_serial for r in rows]
            assert len(serials) == len(set(serials)), "a certificate serial was reused"
            assert not [r for r in rows if r.state == "intent"], "an intent survived a restart"
            live = {r.device_serial: r for r in rows if r.state in ("issued", "confirmed")}
            assert len(live) == len([r for r in rows if r.state in ("issued", "confirmed")]), "two live rows"
            for serial, cert in received.items():
                assert live[serial].cert_der == cert, (
                    f"{serial}: the station holds a certificate the journal lacks"
                )
            assert reconcile.quota_problems(journal) == []
            report = audit_verify(journal)
            assert report.ok, report.text()
