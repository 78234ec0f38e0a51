"""`birthline init` / `station add|list|disable|rotate-key` against a real SoftHSM token and journal."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pytest

from appliance.audit.log import AuditLog
from appliance.cli.main import main
from appliance.issuance.journal import Journal
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import PRODUCTION_PASSWORD


@pytest.fixture
def config_file(softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(production_journal_template, state / "journal.sqlite")
    cfg = softhsm_token.hsm_config()
    path = tmp_path / "birthline.toml"
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n[stations]\nlan_listen = "127.0.0.1:7450"\n'
    )
    return path


def test_station_lifecycle(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = str(config_file)

    def as_(user: str, *lines: str) -> list[str]:
        """Log in as `user`, the password(s) on standard input as a script would give them."""
        monkeypatch.setattr("sys.stdin", io.StringIO("".join(f"{x}\n" for x in lines)))
        return ["--user", user, "--password-stdin"]

    assert main(["init", "--config", c]) == 0
    assert (tmp_path / "state" / "tls" / "server.key").stat().st_mode & 0o777 == 0o600
    assert (
        main(
            [
                "station",
                "add",
                "--config",
                c,
                "--name",
                "lan1",
                "--lan",
                "--out",
                str(tmp_path / "lan1"),
                *as_("alice", PRODUCTION_PASSWORD),
            ]
        )
        == 0
    )
    port = "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1:1.0-port0"
    out = tmp_path / "ser1"
    assert main(["station", "add", "--config", c, "--name", "ser1", "--serial", port, "--out", str(out),
                 *as_("alice", PRODUCTION_PASSWORD)]) == 0  # fmt: skip
    meta = json.loads((out / "station.json").read_text())
    assert meta == {"name": "ser1", "kind": "serial", "key_file": "station.key", "port": port, "baud": 115200}
    key = (out / "station.key").read_text().strip()
    assert len(bytes.fromhex(key)) == 32 and (out / "station.key").stat().st_mode & 0o777 == 0o600
    lan = json.loads((tmp_path / "lan1" / "station.json").read_text())
    assert lan["host"] == "127.0.0.1:7450" and lan["tls_cert_file"] == "tls-client.crt"
    # An operator may not touch the registry; without a login nobody may.
    assert main(["user", "add", "olga", "--role", "operator", "--config", c,
                 *as_("alice", PRODUCTION_PASSWORD, "olga's own password")]) == 0  # fmt: skip
    assert (
        main(["station", "disable", "--config", c, "--name", "ser1", *as_("olga", "olga's own password")])
        == 2
    )
    assert main(["station", "disable", "--config", c, "--name", "ser1"]) == 2
    assert (
        main(["station", "disable", "--config", c, "--name", "ser1", *as_("alice", PRODUCTION_PASSWORD)]) == 0
    )
    assert (
        main(
            [
                "station",
                "rotate-key",
                "--config",
                c,
                "--name",
                "ser1",
                "--out",
                str(tmp_path / "ser1b"),
                *as_("alice", PRODUCTION_PASSWORD),
            ]
        )
        == 0
    )
    assert (tmp_path / "ser1b" / "station.key").read_text().strip() != key
    capsys.readouterr()
    assert main(["station", "list", "--config", c, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["kind"], s["enabled"]) for s in listed] == [
        ("fixture-1", "lan", True),  # from the floor template
        ("lan1", "lan", True),
        ("ser1", "serial", False),
    ]
    assert main(["station", "list", "--config", c]) == 0
    text = capsys.readouterr().out
    assert key not in text and "DISABLED" in text
    # Same port twice, a bad name: refused with a message, exit 2.
    assert (
        main(
            [
                "station",
                "add",
                "--config",
                c,
                "--name",
                "ser2",
                "--serial",
                port,
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert (
        main(["station", "add", "--config", c, "--name", "bad name", "--lan", "--out", str(tmp_path / "y")])
        == 2
    )


def test_station_changes_are_audited_under_the_person(config_file: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    c = str(config_file)
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PRODUCTION_PASSWORD}\n"))
    assert main(["station", "add", "--config", c, "--name", "lan9", "--lan", "--out", str(tmp_path / "b"),
                 "--user", "alice", "--password-stdin"]) == 0  # fmt: skip
    with Journal(tmp_path / "state" / "journal.sqlite") as journal:
        entries = AuditLog(journal).entries()
    added = [e for e in entries if e.event == "station.added"]
    assert len(added) == 1 and added[0].actor == "alice" and json.loads(added[0].data)["station"] == "lan9"
    assert entries[-2].event == "login.success" and entries[-2].actor == "alice"
