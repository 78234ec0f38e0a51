from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pkcs11
import pytest

from hsm.config import HsmConfig
from hsm.errors import (
    DeviceError,
    HsmError,
    KeyNotFoundError,
    LoginError,
    PinSourceError,
    SessionLostError,
    TokenNotFoundError,
    map_pkcs11_error,
)
from hsm.pin import read_pin
from hsm.softhsm import SoftHsmToken, create_softhsm_token
from hsm.token import Token

REPO = Path(__file__).resolve().parents[2]
SECRET = "s3cret-pin-value"


def _pin_file(tmp_path: Path, content: str, mode: int = 0o600) -> HsmConfig:
    path = tmp_path / "pin"
    path.write_text(content)
    path.chmod(mode)
    return HsmConfig(module="m", token_label="t", pin_file=str(path))


def test_pin_file_read_and_one_newline_stripped(tmp_path: Path) -> None:
    assert read_pin(_pin_file(tmp_path, SECRET + "\n")) == SECRET
    assert read_pin(_pin_file(tmp_path, SECRET)) == SECRET


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (SECRET + "\n\n", "has more than one line"),
        (SECRET + "\nmore\n", "has more than one line"),
        (SECRET + "\r\n", "has a carriage return"),
        (SECRET + " \n", "has blanks"),
        (" " + SECRET, "has blanks"),
        ("", "is empty"),
    ],
)
def test_pin_file_not_one_line_of_text_refused(tmp_path: Path, content: str, problem: str) -> None:
    with pytest.raises(PinSourceError, match=problem) as info:
        read_pin(_pin_file(tmp_path, content))
    assert SECRET not in str(info.value)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604])
def test_pin_file_readable_by_others_refused(tmp_path: Path, mode: int) -> None:
    with pytest.raises(PinSourceError) as info:
        read_pin(_pin_file(tmp_path, SECRET, mode))
    assert "0600" in str(info.value)
    assert SECRET not in str(info.value)


def test_missing_and_empty_pin_refused(tmp_path: Path) -> None:
    with pytest.raises(PinSourceError, match="does not exist"):
        read_pin(HsmConfig(module="m", token_label="t", pin_file=str(tmp_path / "nope")))
    with pytest.raises(PinSourceError, match="empty"):
        read_pin(_pin_file(tmp_path, "\n"))


def test_exactly_one_pin_source(tmp_path: Path) -> None:
    with pytest.raises(PinSourceError, match="exactly one"):
        read_pin(HsmConfig(module="m", token_label="t"))
    with pytest.raises(PinSourceError, match="exactly one"):
        read_pin(HsmConfig(module="m", token_label="t", pin_file="a", pin_credential="b"))


def test_systemd_credential(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "hsm-pin").write_text(SECRET + "\n")
    cfg = HsmConfig(module="m", token_label="t", pin_credential="hsm-pin")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(PinSourceError, match="CREDENTIALS_DIRECTORY"):
        read_pin(cfg)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_pin(cfg) == SECRET


def test_wrong_pin_is_a_login_error_without_the_pin(softhsm_token: SoftHsmToken, tmp_path: Path) -> None:
    # A child process: this one is already logged in to the token, and login happens once per process.
    bad = tmp_path / "bad.pin"
    bad.write_text(SECRET + "\n")
    bad.chmod(0o600)
    cfg = dataclasses.replace(softhsm_token.hsm_config(), pin_file=str(bad))
    code = (
        "import sys\n"
        "from hsm.config import HsmConfig\nfrom hsm.token import Token\nfrom hsm.errors import LoginError\n"
        "m, t, p, c = sys.argv[1:]\n"
        "try:\n    Token.open(HsmConfig(module=m, token_label=t, pin_file=p, softhsm_conf=c))\n"
        "except LoginError as e:\n    print('LOGIN-ERROR', e)\n"
    )
    argv = [sys.executable, "-c", code, cfg.module, cfg.token_label, str(bad), str(cfg.softhsm_conf)]
    out = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert "LOGIN-ERROR" in out.stdout
    assert "PinIncorrect" in out.stdout
    assert SECRET not in out.stdout + out.stderr


def test_unknown_token_lists_what_it_saw(softhsm_token: SoftHsmToken, hsm_token: Token) -> None:
    cfg = dataclasses.replace(softhsm_token.hsm_config(), token_label="no-such-token")
    with pytest.raises(TokenNotFoundError) as info:
        Token.open(cfg)
    assert repr(softhsm_token.label) in str(info.value)


def test_create_softhsm_token_is_idempotent_and_private(softhsm_token: SoftHsmToken) -> None:
    again = create_softhsm_token(softhsm_token.directory, softhsm_token.label)
    assert again == softhsm_token
    for name in ("user.pin", "so.pin"):
        assert os.stat(softhsm_token.directory / name).st_mode & 0o777 == 0o600
    assert "tokendir" in softhsm_token.conf_path.read_text()


def test_error_mapping() -> None:
    assert isinstance(map_pkcs11_error(pkcs11.SessionClosed()), SessionLostError)
    assert isinstance(map_pkcs11_error(pkcs11.DeviceRemoved()), DeviceError)
    assert isinstance(map_pkcs11_error(pkcs11.PinIncorrect()), LoginError)
    assert isinstance(map_pkcs11_error(pkcs11.NoSuchKey()), KeyNotFoundError)
    err = map_pkcs11_error(RuntimeError("boom"))
    assert type(err) is HsmError
    assert not err.retryable
    assert str(err) == err.message
    same = LoginError("x")
    assert map_pkcs11_error(same) is same
