"""Upgrading (docs/operations.md "Upgrading"): a whole state written by the previous release, its journal at the
previous schema with records still waiting for the upstream CA, is backed up, then opened by this release's
daemon: the journal is migrated in place, nothing leaves the upstream queue, the audit log verifies and issuance
goes on.

The previous release is the real one, not an imitation: its code (appliance/, hsm/, stations/) is taken from git
at the last commit before SCHEMA_VERSION took its present value, and its own `birthline demo`, `issue` and
`upstream sync` write the state."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from contextlib import closing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import load_der_x509_csr

from appliance.issuance.journal import SCHEMA_VERSION
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key
from tests.ports import free_ports

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILES = ("appliance/issuance/journal.py", "appliance/issuance/schema.py")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()


def _previous_release(into: Path) -> Path:
    """The code of the last commit whose journal had schema SCHEMA_VERSION - 1, extracted into `into`."""
    try:
        # The schema lived in journal.py up to version 5, in schema.py since (238629b): either may hold it.
        first = _git("log", "--reverse", "--format=%H", "-S", f"SCHEMA_VERSION = {SCHEMA_VERSION}", "--",
                     *SCHEMA_FILES).splitlines()  # fmt: skip
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"no git history to take the previous release from: {exc}")
    if not first:
        pytest.skip(
            "the git history does not reach the commit that introduced this schema (a shallow clone?)"
        )
    previous = f"{first[0]}~1"
    into.mkdir()
    archive = subprocess.run(["git", "archive", previous, "appliance", "hsm", "stations"], cwd=ROOT,
                             capture_output=True, check=True).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    held = [(into / f).read_text() for f in SCHEMA_FILES if (into / f).exists()]
    assert any(f"SCHEMA_VERSION = {SCHEMA_VERSION - 1}\n" in text for text in held)
    return into


def _run(code: Path | None, *args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """`birthline ARGS` of the previous release (its code first on the path) or, with code None, of this one."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = str(code)
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", *map(str, args)],
        cwd=code or ROOT, env=env, input=stdin, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def _rows(journal: Path, sql: str) -> list[tuple[object, ...]]:
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        return db.execute(sql).fetchall()


def _dead_port() -> int:
    """A loopback port nobody listens on: the upstream CA is down for the whole test."""
    with closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


OUTBOX = (
    "SELECT id, kind, issuance_id, cert_serial, transaction_id, csr_der, created_at FROM outbox ORDER BY id"
)


@pytest.mark.slow
def test_a_previous_release_state_with_a_pending_upstream_queue_upgrades_in_place(tmp_path: Path) -> None:
    old = _previous_release(tmp_path / "previous")
    state = tmp_path / "state"
    made = _run(old, "demo", "--state", state, "--devices", "3")
    assert made.returncode == 0, made.stdout + made.stderr
    config = state / "birthline.toml"
    port = free_ports()
    # The line forwards to an upstream CA (down): every issuance from now on waits in the outbox. The demo's
    # listeners move to free ports so the upgraded daemon can start beside other tests.
    text = config.read_text()
    for i, default in enumerate(range(7450, 7456)):
        text = text.replace(f"127.0.0.1:{default}", f"127.0.0.1:{port + i}")
    secret = state / "upstream.secret"
    secret.write_text(os.urandom(16).hex() + "\n")
    secret.chmod(0o600)
    config.write_text(text + f'\n[upstream]\nurl = "http://127.0.0.1:{_dead_port()}/pkix/"\nprotection = "mac"\n'
                      f'secret_file = "{secret}"\nkid = "ra"\n')  # fmt: skip
    users = (state / "demo-users.secret").read_text()
    for serial in ("MYDEV-0001", "MYDEV-0002"):
        csr = tmp_path / f"{serial}.csr"
        der = make_csr(generate_device_key(), serial)
        csr.write_bytes(load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM))
        issued = _run(old, "issue", "--config", config, "--station", "demo-lan", "--serial", serial, "--csr", csr,
                      "--user", "demo-supervisor", "--password-stdin", stdin=users)  # fmt: skip
        assert issued.returncode == 0, issued.stderr
    # One pass of the previous release's forwarder: the upstream is down, so the records are tried and wait.
    synced = _run(old, "upstream", "sync", "--once", "--config", config)
    assert synced.returncode == 1, synced.stdout + synced.stderr
    journal = state / "journal.sqlite"
    assert _rows(journal, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION - 1),)]
    queue = _rows(journal, OUTBOX)
    waiting = _rows(journal, "SELECT id FROM outbox WHERE state IN ('queued', 'sent', 'waiting')")
    assert len(waiting) >= 2 and _rows(journal, "SELECT MAX(attempts) FROM outbox") == [(1,)]
    certificates = _rows(journal, "SELECT cert_serial, cert_der FROM issuance WHERE cert_der IS NOT NULL")
    assert _run(old, "audit", "verify", "--config", config).returncode == 0

    # The procedure: 1. back up (this release reads the old state as it is, without migrating it).
    backup = _run(None, "backup", "--config", config, "--out", tmp_path / "before-upgrade.tgz")
    assert backup.returncode == 0, backup.stderr
    checked = json.loads(_run(None, "restore", tmp_path / "before-upgrade.tgz", "--check", "--json").stdout)
    assert checked["journal_schema"] == SCHEMA_VERSION - 1
    # 2. and 3. this release's daemon starts on the state: it migrates the journal, and a station enrols.
    daemon = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(config)], cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            with closing(socket.socket()) as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert daemon.poll() is None, daemon.communicate()
            assert time.monotonic() < deadline, "the upgraded daemon's LAN listener never came up"
            time.sleep(0.1)
        asyncio.run(_enrol(state / "stations" / "demo-lan", port, "MYDEV-0003"))
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(60)
        except subprocess.TimeoutExpired:
            daemon.kill()
    output = daemon.communicate()[0]
    assert daemon.returncode == 0, output

    # 4. check: the schema is this release's; every record of the queue is still there, byte for byte, still
    # waiting for the upstream CA, and the new issuance queued behind them; the audit log verifies.
    assert _rows(journal, "SELECT value FROM meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    after = _rows(journal, OUTBOX)
    assert after[: len(queue)] == queue and len(after) == len(queue) + 1
    still = {
        r[0] for r in _rows(journal, "SELECT id FROM outbox WHERE state IN ('queued', 'sent', 'waiting')")
    }
    assert {r[0] for r in waiting} | {after[-1][0]} <= still
    assert _rows(journal, "SELECT COUNT(*) FROM outbox WHERE state = 'done'") == [(0,)]
    status = json.loads(_run(None, "upstream", "status", "--config", config, "--json").stdout)
    assert status["open"] == len(still)
    now = _rows(journal, "SELECT cert_serial, cert_der FROM issuance WHERE cert_der IS NOT NULL")
    assert set(certificates) < set(now) and len(now) == len(certificates) + 1
    verified = _run(None, "audit", "verify", "--config", config)
    assert verified.returncode == 0 and "INTACT" in verified.stdout, verified.stdout + verified.stderr
    report = json.loads(_run(None, "report", "workorder", "WO-HAND", "--config", config, "--json").stdout)
    assert report["consistent"] is True and report["issued"] == 3, report


async def _enrol(bundle: Path, port: int, serial: str) -> None:
    client = await StationClient.connect_tcp(
        "127.0.0.1", port, station_id=bundle.name, key=read_station_key(bundle / "station.key"),
        ssl_context=client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt"),
        server_hostname="localhost",
    )  # fmt: skip
    try:
        assert await client.enroll(serial, make_csr(generate_device_key(), serial))
    finally:
        await client.close()
