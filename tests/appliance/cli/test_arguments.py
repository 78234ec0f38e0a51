"""Issue 10 item 10: every argument naming a file that cannot be read or written ends the command with one line
naming the option and why (exit 2), never a traceback; a bug in the code still shows its traceback."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from appliance.cli import commissioning
from appliance.cli.main import main
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import PRODUCTION_PASSWORD


@pytest.fixture
def config(softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(production_journal_template, state / "journal.sqlite")
    cfg = softhsm_token.hsm_config()
    path = tmp_path / "birthline.toml"
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n'
    )
    return path


def _one_line_refusal(
    argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> str:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PRODUCTION_PASSWORD}\n"))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("birthline: "), err
    return err


def test_unreadable_input_files_name_their_option(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = ["--config", str(config)]
    missing = str(tmp_path / "missing.csr")
    login = ["--user", "alice", "--password-stdin"]
    cases = {
        "--csr": ["issue", "--station", "fixture-1", "--serial", "SN-0001", "--csr", missing, *login, *c],
        "--cert": ["ca", "import", "--cert", missing, "--chain", missing, *login, *c],
        "FILE": ["workorder", "import", missing, *login, *c],
        "--serials-file": ["workorder", "add", "WO-7", "--product", "sensor", "--quantity", "1",
                           "--serials-file", missing, *login, *c],
    }  # fmt: skip
    for option, argv in cases.items():
        err = _one_line_refusal(argv, capsys, monkeypatch)
        assert f"{option} {missing}: no such file or directory" in err, err
    (tmp_path / "dir.csr").mkdir()
    err = _one_line_refusal(
        [
            "issue",
            "--station",
            "fixture-1",
            "--serial",
            "SN-0001",
            "--csr",
            str(tmp_path / "dir.csr"),
            *login,
            *c,
        ],
        capsys,
        monkeypatch,
    )
    assert "is a directory" in err
    (tmp_path / "latin1.txt").write_bytes(b"SN-\xe9\n")
    err = _one_line_refusal(
        ["workorder", "add", "WO-7", "--product", "sensor", "--quantity", "1", "--serials-file",
         str(tmp_path / "latin1.txt"), *login, *c],
        capsys,
        monkeypatch,
    )  # fmt: skip
    assert "not UTF-8 text" in err
    # Nothing was minted or stored by any of them.
    assert main(["workorder", "show", "WO-7", *c]) == 2


def test_outputs_that_cannot_be_written_name_their_option(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = ["--config", str(config)]
    err = _one_line_refusal(
        ["ca", "chain", "--out", str(tmp_path / "no-dir" / "chain.pem"), *c], capsys, monkeypatch
    )
    assert f"--out {tmp_path / 'no-dir' / 'chain.pem'}: no such file or directory" in err
    (tmp_path / "target").write_text("keep\n")
    (tmp_path / "link.pem").symlink_to(tmp_path / "target")
    err = _one_line_refusal(["ca", "chain", "--out", str(tmp_path / "link.pem"), *c], capsys, monkeypatch)
    assert "is a symbolic link; refusing to write through it" in err
    assert (tmp_path / "target").read_text() == "keep\n"
    err = _one_line_refusal(["export", "workorder", "WO-1", "--csv", str(tmp_path), *c], capsys, monkeypatch)
    assert f"--csv {tmp_path}: exists and is not a regular file" in err
    assert main(["ca", "chain", "--out", str(tmp_path / "chain.pem"), *c]) == 0
    assert (tmp_path / "chain.pem").read_text().startswith("-----BEGIN CERTIFICATE-----")


def test_station_client_bundle_and_csr_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    base = [
        "station-client",
        "enroll",
        "--host",
        "127.0.0.1:9",
        "--serial",
        "SN-0001",
        "--out",
        str(tmp_path / "o"),
    ]
    err = _one_line_refusal(
        [*base, "--credentials", str(tmp_path / "nothing"), "--keygen"], capsys, monkeypatch
    )
    assert f"--credentials {tmp_path / 'nothing'}: " in err and "No such file" in err
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "station.json").write_text("{not json")
    err = _one_line_refusal([*base, "--credentials", str(bundle), "--keygen"], capsys, monkeypatch)
    assert "not a station credential bundle" in err
    (bundle / "station.key").write_text("00" * 32 + "\n")
    (bundle / "station.key").chmod(0o644)
    err = _one_line_refusal([*base, "--credentials", str(bundle), "--keygen"], capsys, monkeypatch)
    assert f"{bundle / 'station.key'} (mode 644)" in err and f"chmod 600 {bundle / 'station.key'}" in err


def test_a_bug_still_shows_its_traceback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Only errors of the arguments' files become one line: a fault in the code itself is not hidden. (A mock
    injects the fault: no real input makes the code misbehave on purpose.)"""

    def broken(args: object) -> int:
        raise ValueError("a bug")

    monkeypatch.setattr(commissioning, "cmd_config_check", broken)
    with pytest.raises(ValueError, match="a bug"):
        main(["config", "check", "--config", str(tmp_path / "any.toml")])
