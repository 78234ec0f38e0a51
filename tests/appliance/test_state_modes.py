"""Issue 10 item 6: the journal (station keys in clear, password hashes) and its -wal and -shm files are private
from their first byte, and the daemon refuses state that group or others can reach, saying how to fix it."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest

from appliance.cli.main import main
from appliance.issuance.journal import Journal
from hsm.softhsm import SoftHsmToken


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.stat(p).st_mode)


@pytest.mark.parametrize("umask", [0o000, 0o022])
def test_journal_wal_and_shm_are_created_0600_whatever_the_umask(tmp_path: Path, umask: int) -> None:
    where = tmp_path / "new-state"
    old = os.umask(umask)
    try:
        with Journal(where / "journal.sqlite") as journal:
            journal.call(
                journal.transaction,
                lambda c: c.execute("INSERT INTO meta (key, value) VALUES ('probe', 'x')"),
                "probe",
            )
            # While the connection is open SQLite keeps the WAL and the shared-memory index beside the file.
            modes = {p.name: _mode(p) for p in where.iterdir()}
    finally:
        os.umask(old)
    assert modes == {"journal.sqlite": 0o600, "journal.sqlite-wal": 0o600, "journal.sqlite-shm": 0o600}
    assert _mode(where) == 0o700


@pytest.fixture
def config(tmp_path: Path, softhsm_token: SoftHsmToken, ca_journal_template: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(ca_journal_template, state / "journal.sqlite")
    cfg = softhsm_token.hsm_config()
    path = tmp_path / "birthline.toml"
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n'
        '[stations]\nlan_listen = "127.0.0.1:0"\ntls_dir = "state/tls"\n[va]\nlisten = ""\n'
    )
    return path


def test_run_refuses_a_state_directory_others_can_reach(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = config.parent / "state"
    state.chmod(0o755)
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"state directory {state} is mode 755" in err and f"run: chmod 700 {state}" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("mode", [0o750, 0o730, 0o701])
def test_group_traverse_alone_is_allowed_and_anything_more_refused(
    config: Path, mode: int, capsys: pytest.CaptureFixture[str]
) -> None:
    """0710 lets the console group reach the control socket by name; listing or writing the directory, or
    anything for others, is refused."""
    state = config.parent / "state"
    state.chmod(mode)
    assert main(["crl", "generate", "--config", str(config)]) == 2
    assert f"state directory {state} is mode {mode:o}" in capsys.readouterr().err
    state.chmod(0o710)
    assert main(["crl", "generate", "--config", str(config)]) == 0


def test_run_refuses_a_journal_others_can_read(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    journal = config.parent / "state" / "journal.sqlite"
    journal.chmod(0o644)
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{journal} (mode 644)" in err and f"run: chmod 600 {journal}" in err
    # and a command that writes refuses the same state
    assert main(["crl", "generate", "--config", str(config)]) == 2
    assert "chmod 600" in capsys.readouterr().err


def test_run_refuses_a_tls_server_key_others_can_read(
    config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["init", "--organisation", "Acme Devices", "--config", str(config)]) == 0
    key = config.parent / "state" / "tls" / "server.key"
    assert _mode(key) == 0o600
    key.chmod(0o644)
    capsys.readouterr()
    assert main(["run", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert f"{key} (mode 644)" in err and f"chmod 600 {key}" in err
