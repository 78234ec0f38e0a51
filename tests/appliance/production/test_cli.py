"""The production CLI end to end: bootstrap, roles, setup, work orders, rework refused to an operator, report."""

from __future__ import annotations

import datetime as dt
import io
import json
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.cli.main import main
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import make_csr


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


def test_production_cli(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    c = ["--config", str(config_file)]

    def run(*argv: str, stdin: str = "") -> int:
        monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
        return main([*argv, *c])

    admin = ["--user", "alice", "--password-stdin"]
    sup_early = ["--user", "sam", "--password-stdin"]
    assert run("user", "add", "alice", "--bootstrap", "--password-stdin", stdin="admin pass 1\n") == 0
    assert run("user", "add", "bob", "--bootstrap", "--password-stdin", stdin="other pass 1\n") == 2
    assert (
        run("user", "add", "sam", "--role", "supervisor", *admin, stdin="admin pass 1\nsuper pass 1\n") == 0
    )
    assert run("user", "add", "olga", "--role", "operator", *admin, stdin="admin pass 1\noper pass 1\n") == 0
    assert run("user", "add", "x", "--role", "operator", *admin, stdin="wrong\nwhatever 1\n") == 2
    assert run("tenant", "add", "acme", *admin, stdin="admin pass 1\n") == 0
    assert (
        run(
            "product",
            "add",
            "sensor",
            "--tenant",
            "acme",
            "--profile",
            "idevid",
            *admin,
            stdin="admin pass 1\n",
        )
        == 0
    )
    # RA mode is an administrator's switch, audited; a supervisor may not flip it.
    assert run("product", "mode", "sensor", "upstream", *sup_early, stdin="super pass 1\n") == 2
    assert run("product", "mode", "sensor", "upstream", *admin, stdin="admin pass 1\n") == 0
    capsys.readouterr()
    assert run("product", "list", "--json") == 0
    assert [p["issuance_mode"] for p in json.loads(capsys.readouterr().out)] == ["upstream"]
    assert run("product", "mode", "sensor", "local", *admin, stdin="admin pass 1\n") == 0
    assert run("line", "add", "L1", *admin, stdin="admin pass 1\n") == 0
    port = "/dev/serial/by-path/test-port0"
    assert (
        run(
            "station",
            "add",
            "--name",
            "st1",
            "--serial",
            port,
            "--out",
            str(tmp_path / "st1"),
            *admin,
            stdin="admin pass 1\n",
        )
        == 0
    )
    sup = ["--user", "sam", "--password-stdin"]
    assert (
        run(
            "line", "assign-station", "L1", "st1", "--user", "olga", "--password-stdin", stdin="oper pass 1\n"
        )
        == 2
    )
    assert run("line", "assign-station", "L1", "st1", *sup, stdin="super pass 1\n") == 0
    assert run("workorder", "add", "WO-1", "--product", "sensor", "--quantity", "5", "--line", "L1",
               "--range", "SN-[0001-0100]", "--activate", *sup, stdin="super pass 1\n") == 0  # fmt: skip
    mes = tmp_path / "mes.json"
    mes.write_text(
        json.dumps([{"id": "WO-2", "product": "sensor", "quantity": 1, "lines": ["L1"], "serials": ["Z1"]}])
    )
    assert run("workorder", "import", str(mes), *sup, stdin="super pass 1\n") == 0
    assert (
        run(
            "device",
            "scrap",
            "SN-0001",
            "--reason",
            "x",
            "--user",
            "olga",
            "--password-stdin",
            stdin="oper pass 1\n",
        )
        == 2
    )
    capsys.readouterr()
    assert run("workorder", "list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(w["id"], w["state"]) for w in listed] == [("WO-1", "active"), ("WO-2", "draft")]
    assert run("line", "list", "--json") == 0
    assert json.loads(capsys.readouterr().out) == [{"name": "L1", "description": "", "stations": ["st1"]}]
    assert run("report", "workorder", "WO-1", "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["planned"], rep["issued"], rep["remaining"]) == (5, 0, 5)
    assert (
        run("export", "workorder", "WO-1", "--csv", str(tmp_path / "a.csv"), "--pem", str(tmp_path / "a.pem"))
        == 0
    )
    assert (tmp_path / "a.csv").read_text().startswith("certificate_serial,device_serial,sha256_fingerprint")
    assert "exported 0 certificate(s)" in capsys.readouterr().out
    assert run("user", "list", "--json") == 0
    assert [u["name"] for u in json.loads(capsys.readouterr().out)] == ["alice", "olga", "sam"]

    # RA mode from the CLI: without an upstream the request is refused; with one it is recorded and pending (exit
    # 3), and asking again is the same request, not a second unit.
    (tmp_path / "dev.csr").write_bytes(make_csr("SN-0050")[1])
    issue = ["issue", "--station", "st1", "--serial", "SN-0050", "--csr", str(tmp_path / "dev.csr"), *sup]
    assert run("product", "mode", "sensor", "upstream", *admin, stdin="admin pass 1\n") == 0
    capsys.readouterr()
    assert run(*issue, stdin="super pass 1\n") == 2
    assert "no upstream CA configured" in capsys.readouterr().err
    (tmp_path / "up.pem").write_bytes(_any_cert_pem())
    with config_file.open("a") as f:
        f.write(f'[upstream]\nurl = "http://127.0.0.1:9/cmp"\nserver_cert = "{tmp_path / "up.pem"}"\n')
    assert run(*issue, stdin="super pass 1\n") == 3
    first = capsys.readouterr().err
    assert first.startswith("pending: ") and "RA request 1" in first
    assert run(*issue, stdin="super pass 1\n") == 3
    assert "RA request 1" in capsys.readouterr().err
    assert run("report", "workorder", "WO-1", "--json") == 0
    rep = json.loads(capsys.readouterr().out)
    assert (rep["upstream_pending"], rep["quota_used"], rep["consistent"]) == (1, 1, True)


def _any_cert_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "Upstream")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return cert.public_bytes(serialization.Encoding.PEM)
