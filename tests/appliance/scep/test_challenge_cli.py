"""`birthline scep challenge add | list | revoke`: a supervisor's act, audited; the password shown once (stdout
alone, or a 0600 file) and kept only as its hash; an operator may not make one."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pytest

from appliance.audit.log import AuditLog
from appliance.cli.main import main
from appliance.issuance.journal import Journal
from appliance.production import users
from appliance.production.users import Role, User
from tests.appliance.cli.test_stations_cli import config_file  # noqa: F401 - the fixture
from tests.appliance.conftest import PRODUCTION_PASSWORD, TEST_COST

OPERATOR_PASSWORD = "operator pass phrase 1"


def test_add_list_revoke(
    config_file: Path,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with config_file.open("a") as f:
        f.write('[scep]\nlisten = "127.0.0.1:0"\n[scep.labels.line1]\nstation = "fixture-1"\n')
    c = str(config_file)
    journal_path = tmp_path / "state" / "journal.sqlite"
    with Journal(journal_path) as journal:
        users.add_user(journal, AuditLog(journal), User("alice", Role.ADMINISTRATOR), "olga", Role.OPERATOR,
                       OPERATOR_PASSWORD, cost=TEST_COST)  # fmt: skip

    def as_(user: str, password: str) -> list[str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(f"{password}\n"))
        return ["--user", user, "--password-stdin"]

    add = ["scep", "challenge", "add", "--config", c, "--label", "line1"]
    assert main([*add, "--device", "SN-0001", *as_("alice", PRODUCTION_PASSWORD)]) == 0
    out = capsys.readouterr()
    secret = out.out.strip()
    assert (
        len(secret) == 32 and int(secret, 16) >= 0 and out.out == secret + "\n"
    )  # stdout: the password alone
    assert "for device SN-0001" in out.err
    assert main([*add, "--work-order", "WO-1", "--valid-for", "12h", "--out", str(tmp_path / "wo.txt"),
                 *as_("alice", PRODUCTION_PASSWORD)]) == 0  # fmt: skip
    assert capsys.readouterr().out == ""
    assert (tmp_path / "wo.txt").stat().st_mode & 0o777 == 0o600
    # The password is shown once: an --out that already holds one (or cannot be written) stops the command before a
    # challenge is made (the list below has only the two above), and the file keeps its password.
    kept = (tmp_path / "wo.txt").read_bytes()
    for out in (tmp_path / "wo.txt", tmp_path / "no-such-dir" / "x.txt"):
        assert (
            main([*add, "--work-order", "WO-1", "--out", str(out), *as_("alice", PRODUCTION_PASSWORD)]) != 0
        )
        assert str(out) in capsys.readouterr().err
    assert (tmp_path / "wo.txt").read_bytes() == kept
    # An operator makes no challenges; an unknown label is refused before anyone logs in.
    assert main([*add, "--device", "SN-0002", *as_("olga", OPERATOR_PASSWORD)]) != 0
    assert main(["scep", "challenge", "add", "--config", c, "--label", "nope", "--device", "SN-0002",
                 *as_("alice", PRODUCTION_PASSWORD)]) != 0  # fmt: skip
    capsys.readouterr()

    assert main(["scep", "challenge", "list", "--config", c, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(r["kind"], r["device_serial"], r["work_order"], r["state"]) for r in listed] == [
        ("device", "SN-0001", None, "active"), ("work-order", None, "WO-1", "active")]  # fmt: skip
    assert main(["scep", "challenge", "revoke", "--config", c, str(listed[0]["id"]),
                 *as_("alice", PRODUCTION_PASSWORD)]) == 0  # fmt: skip
    assert main(["scep", "challenge", "list", "--config", c]) == 0
    text = capsys.readouterr().out
    assert "revoked" in text and secret not in text

    with Journal(journal_path) as journal:
        stored = journal.call(lambda: [bytes(r[0]) for r in journal.conn.execute(
            "SELECT secret_sha256 FROM scep_challenge ORDER BY id")])  # fmt: skip
        events = [(e.actor, e.event) for e in AuditLog(journal).entries() if e.event.startswith("scep.")]
    assert stored[0] == hashlib.sha256(secret.encode()).digest()
    assert events == [("alice", "scep.challenge-added"), ("alice", "scep.challenge-added"),
                      ("alice", "scep.challenge-revoked")]  # fmt: skip
    assert secret not in (tmp_path / "state").joinpath("journal.sqlite").read_bytes().decode(errors="replace")
