"""RA mode over EST: for a product in upstream issuance mode, simpleenroll is answered 202 with Retry-After until
the daemon's forwarder has the upstream CA's certificate; the same CSR sent again then gets it. The daemon is
`birthline run`, the upstream a second Birthline (tests/appliance/cmp/upstream_support.py), the client curl."""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography import x509

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.issuance.journal import Journal
from appliance.production import store
from appliance.production.users import Role, User
from hsm.softhsm import SoftHsmToken
from tests.appliance.cmp.test_forwarder_daemon import _daemon, _free_port
from tests.appliance.cmp.upstream_support import Upstream, upstream_fixture, write_config, write_pem  # noqa: F401
from tests.appliance.est.support import PASSWORD, USER, Answer, openssl_csr

pytestmark = [
    pytest.mark.slow,  # a subprocess daemon
    pytest.mark.skipif(
        shutil.which("openssl") is None or shutil.which("curl") is None, reason="openssl, curl"
    ),
]


async def _curl(url: str, ca: Path, body: Path, work: Path) -> Answer:
    head = work / "head"
    out = work / "out"
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--cacert", str(ca), "-u", f"{USER}:{PASSWORD}", "-H", "Content-Type: application/pkcs10",
        "--data-binary", f"@{body}", "-o", str(out), "-D", str(head), "-w", "%{http_code}", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    status, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, err.decode()
    return Answer(int(status), out.read_bytes(), head.read_text())


async def test_ra_mode_answers_202_then_the_upstream_certificate(
    upstream: Upstream, softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    journal_path = state / "journal.sqlite"
    shutil.copy(production_journal_template, journal_path)
    with Journal(journal_path) as journal:
        store.set_product_mode(
            journal, AuditLog(journal), User("alice", Role.ADMINISTRATOR), "sensor", "upstream"
        )
    secret = tmp_path / "est.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, PASSWORD.encode())
    os.close(fd)
    up_root = ca_mod.load_ca(upstream.journal, "root").certificate
    up_issuing = ca_mod.load_ca(upstream.journal, "issuing").certificate
    port = _free_port()
    config = write_config(
        tmp_path / "birthline.toml", softhsm_token, state=state, journal=journal_path,
        extra=f'[est]\nlisten = "127.0.0.1:{port}"\ndefault_label = "line1"\n[est.labels.line1]\n'
              f'station = "fixture-1"\nusername = "{USER}"\npassword_file = "{secret}"\n',
        upstream={"url": upstream.url, "mode": "batched", "batch_max": 10, "batch_wait_s": 1.0, "poll_s": 0.2,
                  "server_cert": write_pem(tmp_path / "upstream-ra.pem", upstream.ra.certificate),
                  "ca_certs": write_pem(tmp_path / "upstream-root.pem", up_root),
                  "pending_retry_s": 1, "backoff_base_s": 0.2, "backoff_cap_s": 2},
    )  # fmt: skip
    work = tmp_path / "w"
    work.mkdir()
    _, csr = openssl_csr(work, "d", "/serialNumber=SN-0050")
    (work / "d.b64").write_bytes(csr)
    url = f"https://127.0.0.1:{port}/.well-known/est/simpleenroll"
    async with _daemon(config, tmp_path / "daemon.log", port):
        ca = state / "tls" / "management-ca.crt"
        first = await _curl(url, ca, work / "d.b64", work)
        assert first.status == 202 and "Retry-After: 1" in first.headers, first.headers + first.text
        deadline = time.monotonic() + 60
        answer = first
        while answer.status == 202:
            assert time.monotonic() < deadline, "the upstream certificate never came"
            await asyncio.sleep(0.5)
            answer = await _curl(url, ca, work / "d.b64", work)
        assert answer.status == 200, answer.text
        (cert,) = answer.certificates()
        assert isinstance(cert, x509.Certificate)
        cert.verify_directly_issued_by(up_issuing)  # the upstream CA's certificate, not this appliance's
        conn = sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True, timeout=10)
        try:
            rows = conn.execute("SELECT state, device_serial FROM ra_request").fetchall()
            local = conn.execute("SELECT COUNT(*) FROM issuance").fetchone()[0]
        finally:
            conn.close()
        # Answered, so confirmed (EST has no confirmation message); nothing was signed here.
        assert rows == [("confirmed", "SN-0050")] and local == 0
