"""`birthline init` / `station add|list|disable|rotate-key` against a real SoftHSM token and journal."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from appliance.cli.main import main
from hsm.softhsm import SoftHsmToken


@pytest.fixture
def config_file(softhsm_token: SoftHsmToken, ca_journal_template: Path, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(ca_journal_template, state / "journal.sqlite")
    cfg = softhsm_token.hsm_config()
    path = tmp_path / "birthline.toml"
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n[stations]\nlan_listen = "127.0.0.1:7450"\n'
    )
    return path


def test_station_lifecycle(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    c = str(config_file)
    assert main(["init", "--config", c]) == 0
    assert (tmp_path / "state" / "tls" / "server.key").stat().st_mode & 0o777 == 0o600
    assert (
        main(["station", "add", "--config", c, "--name", "lan1", "--lan", "--out", str(tmp_path / "lan1")])
        == 0
    )
    port = "/dev/serial/by-path/pci-0000:00:14.0-usb-0:1:1.0-port0"
    out = tmp_path / "ser1"
    assert main(["station", "add", "--config", c, "--name", "ser1", "--serial", port, "--out", str(out)]) == 0
    meta = json.loads((out / "station.json").read_text())
    assert meta == {"name": "ser1", "kind": "serial", "key_file": "station.key", "port": port, "baud": 115200}
    key = (out / "station.key").read_text().strip()
    assert len(bytes.fromhex(key)) == 32 and (out / "station.key").stat().st_mode & 0o777 == 0o600
    lan = json.loads((tmp_path / "lan1" / "station.json").read_text())
    assert lan["host"] == "127.0.0.1:7450" and lan["tls_cert_file"] == "tls-client.crt"
    assert main(["station", "disable", "--config", c, "--name", "ser1"]) == 0
    assert (
        main(["station", "rotate-key", "--config", c, "--name", "ser1", "--out", str(tmp_path / "ser1b")])
        == 0
    )
    assert (tmp_path / "ser1b" / "station.key").read_text().strip() != key
    capsys.readouterr()
    assert main(["station", "list", "--config", c, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(s["name"], s["kind"], s["enabled"]) for s in listed] == [
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
