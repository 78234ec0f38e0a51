"""Issue 17 item 6: a line without an upstream CA is a supported mode. Issuances queue no upstream record (the
outbox grew with every certificate, for a forwarder that would never run), and `upstream status` shows neither
the queue's limits nor an ALARM, however old the records kept from an earlier upstream are."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from appliance.audit.log import AuditLog
from appliance.cli.main import main
from appliance.config import load_config
from appliance.issuance.policy import IssueRequest
from appliance.production.users import Role, User
from appliance.runtime import open_core
from appliance.va.revocation import Reason, revoke
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import make_csr


def _config(tmp_path: Path, softhsm_token: SoftHsmToken, template: Path, upstream: str = "") -> Path:
    state = tmp_path / "state"
    if not state.exists():
        state.mkdir(mode=0o700)
        shutil.copy(template, state / "journal.sqlite")
    cfg = softhsm_token.hsm_config()
    path = tmp_path / ("upstream.toml" if upstream else "standalone.toml")
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n[issuance]\nprepare_workers = 0\n'
        + (f'[upstream]\nurl = "{upstream}"\nprotection = "signature"\nserver_cert = "{state / "x.pem"}"\n'
           if upstream else "")
    )  # fmt: skip
    return path


async def test_a_standalone_line_queues_no_issuance_upstream(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    config = load_config(_config(tmp_path, softhsm_token, production_journal_template))
    assert not config.upstream.enabled
    with open_core(config) as core:
        async with core.issue_service() as service:
            for i in range(3):
                await service.issue(
                    IssueRequest(f"SN-00{i:02d}", make_csr(f"SN-00{i:02d}")[1], station="fixture-1")
                )
        revoke(core.journal, AuditLog(core.journal), User("sam", Role.SUPERVISOR), device_serial="SN-0000",
               reason=Reason.KEY_COMPROMISE)  # fmt: skip
        rows = core.journal.call(lambda: core.journal.conn.execute(
            "SELECT kind, COUNT(*) FROM outbox GROUP BY kind").fetchall())  # fmt: skip
        issued = core.journal.counts()
    assert issued == {"issued": 3}
    # No record per certificate; a revocation still leaves its one small record (the trigger of the schema).
    assert dict(rows) == {"rr": 1}


def test_upstream_status_on_a_standalone_line_has_no_limits_and_no_alarm(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    standalone = _config(tmp_path, softhsm_token, production_journal_template)
    with open_core(load_config(standalone)) as core:
        # Records kept from an upstream configured earlier, queued for two days.
        old = time.time() - 2 * 86400
        core.journal.call(core.journal.transaction, lambda conn: conn.execute(
            "INSERT INTO outbox (kind, cert_serial, transaction_id, next_attempt_at, created_at)"
            " VALUES ('rr', 'abc', randomblob(16), ?, ?)", (old, old)), "an old record")  # fmt: skip
    capsys.readouterr()
    assert main(["upstream", "status", "--config", str(standalone)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("upstream:      none: a standalone line ([upstream] url is not set)")
    assert "(kept for an upstream CA configured later)" in out
    # Review finding 11: the age in units a person reads (it was "oldest 172800 s").
    assert "open records:  1; oldest 2 d 0 h (kept" in out
    assert "ALARM" not in out and "limits:" not in out and "issuance stops" not in out
    assert main(["upstream", "status", "--json", "--config", str(standalone)]) == 0
    assert '"alarm": false' in capsys.readouterr().out
    # A timer left running on a standalone line: nothing to send is no error (it was exit 2, "url: is not set").
    assert main(["upstream", "sync", "--once", "--config", str(standalone)]) == 0
    assert capsys.readouterr().out == "standalone line ([upstream] url is not set): nothing to send\n"

    # The same queue with an upstream configured is over its age limit: that one is an alarm.
    upstream = _config(
        tmp_path, softhsm_token, production_journal_template, upstream="https://ca.example/cmp"
    )
    (tmp_path / "state" / "x.pem").write_text("")
    assert main(["upstream", "status", "--config", str(upstream)]) == 0
    out = capsys.readouterr().out
    assert "ALARM: the queue is over its limit" in out and "limits:" in out
