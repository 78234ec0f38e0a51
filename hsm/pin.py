"""Read the token user PIN from a private file or a systemd credential, never echoing it anywhere."""

from __future__ import annotations

import os
import stat

from hsm.config import HsmConfig
from hsm.errors import PinSourceError


def _pin_path(cfg: HsmConfig) -> tuple[str, bool]:
    if (cfg.pin_file is None) == (cfg.pin_credential is None):
        raise PinSourceError("configure exactly one of pin_file or pin_credential")
    if cfg.pin_file is not None:
        return cfg.pin_file, True
    assert cfg.pin_credential is not None
    if "/" in cfg.pin_credential or cfg.pin_credential in ("", ".", ".."):
        raise PinSourceError(f"invalid credential name {cfg.pin_credential!r}")
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if not directory:
        raise PinSourceError(
            f"pin_credential {cfg.pin_credential!r} set but $CREDENTIALS_DIRECTORY is not "
            "(is the unit missing LoadCredential=?)"
        )
    # systemd owns the permissions of the credentials directory, so no mode check there.
    return os.path.join(directory, cfg.pin_credential), False


def read_pin(cfg: HsmConfig) -> str:
    path, check_mode = _pin_path(cfg)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise PinSourceError(f"PIN source {path} does not exist") from None
    except OSError as exc:
        raise PinSourceError(f"cannot open PIN source {path}: {exc.strerror}") from None
    try:
        # fstat on the open descriptor, so the file checked is the file read.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise PinSourceError(f"PIN source {path} is not a regular file")
        if check_mode and st.st_mode & 0o077:
            raise PinSourceError(
                f"PIN file {path} is accessible by group/other (mode {stat.S_IMODE(st.st_mode):04o}); "
                "chmod 0600 it"
            )
        raw = os.read(fd, 4096)
    finally:
        os.close(fd)
    try:
        pin = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise PinSourceError(f"PIN source {path} is not valid UTF-8") from None
    if pin.endswith("\n"):
        pin = pin[:-1]
    problem = pin_content_problem(pin)
    if problem:
        raise PinSourceError(f"PIN source {path} {problem}: write the PIN alone on one line")
    return pin


def pin_content_problem(pin: str) -> str | None:
    """What is wrong with a PIN as read (its one final newline removed), never quoting it; None when it is one
    line of text. A second line, a carriage return (a CRLF line end) or blanks around the PIN would otherwise
    be sent to the token as part of the PIN: a wrong PIN, which counts towards the token's lockout."""
    if not pin:
        return "is empty"
    if "\n" in pin:
        return "has more than one line"
    if "\r" in pin:
        return "has a carriage return (a CRLF line end?)"
    if pin != pin.strip():
        return "has blanks (spaces, tabs) before or after the PIN"
    return None
