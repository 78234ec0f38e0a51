"""`birthline audit ...` against a real SoftHSM token and journal (registered on a parser the way main.py will)."""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from appliance.audit import AuditLog
from appliance.cli import audit as audit_cli
from appliance.errors import BirthlineError
from appliance.issuance.journal import Journal
from hsm.softhsm import SoftHsmToken
from tests.appliance.audit.conftest import fill


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
def config_file(softhsm_token: SoftHsmToken, ca_journal_template: Path, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
    shutil.copy(ca_journal_template, state / "journal.sqlite")
    cfg = softhsm_token.hsm_config()
    path = tmp_path / "birthline.toml"
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n'
    )
    return path


def test_auditor_workflow(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = ["--config", str(config_file)]
    db = tmp_path / "state" / "journal.sqlite"
    with Journal(db) as journal:
        fill(AuditLog(journal), 40)
    assert run(["audit", "checkpoint", *c]) == 0
    signed = json.loads(capsys.readouterr().out)
    assert signed["seq"] == 41 and signed["checkpoint"]["seq"] == 41  # 40 + the key registration
    key_pem = tmp_path / "audit-key.pem"
    assert run(["audit", "public-key", *c, "--out", str(key_pem)]) == 0
    assert key_pem.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    with Journal(db) as journal:
        fill(AuditLog(journal), 9)
    head_file = tmp_path / "head.json"
    assert run(["audit", "head", *c, "--out", str(head_file)]) == 0
    head = json.loads(head_file.read_text())
    assert head["seq"] == 50 and head["checkpoint"]["seq"] == 41
    capsys.readouterr()

    assert run(["audit", "verify", *c, "--head", str(head_file), "--public-key", str(key_pem)]) == 0
    out = capsys.readouterr().out
    assert "INTACT" in out and "entries 50" in out and "(pinned)" in out

    export = tmp_path / "audit.jsonl"
    assert run(["audit", "export", *c, "--out", str(export)]) == 0
    assert json.loads(capsys.readouterr().out)["hash"] == head["hash"]
    assert run(["audit", "verify", *c, "--file", str(export), "--head", str(head_file), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True

    # tamper: edit one entry, truncate the tail
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("DROP TRIGGER audit_no_update")
    conn.execute("DROP TRIGGER audit_no_delete")
    conn.execute("UPDATE audit SET actor='operator:mallory' WHERE seq=10")
    conn.execute("DELETE FROM audit WHERE seq > 45")
    conn.close()
    assert (
        run(
            [
                "audit",
                "verify",
                *c,
                "--head-seq",
                "50",
                "--head-hash",
                head["hash"],
                "--public-key",
                str(key_pem),
            ]
        )
        == 1
    )
    out = capsys.readouterr().out
    assert "NOT INTACT" in out and "2 problem(s)" in out
    assert "seq 10: edited:" in out and "seq 50: truncated:" in out
    assert run(["audit", "verify", *c, "--head", str(head_file), "--json"]) == 1
    problems = json.loads(capsys.readouterr().out)["problems"]
    assert [(p["seq"], p["kind"]) for p in problems] == [(10, "edited"), (50, "truncated")]


def test_verify_without_a_journal_is_an_error(config_file: Path, tmp_path: Path) -> None:
    (tmp_path / "state" / "journal.sqlite").unlink()
    assert run(["audit", "verify", "--config", str(config_file)]) == 2
    assert not (tmp_path / "state" / "journal.sqlite").exists()  # not created by an auditor's command


def test_public_key_before_any_checkpoint(config_file: Path) -> None:
    assert run(["audit", "public-key", "--config", str(config_file)]) == 2


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
