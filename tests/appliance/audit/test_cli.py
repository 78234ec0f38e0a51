"""`birthline audit ...` against a real SoftHSM token and journal (registered on a parser the way main.py will)."""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.cli import audit as audit_cli
from appliance.errors import BirthlineError
from appliance.issuance.journal import Journal
from appliance.production import users
from appliance.production.users import Role, User
from hsm.softhsm import SoftHsmToken
from tests.appliance.audit.conftest import fill
from tests.appliance.conftest import PRODUCTION_PASSWORD, TEST_COST


def run(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="birthline")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", required=True)
        return sp

    audit_cli.register(sub, with_config)
    args = p.parse_args(argv)
    try:
        return int(args.func(args))
    except BirthlineError as exc:  # what main() does
        print(f"birthline: {exc}")
        return 2


@pytest.fixture
def config_file(softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path) -> Path:
    """The production floor: alice (administrator), plus ada (auditor) and olga (operator)."""
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
    shutil.copy(production_journal_template, state / "journal.sqlite")
    with Journal(state / "journal.sqlite") as journal:
        audit, alice = AuditLog(journal), User("alice", Role.ADMINISTRATOR)
        users.add_user(journal, audit, alice, "ada", Role.AUDITOR, PRODUCTION_PASSWORD, cost=TEST_COST)
        users.add_user(journal, audit, alice, "olga", Role.OPERATOR, PRODUCTION_PASSWORD, cost=TEST_COST)
    cfg = softhsm_token.hsm_config()
    path = tmp_path / "birthline.toml"
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n'
    )
    return path


def as_(monkeypatch: pytest.MonkeyPatch, user: str, password: str = PRODUCTION_PASSWORD) -> list[str]:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{password}\n"))
    return ["--user", user, "--password-stdin"]


def test_auditor_workflow(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = ["--config", str(config_file)]
    db = tmp_path / "state" / "journal.sqlite"
    with Journal(db) as journal:
        base = AuditLog(journal).head()[0]
        fill(AuditLog(journal), 40)
    assert run(["audit", "checkpoint", *c, *as_(monkeypatch, "ada")]) == 0
    signed = json.loads(capsys.readouterr().out)
    # 40 entries, ada's login, the key registration, the claim
    claim = base + 43
    assert signed["seq"] == claim and signed["checkpoint"]["seq"] == claim
    with Journal(db) as journal:
        login, registered, claimed = AuditLog(journal).entries(start=base + 41)
    assert (login.actor, login.event, registered.event) == ("ada", "login.success", "audit.key-registered")
    assert (claimed.actor, claimed.event, json.loads(claimed.data)["reason"]) == (
        "ada",
        "audit.checkpoint",
        "on-demand",
    )
    key_pem = tmp_path / "audit-key.pem"
    capsys.readouterr()
    assert run(["audit", "public-key", *c, "--out", str(key_pem)]) == 0
    assert key_pem.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    written = capsys.readouterr()  # review finding 12: the file alone, not the key on stdout as well
    assert written.out == "" and f"public key written to {key_pem}" in written.err
    capsys.readouterr()
    assert run(["audit", "verify", *c, "--public-key", str(key_pem)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(": INTACT") and f"entries {claim}" in out and "(pinned)" in out

    # a live appliance writes on: the entries after the last checkpoint are an unsigned tail (exit 3)
    with Journal(db) as journal:
        fill(AuditLog(journal), 9)
    head_file = tmp_path / "head.json"
    assert run(["audit", "head", *c, "--out", str(head_file)]) == 0
    head = json.loads(head_file.read_text())
    assert head["seq"] == claim + 9 and head["checkpoint"]["seq"] == claim
    capsys.readouterr()
    assert run(["audit", "verify", *c, "--head", str(head_file), "--public-key", str(key_pem)]) == 3
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(": UNSIGNED TAIL") and "INTACT" not in out
    assert f"entries {claim + 1}..{claim + 9} are covered by NO signature" in out

    export = tmp_path / "audit.jsonl"
    assert run(["audit", "export", *c, "--out", str(export)]) == 0
    assert json.loads(capsys.readouterr().out)["hash"] == head["hash"]
    assert run(["audit", "verify", *c, "--file", str(export), "--head", str(head_file), "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert (report["status"], report["intact"], report["ok"]) == ("unsigned-tail", False, True)
    assert report["signed_through"] == claim and report["unsigned"]["first"] == claim + 1
    assert report["policy"] == {"stated_at": claim, "max_unsigned_entries": 2000, "max_unsigned_s": 600.0}

    # an administrator signs the head on demand: intact again
    assert run(["audit", "checkpoint", *c, *as_(monkeypatch, "alice")]) == 0
    capsys.readouterr()
    assert run(["audit", "verify", *c, "--head", str(head_file), "--public-key", str(key_pem)]) == 0
    assert capsys.readouterr().out.splitlines()[0].endswith(": INTACT")

    # tamper: edit one entry, truncate the tail
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("UPDATE audit SET actor='operator:mallory' WHERE seq=10")
    conn.execute("DELETE FROM audit WHERE seq > ?", (claim + 5,))
    conn.close()
    kept = ["--head-seq", str(claim + 9), "--head-hash", head["hash"], "--public-key", str(key_pem)]
    assert run(["audit", "verify", *c, *kept]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(": NOT INTACT") and "3 problem(s)" in out
    assert "seq 10: edited:" in out and f"seq {claim + 9}: truncated:" in out
    assert (
        run(["audit", "verify", *c, "--head-seq", str(claim + 9), "--head-hash", head["hash"], "--json"]) == 1
    )
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["seq"], p["kind"]) for p in problems] == [
        (10, "edited"),
        (claim + 11, "truncated"),
        (claim + 9, "truncated"),
    ]


def test_verify_since_checkpoint(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The periodic check from the last good checkpoint of an earlier full verification (its --json)."""
    c = ["--config", str(config_file)]
    db = tmp_path / "state" / "journal.sqlite"
    with Journal(db) as journal:
        fill(AuditLog(journal), 30)
    assert run(["audit", "checkpoint", *c, *as_(monkeypatch, "ada")]) == 0
    capsys.readouterr()
    assert run(["audit", "verify", *c, "--json"]) == 0
    full = json.loads(capsys.readouterr().out)
    since = full["last_good_checkpoint"]
    assert full["since_checkpoint"] is None and since == full["head"]["seq"]
    with Journal(db) as journal:
        fill(AuditLog(journal), 5)
    assert run(["audit", "checkpoint", *c, *as_(monkeypatch, "ada")]) == 0
    capsys.readouterr()
    assert run(["audit", "verify", *c, "--since-checkpoint", str(since), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # the checkpoint's entry, 5 entries, ada's login and the new claim
    assert (report["since_checkpoint"], report["entries"], report["status"]) == (since, 8, "intact")
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("UPDATE audit SET actor='operator:mallory' WHERE seq IN (?, ?)", (since - 3, since + 2))
    conn.close()
    assert run(["audit", "verify", *c, "--since-checkpoint", str(since)]) == 1
    out = capsys.readouterr().out
    assert out.splitlines()[0].endswith(f": NOT INTACT (checked from seq {since} on)")
    assert f"seq {since + 2}: edited:" in out and f"seq {since - 3}:" not in out  # before it: not checked
    assert run(["audit", "verify", *c]) == 1 and f"seq {since - 3}: edited:" in capsys.readouterr().out
    assert run(["audit", "verify", *c, "--since-checkpoint", "0"]) == 2
    assert run(["audit", "verify", *c, "--since-checkpoint", str(since), "--head-seq", "1",
                "--head-hash", "00" * 32]) == 2  # fmt: skip


def test_verify_without_a_journal_is_an_error(config_file: Path, tmp_path: Path) -> None:
    (tmp_path / "state" / "journal.sqlite").unlink()
    assert run(["audit", "verify", "--config", str(config_file)]) == 2
    assert not (tmp_path / "state" / "journal.sqlite").exists()  # not created by an auditor's command


def test_public_key_before_any_checkpoint(config_file: Path) -> None:
    assert run(["audit", "public-key", "--config", str(config_file)]) == 2


def test_checkpoint_needs_an_auditor_or_administrator(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["--config", str(config_file)]
    db = tmp_path / "state" / "journal.sqlite"
    assert run(["audit", "checkpoint", *c]) == 2  # nobody
    assert "give --user" in capsys.readouterr().out
    assert run(["audit", "checkpoint", *c, *as_(monkeypatch, "olga")]) == 2  # an operator
    assert "may not audit.checkpoint" in capsys.readouterr().out
    assert run(["audit", "checkpoint", *c, *as_(monkeypatch, "ada", "wrong password")]) == 2
    with Journal(db) as journal:
        assert AuditLog(journal).last_checkpoint() is None
        events = [(e.actor, e.event) for e in AuditLog(journal).entries()][-2:]
    assert events == [("olga", "login.success"), ("ada", "login.failure")]  # both attempts are on the record
    assert run(["audit", "checkpoint", *c, *as_(monkeypatch, "ada")]) == 0
    assert run(["audit", "verify", *c]) == 0


@pytest.mark.parametrize(
    "extra",
    [
        ["--head-seq", "3", "--head-hash", "abcd"],
        ["--head-seq", "3"],
        ["--public-key-sha256", "zz"],
        ["--file", "/nonexistent/audit.jsonl"],
        ["--head", "/nonexistent/head.json"],
    ],
)
def test_bad_auditor_input_exits_2_not_1(config_file: Path, extra: list[str]) -> None:
    assert run(["audit", "verify", "--config", str(config_file), *extra]) == 2


def test_every_command_that_writes_signs_the_log_as_it_exits(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The whole CLI (appliance.cli.main): after `init` any command that wrote to the journal leaves it INTACT,
    with the checkpoint policy of the configuration; a command that only reads writes nothing."""
    from appliance.cli.main import main

    config_file.write_text(
        config_file.read_text() + "[audit]\ncheckpoint_every_entries = 40\ncheckpoint_every_s = 30\n"
    )
    c = ["--config", str(config_file)]
    db = tmp_path / "state" / "journal.sqlite"
    assert main(["init", "--organisation", "Acme Devices", *c]) == 0
    login = as_(monkeypatch, "alice", f"{PRODUCTION_PASSWORD}\nsam's own password")  # then sam's new password
    assert main(["user", "add", "sam", "--role", "supervisor", *c, *login]) == 0
    with Journal(db) as journal:
        log = AuditLog(journal)
        last = log.entries(start=log.head()[0])[0]
        claim = json.loads(last.data)
        before = log.head()
    assert (last.event, last.actor, claim["reason"]) == ("audit.checkpoint", "appliance", "exit")
    assert claim["policy"] == {
        "every_entries": 40,
        "every_s": 30.0,
        "max_unsigned_entries": 80,
        "max_unsigned_s": 60.0,
    }
    capsys.readouterr()
    assert run(["audit", "verify", *c]) == 0
    # a refused command still signs what it wrote (the login failure)
    assert main(["user", "add", "eve", "--role", "administrator", *c, *as_(monkeypatch, "olga")]) == 2
    assert run(["audit", "verify", *c]) == 0
    with Journal(db) as journal:
        after_refusal = AuditLog(journal).head()
    assert after_refusal[0] == before[0] + 2  # olga's login, then the claim
    assert main(["user", "list", *c]) == 0  # reads only
    with Journal(db) as journal:
        assert AuditLog(journal).head() == after_refusal


def test_a_failed_exit_checkpoint_is_logged_and_never_replaces_the_commands_outcome(
    config_file: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The journal records an audit key the HSM does not hold: signing on exit fails, the command's result stands."""
    from cryptography.hazmat.primitives.asymmetric import ec

    from appliance.audit.encoding import spki_der
    from appliance.config import load_config
    from appliance.runtime import open_core

    other = spki_der(ec.generate_private_key(ec.SECP256R1()).public_key())
    with Journal(tmp_path / "state" / "journal.sqlite") as journal:
        journal.call(journal.transaction, lambda conn: conn.execute(
            "INSERT INTO audit_key (label, public_key, created_at) VALUES ('audit', ?, 1.0)", (other,)), "test")  # fmt: skip
    with (
        pytest.raises(KeyError, match="the command's own failure"),
        open_core(load_config(config_file)) as core,
    ):
        core.audit.record("alice", "test.event", {})
        raise KeyError("the command's own failure")
    assert "stay unsigned until the next checkpoint" in caplog.text and "not the audit key" in caplog.text
    with open_core(load_config(config_file)) as core:
        core.audit.record("alice", "test.event", {})  # and a command that succeeded still succeeds


def test_export_refuses_a_link_as_every_other_out_does(config_file: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.txt"
    target.write_text("keep me\n")
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)
    assert run(["audit", "export", "--out", str(link), "--config", str(config_file)]) == 2
    assert link.is_symlink() and target.read_text() == "keep me\n"


@pytest.mark.parametrize(
    "line", ["[" * 100_000 + "]" * 100_000, '{"type": "entry", "seq": ' + "9" * 5000 + "}"]
)
def test_a_hostile_line_in_an_export_is_malformed_not_a_traceback(
    config_file: Path, tmp_path: Path, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    export = tmp_path / "audit.jsonl"
    assert run(["audit", "export", "--out", str(export), "--config", str(config_file)]) == 0
    with export.open("a") as f:
        f.write(line + "\n")
    capsys.readouterr()
    assert run(["audit", "verify", "--file", str(export), "--json", "--config", str(config_file)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert any(p["kind"] == "malformed" and "not valid JSON" in p["message"] for p in report["problems"])
