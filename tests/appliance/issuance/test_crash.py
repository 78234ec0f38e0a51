"""Crash safety: the issuing process is SIGKILLed at each named point, then restarted.

Invariants (reliability.md section 1): no serial is reused; every intent is either issued or burned; a
certificate that was signed but not stored is never released; a retry after the crash gets a certificate, and
the stored one byte for byte when it had been stored.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509

from appliance.audit.log import AuditLog
from appliance.audit.verify import verify as audit_verify
from appliance.issuance.journal import Journal
from appliance.production import reconcile, users
from appliance.production.users import Role
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import PRODUCTION_PASSWORD, TEST_COST, make_csr
from tests.daemon_config import daemon_config

OPERATOR_PASSWORD = "operator password 1"


@pytest.fixture
def config(tmp_path: Path, production_journal_template: Path, softhsm_token: SoftHsmToken) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
    shutil.copy(production_journal_template, state / "journal.sqlite")
    # `birthline issue` acts as a person: an operator, added by the template's administrator.
    with Journal(state / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        admin = users.login(journal, audit, "alice", PRODUCTION_PASSWORD, cost=TEST_COST)
        users.add_user(journal, audit, admin, "olga", Role.OPERATOR, OPERATOR_PASSWORD, cost=TEST_COST)
    cfg = tmp_path / "birthline.toml"
    cfg.write_text(daemon_config(state, softhsm_token))
    return cfg


def _issue(
    config: Path, serial: str, csr: Path, crash: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "BIRTHLINE_CRASH_POINT"}
    if crash:
        env["BIRTHLINE_CRASH_POINT"] = crash
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "issue", "--config", str(config), "--station", "fixture-1",
         "--serial", serial, "--csr", str(csr), "--user", "olga", "--password-stdin"],
        input=OPERATOR_PASSWORD + "\n", capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("point", ["after-intent", "after-sign", "after-store"])
def test_sigkill_at_each_point_keeps_the_invariants(config: Path, tmp_path: Path, point: str) -> None:
    _, der = make_csr()
    csr = tmp_path / "dev.csr"
    csr.write_bytes(der)

    crashed = _issue(config, "SN-CRASH", csr, crash=point)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr
    assert "BEGIN CERTIFICATE" not in crashed.stdout  # nothing was released

    with Journal(config.parent / "state" / "journal.sqlite") as journal:
        before = journal.rows()
    assert len(before) == 1
    expected_state = "issued" if point == "after-store" else "intent"
    assert before[0].state == expected_state

    retry = _issue(config, "SN-CRASH", csr)
    assert retry.returncode == 0, retry.stderr
    cert = x509.load_pem_x509_certificates(retry.stdout.encode())[0]

    with Journal(config.parent / "state" / "journal.sqlite") as journal:
        rows = journal.rows()
        assert journal.integrity_check() == "ok"
        # The work order's quota equals the live rows: a burned intent gave its unit back.
        assert reconcile.quota_problems(journal) == []
        consumed = journal.call(
            lambda: journal.conn.execute("SELECT consumed FROM work_order WHERE id='WO-1'").fetchone()[0]
        )
        assert consumed == 1
        report = audit_verify(journal)
        assert report.ok, report.text()
        entries = AuditLog(journal).entries()
        events = [e.event for e in entries if e.event.startswith("issuance.")]
        # Each run of the command is on record under the operator who ran it, whatever the crash left.
        asked = [(e.actor, e.event) for e in entries if e.event.startswith("issue.")]
    assert asked == [("olga", "issue.requested"), ("olga", "issue.requested"), ("olga", "issue.answered")]
    serials = [r.cert_serial for r in rows]
    assert len(serials) == len(set(serials)), "a serial was reused"
    assert all(r.state in ("issued", "burned") for r in rows)
    live = [r for r in rows if r.state == "issued"]
    assert len(live) == 1 and live[0].cert_serial == format(cert.serial_number, "x")
    if point == "after-store":
        # Stored before the crash: the retry gets exactly that certificate, and nothing was signed again.
        assert rows == [live[0]] and "reused" in retry.stderr
        assert before[0].cert_der == live[0].cert_der
        assert events == ["issuance.intent", "issuance.issued"]
    else:
        # Signed (maybe) but never stored: that intent is burned and its serial never comes back.
        burned = [r for r in rows if r.state == "burned"]
        assert [r.burn_reason for r in burned] == ["crash-recovery"]
        assert burned[0].cert_serial != live[0].cert_serial
        assert burned[0].cert_der is None
        # The audit log tells the same story: intent, burned at restart, then the retry's intent and issue.
        assert events == ["issuance.intent", "issuance.burned", "issuance.intent", "issuance.issued"]
