"""`birthline revoke | revocation list | crl generate|show | ocsp status` through argparse, on a real config."""

from __future__ import annotations

import argparse
import io
import json
import shutil
from pathlib import Path

import pytest
from cryptography import x509

from appliance.cli import revocation as cli
from appliance.errors import BirthlineError
from appliance.issuance.journal import Journal
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import PRODUCTION_PASSWORD


@pytest.fixture
def config_file(softhsm_token: SoftHsmToken, va_template: Path, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
    shutil.copy(va_template, state / "journal.sqlite")
    cfg = softhsm_token.hsm_config()
    path = tmp_path / "birthline.toml"
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n'
    )
    return path


def run(config: Path, monkeypatch: pytest.MonkeyPatch, *argv: str, stdin: str = "") -> int:
    """As appliance.cli.main does it once the lead registers the commands."""
    parser = argparse.ArgumentParser(prog="birthline")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", default=str(config))
        return sp

    cli.register(sub, with_config)
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except BirthlineError as exc:
        print(f"birthline: {exc}")
        return 2


def test_revoke_crl_and_status_commands(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    journal_path = config_file.parent / "state" / "journal.sqlite"
    with Journal(journal_path) as j:
        serial = j.rows("device_serial='SN-0001'")[0].cert_serial
    sup = ("--user", "sam", "--password-stdin")
    pw = PRODUCTION_PASSWORD + "\n"
    assert run(config_file, monkeypatch, "revoke", "--device", "SN-0001", "--reason", "keyCompromise",
               "--user", "olga", "--password-stdin", stdin=pw) == 2  # fmt: skip
    assert "may not revoke" in capsys.readouterr().out
    assert run(config_file, monkeypatch, "revoke", "--device", "SN-0001", "--reason", "keyCompromise", *sup,
               stdin="wrong password\n") == 2  # fmt: skip
    capsys.readouterr()
    assert run(config_file, monkeypatch, "revoke", "--device", "SN-0001", "--reason", "keyCompromise", *sup,
               "--json", stdin=pw) == 0  # fmt: skip
    out = json.loads(capsys.readouterr().out)
    assert [r["cert_serial"] for r in out["revoked"]] == [serial] and out["crls"] == [
        {"ca": "issuing", "crl_number": 1}
    ]
    assert run(config_file, monkeypatch, "revoke", "--cert-serial", serial.upper(), "--reason", "keyCompromise",
               *sup, stdin=pw) == 0  # fmt: skip
    assert "already revoked" in capsys.readouterr().out

    assert run(config_file, monkeypatch, "revocation", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out)[0]["actor"] == "sam"
    assert run(config_file, monkeypatch, "crl", "show") == 0
    shown = capsys.readouterr().out
    assert "CRL number 1" in shown and serial in shown and "keyCompromise" in shown
    out_file = tmp_path / "issuing.crl"
    assert run(config_file, monkeypatch, "crl", "generate", "--out", str(out_file)) == 0
    crl = x509.load_der_x509_crl(out_file.read_bytes())
    assert crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number == 2
    capsys.readouterr()
    assert run(config_file, monkeypatch, "ocsp", "status", "--cert-serial", serial, "--json") == 0
    status = json.loads(capsys.readouterr().out)
    assert status["status"] == "revoked" and status["reason"] == "keyCompromise"
    assert run(config_file, monkeypatch, "ocsp", "status", "--cert-serial", "abcdef") == 0
    assert "status=unknown" in capsys.readouterr().out
