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
from appliance.stations_registry import get_station
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import PRODUCTION_PASSWORD


@pytest.fixture
def config_file(softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)  # the appliance refuses a state directory others can reach
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

    assert main(["init", "--organisation", "Acme Devices", "--config", c]) == 0
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
    # A port that exists but is not a character device (here the journal itself) is refused, in one line.
    journal_file = str(Path(c).parent / "state" / "journal.sqlite")
    assert main(["station", "add", "--config", c, "--name", "ser-file", "--serial", journal_file, "--out",
                 str(tmp_path / "ser-file"), *as_("alice", PRODUCTION_PASSWORD)]) == 2  # fmt: skip
    assert "not a serial device" in capsys.readouterr().err
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


def test_bundle_files_are_never_written_through_a_planted_symlink(
    config_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Issue 10 item 9: someone who could write the output directory plants station.key (and the TLS key)
    as links to a file root cares about; rotating into that directory must leave the target untouched."""
    c = str(config_file)

    def as_alice() -> list[str]:
        monkeypatch.setattr("sys.stdin", io.StringIO(f"{PRODUCTION_PASSWORD}\n"))
        return ["--user", "alice", "--password-stdin"]

    out = tmp_path / "bundle"
    assert (
        main(["station", "add", "--config", c, "--name", "lan7", "--lan", "--out", str(out), *as_alice()])
        == 0
    )
    key = (out / "station.key").read_bytes()
    # Rotating into the same directory replaces the old bundle's files.
    assert (
        main(["station", "rotate-key", "--config", c, "--name", "lan7", "--out", str(out), *as_alice()]) == 0
    )
    assert (out / "station.key").read_bytes() != key
    key = (out / "station.key").read_bytes()
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's file\n")
    # Links where a writer might put its temporary files: never followed (the temporary names are random and
    # created with O_EXCL|O_NOFOLLOW).
    for name in ("station.key.tmp", "tls-client.key.tmp", "station.json.tmp"):
        (out / name).symlink_to(victim)
    assert (
        main(["station", "rotate-key", "--config", c, "--name", "lan7", "--out", str(out), *as_alice()]) == 0
    )
    assert victim.read_bytes() == b"root's file\n"
    key = (out / "station.key").read_bytes()
    assert (out / "station.key").stat().st_mode & 0o777 == 0o600
    assert (out / "tls-client.key").stat().st_mode & 0o777 == 0o600
    # Links in the place of the bundle's own files: refused, and the target untouched.
    for name in ("station.key", "tls-client.key", "station.json", "ca.crt"):
        kept = (out / name).read_bytes()
        (out / name).unlink()
        (out / name).symlink_to(victim)
        capsys.readouterr()
        assert main(["station", "rotate-key", "--config", c, "--name", "lan7", "--out", str(out),
                     *as_alice()]) == 2  # fmt: skip
        assert f"{out / name} is a symbolic link" in capsys.readouterr().err
        assert victim.read_bytes() == b"root's file\n"
        (out / name).unlink()
        (out / name).write_bytes(kept)
    # Refused before the registry changed: the bundle on disk still holds the station's current key.
    with Journal(tmp_path / "state" / "journal.sqlite") as journal:
        assert get_station(journal, "lan7").key.hex().encode() + b"\n" == key

    # An output directory that is a link, or that others may write, is refused BEFORE the registry changes.
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    (tmp_path / "linked").symlink_to(tmp_path / "elsewhere")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    capsys.readouterr()
    for bad, why in ((tmp_path / "linked", "symbolic link"), (shared, "writable by group or others")):
        assert main(["station", "add", "--config", c, "--name", "lan8", "--lan", "--out", str(bad),
                     *as_alice()]) == 2  # fmt: skip
        assert why in capsys.readouterr().err
        assert list(bad.iterdir()) == []
    assert main(["station", "list", "--config", c, "--json"]) == 0
    assert "lan8" not in capsys.readouterr().out
