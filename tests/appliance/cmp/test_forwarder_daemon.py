"""The daemon's own forwarder: a real `birthline run` process with [upstream] pointing to a second Birthline
instance (the `upstream` fixture: a CmpResponder served in this process on 127.0.0.1). Devices are issued through
the daemon (three by a LAN station with the station client: p10cr records; one by `openssl cmp -cmd ir` on the
daemon's CMP endpoint: a cr record), and the daemon forwards them by itself; `birthline upstream status --json`
then reports the queue empty, and `birthline upstream sync` refuses to run beside the daemon's forwarder."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import ca as ca_mod
from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.issuance.journal import Journal
from appliance.production import store
from appliance.production.users import Role, User
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key
from tests.appliance.cmp.upstream_support import (
    SPKI,
    Upstream,
    birthline,
    child_env,
    write_config,
    write_pem,
)
from tests.appliance.conftest import put_on_line

pytestmark = [
    pytest.mark.slow,  # a subprocess daemon
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
]

CMP_SECRET = "daemon secret"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _listening(port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert proc.returncode is None, "birthline run exited:\n" + log.read_text()
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        w.close()
        return
    raise AssertionError("birthline run never listened:\n" + log.read_text())


@contextlib.asynccontextmanager
async def _daemon(config: Path, log: Path, *ports: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """`birthline run --config` until its listeners answer; stopped with SIGTERM after, and it must exit 0."""
    with open(log, "wb") as log_file:
        daemon = await asyncio.create_subprocess_exec(*birthline("run", "--config", str(config)), env=child_env(),
                                                      stdout=log_file, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        for port in ports:
            await _listening(port, daemon, log)
        yield daemon
    finally:
        if daemon.returncode is None:
            daemon.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(daemon.wait(), 30)
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
    assert daemon.returncode == 0, log.read_text()


def _outbox(journal: Path) -> list[dict[str, Any]]:
    """The daemon's outbox, read-only (the daemon owns the journal)."""
    conn = sqlite3.connect(f"file:{journal}?mode=ro", uri=True, timeout=10)
    try:
        cur = conn.execute("SELECT * FROM outbox ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    finally:
        conn.close()


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*birthline(*args), env=child_env(),
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_the_daemon_forwards_what_it_issues_and_upstream_status_reports_it(
    upstream: Upstream,
    softhsm_token: SoftHsmToken,
    hsm_token: Token,
    production_journal_template: Path,
    tmp_path: Path,
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
    journal_path = state / "journal.sqlite"
    shutil.copy(production_journal_template, journal_path)
    with Journal(journal_path) as journal:
        creds = reg.add_station(journal, hsm_token, "st1", "lan", audit=AuditLog(journal), actor="alice")
        put_on_line(journal, "st1")
        reg.write_bundle(creds, tmp_path / "st1")
    secret = tmp_path / "line1.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, CMP_SECRET.encode() + b"\n")
    os.close(fd)
    lan, cmp_port = _free_port(), _free_port()
    extra = (
        f'[stations]\nlan_listen = "127.0.0.1:{lan}"\ntls_dir = "{state / "tls"}"\n'
        f'[cmp]\nlisten = "127.0.0.1:{cmp_port}"\n'
        f'[cmp.labels.line1]\nstation = "fixture-1"\nsecret_file = "{secret}"\n'
    )
    config = write_config(
        tmp_path / "birthline.toml", softhsm_token, state=state, journal=journal_path, extra=extra,
        upstream={"url": upstream.url, "mode": "batched", "batch_max": 10, "batch_wait_s": 0.5, "poll_s": 0.2,
                  "server_cert": write_pem(tmp_path / "upstream-ra.pem", upstream.ra.certificate),
                  "backoff_base_s": 0.2, "backoff_cap_s": 2},
    )  # fmt: skip

    log = tmp_path / "daemon.log"
    async with _daemon(config, log, lan, cmp_port):
        # three devices through a LAN station (p10cr records)
        keys: dict[str, bytes] = {}
        local_certs: dict[str, bytes] = {}
        bundle = tmp_path / "st1"
        client = await StationClient.connect_tcp(
            "127.0.0.1", lan, station_id="st1", key=read_station_key(bundle / "station.key"),
            ssl_context=client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt"),
            server_hostname="localhost",
        )  # fmt: skip
        try:
            for serial in ("SN-0001", "SN-0002", "SN-0003"):
                key = generate_device_key()
                chain = await client.enroll(serial, make_csr(key, serial))
                keys[serial] = key.public_key().public_bytes(*SPKI)
                local_certs[serial] = chain[0]
        finally:
            await client.close()

        # one device through the daemon's CMP endpoint (ir with a CRMF public key: a cr record)
        dev_key = ec.generate_private_key(ec.SECP256R1())
        (tmp_path / "dev.key").write_bytes(dev_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            "openssl", "cmp", "-config", "", "-cmd", "ir", "-server", f"127.0.0.1:{cmp_port}",
            "-path", ".well-known/cmp/p/line1", "-ref", "line1", "-secret", f"pass:{CMP_SECRET}",
            "-mac", "hmacWithSHA256", "-recipient", "/CN=x", "-newkey", str(tmp_path / "dev.key"),
            "-subject", "/serialNumber=SN-0007", "-certout", str(tmp_path / "out.pem"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (out + err).decode()
        keys["SN-0007"] = dev_key.public_key().public_bytes(*SPKI)
        local_certs["SN-0007"] = x509.load_pem_x509_certificate(
            (tmp_path / "out.pem").read_bytes()
        ).public_bytes(serialization.Encoding.DER)

        # the daemon's forwarder delivers them, with nobody asking
        deadline = time.monotonic() + 60
        rows = _outbox(journal_path)
        while time.monotonic() < deadline and not (len(rows) == 4 and {r["state"] for r in rows} == {"done"}):
            await asyncio.sleep(0.2)
            rows = _outbox(journal_path)
        assert len(rows) == 4 and {r["state"] for r in rows} == {"done"}, (rows, log.read_text())
        assert sorted(r["kind"] for r in rows) == ["cr", "p10cr", "p10cr", "p10cr"]
        conn = sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True, timeout=10)
        try:
            by_serial = dict(conn.execute("SELECT cert_serial, device_serial FROM issuance").fetchall())
        finally:
            conn.close()
        upstream_certs = set()
        for r in rows:
            device = by_serial[r["cert_serial"]]
            cert = x509.load_der_x509_certificate(bytes(r["upstream_cert_der"]))
            assert cert.public_key().public_bytes(*SPKI) == keys[device], device
            assert cert.public_bytes(serialization.Encoding.DER) != local_certs[device]  # the upstream's own
            upstream_certs.add(bytes(r["upstream_cert_der"]))
        up_rows = upstream.journal.call(lambda: upstream.journal.conn.execute(
            "SELECT device_serial, state, cert_der FROM issuance ORDER BY id").fetchall())  # fmt: skip
        assert sorted(str(d) for d, _, _ in up_rows) == sorted(keys)
        assert {str(s) for _, s, _ in up_rows} == {"confirmed"} and {
            bytes(c) for _, _, c in up_rows
        } == upstream_certs
        assert {tid for tid, _ in upstream.issued()} == {
            f"cmp:ra:{bytes(r['transaction_id']).hex()}" for r in rows
        }

        # `birthline upstream status --json` (journal only): nothing open, a last success, no error
        rc, stdout, stderr = await _cli("upstream", "status", "--json", "--config", str(config))
        assert rc == 0, stderr
        status = json.loads(stdout)
        assert status["open"] == 0 and status["oldest_open_age_s"] is None, status
        assert status["last_success"] is not None and status["last_error"] is None, status
        assert status["depth"] == {"p10cr": {"done": 3}, "cr": {"done": 1}}, status
        assert (status["url"], status["mode"], status["alarm"], status["issuance_stopped"]) == (
            upstream.url, "batched", False, False,
        )  # fmt: skip

        # one forwarder per journal: `upstream sync` refuses while the daemon forwards
        rc, stdout, stderr = await _cli("upstream", "sync", "--once", "--config", str(config))
        assert rc == 2 and "the daemon's own job and is refused while the daemon runs" in stderr, stderr
    assert "forwarding to the upstream CA at " + upstream.url in log.read_text()


async def test_ra_mode_through_the_daemon_a_station_waits_out_pending_and_gets_the_upstream_chain(
    upstream: Upstream,
    softhsm_token: SoftHsmToken,
    hsm_token: Token,
    production_journal_template: Path,
    tmp_path: Path,
) -> None:
    """The product in upstream (RA) mode: the station client's ENROLL is answered PENDING until the daemon's own
    forwarder has the upstream's certificate; the client waits it out and gets that certificate and chain."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
    journal_path = state / "journal.sqlite"
    shutil.copy(production_journal_template, journal_path)
    with Journal(journal_path) as journal:
        audit = AuditLog(journal)
        creds = reg.add_station(journal, hsm_token, "st1", "lan", audit=audit, actor="alice")
        put_on_line(journal, "st1")
        reg.write_bundle(creds, tmp_path / "st1")
        store.set_product_mode(journal, audit, User("alice", Role.ADMINISTRATOR), "sensor", "upstream")
    up_root = ca_mod.load_ca(upstream.journal, "root").certificate
    up_issuing = ca_mod.load_ca(upstream.journal, "issuing").certificate
    assert up_root is not None and up_issuing is not None
    lan = _free_port()
    config = write_config(
        tmp_path / "birthline.toml", softhsm_token, state=state, journal=journal_path,
        extra=f'[stations]\nlan_listen = "127.0.0.1:{lan}"\ntls_dir = "{state / "tls"}"\n',
        upstream={"url": upstream.url, "mode": "batched", "batch_max": 10, "batch_wait_s": 1.0, "poll_s": 0.2,
                  "server_cert": write_pem(tmp_path / "upstream-ra.pem", upstream.ra.certificate),
                  "ca_certs": write_pem(tmp_path / "upstream-root.pem", up_root),
                  "pending_retry_s": 0.3, "backoff_base_s": 0.2, "backoff_cap_s": 2},
    )  # fmt: skip
    log = tmp_path / "daemon.log"
    async with _daemon(config, log, lan):
        bundle = tmp_path / "st1"
        client = await StationClient.connect_tcp(
            "127.0.0.1", lan, station_id="st1", key=read_station_key(bundle / "station.key"),
            ssl_context=client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt"),
            server_hostname="localhost",
        )  # fmt: skip
        try:
            key = generate_device_key()
            chain = await client.enroll("SN-0042", make_csr(key, "SN-0042"))
            assert client.stats.pending >= 1  # told PENDING at least once (the batch waits 1 s upstream-side)
            await client.confirm(client.last_request_id, chain[0])
        finally:
            await client.close()
        cert = x509.load_der_x509_certificate(chain[0])
        assert cert.public_key().public_bytes(*SPKI) == key.public_key().public_bytes(*SPKI)
        cert.verify_directly_issued_by(up_issuing)  # the upstream CA's certificate, not this appliance's
        assert [x509.load_der_x509_certificate(c) for c in chain[1:]] == [up_issuing, up_root]
        conn = sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT state, device_serial FROM ra_request").fetchall()
            local = conn.execute("SELECT COUNT(*) FROM issuance").fetchone()[0]
        finally:
            conn.close()
        assert rows == [("confirmed", "SN-0042")] and local == 0  # nothing was signed locally
