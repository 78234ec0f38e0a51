"""Issue 17 item 8: a failure an administrator causes ends the command with one line that names the problem and
what to do, without an internal reason-code prefix (`unknown_profile:` on every `ca` error); refusals of the
issuance pipeline keep the code a station would show."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from appliance.cli.main import main
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import PRODUCTION_PASSWORD, make_csr


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


def _refusal(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr("sys.stdin", io.StringIO(f"{PRODUCTION_PASSWORD}\n"))
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("birthline: "), err
    return err


def test_ca_errors_say_what_to_do_without_a_code_prefix(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    c = ["--config", str(config), "--user", "alice", "--password-stdin"]
    line2 = ["ca", "init-issuing", "--name", "line2", "--subject", "/O=Acme/CN=Acme Line 2 CA"]
    err = _refusal([*line2, "--parent", "offline-root", *c], capsys, monkeypatch)
    assert err.startswith("birthline: no CA named 'offline-root' to sign issuing CA 'line2': ")
    assert "birthline ca init-root --name offline-root" in err and "--parent" in err and "ca request" in err
    err = _refusal([*line2, "--parent", "management", *c], capsys, monkeypatch)
    assert "cannot sign an issuing CA: give --parent a root or issuing CA" in err
    pem = tmp_path / "ca.pem"
    pem.write_text("not a certificate")
    err = _refusal(["ca", "import", "--name", "issuing", "--cert", str(pem), "--chain", str(pem), *c],
                   capsys, monkeypatch)  # fmt: skip
    assert err.startswith("birthline: CA 'issuing' is active; only a CA awaiting its certificate"), err


def test_an_issuance_refusal_keeps_its_reason_code(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.audit.log import AuditLog
    from appliance.issuance.journal import Journal
    from appliance.production import users
    from appliance.production.users import Role, User
    from tests.appliance.conftest import TEST_COST

    with Journal(config.parent / "state" / "journal.sqlite") as journal:
        users.add_user(journal, AuditLog(journal), User("alice", Role.ADMINISTRATOR), "sam", Role.SUPERVISOR,
                       PRODUCTION_PASSWORD, cost=TEST_COST)  # fmt: skip
    csr = tmp_path / "dev.csr"
    csr.write_bytes(make_csr("OTHER-1")[1])
    err = _refusal(["issue", "--station", "fixture-1", "--serial", "OTHER-1", "--csr", str(csr), "--config",
                    str(config), "--user", "sam", "--password-stdin"], capsys, monkeypatch)  # fmt: skip
    assert err.startswith("birthline: not_authorised: "), err


def test_a_missing_journal_or_an_unloadable_hsm_module_says_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A report before `init` said only 'no journal at ...'; `init` with a wrong [hsm] module said 'PKCS#11 error
    (OS exception while loading ...)'. Each names the command that helps."""
    pin = tmp_path / "hsm.pin"
    pin.write_text("1234\n")
    pin.chmod(0o600)
    config = tmp_path / "c.toml"
    config.write_text(
        f'[appliance]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[hsm]\nmodule = "{tmp_path / "no-such-module.so"}"\ntoken_label = "x"\npin_file = "{pin}"\n'
    )
    err = _refusal(["report", "workorder", "WO-1", "--config", str(config)], capsys, monkeypatch)
    assert "no journal at" in err and "`birthline init` creates it" in err, err
    err = _refusal(["init", "--organisation", "Acme", "--config", str(config)], capsys, monkeypatch)
    assert "no-such-module.so" in err and "`birthline config check`" in err, err
