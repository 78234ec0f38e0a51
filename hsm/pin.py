"""Read the token user PIN from a private file or a systemd credential, never echoing it anywhere."""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import hmac
import json
import os
import secrets
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


# --- a PIN the token refused is never presented twice ------------------------------------------------------------
# A real HSM locks its user PIN after a few wrong attempts (SoftHSM never does). A daemon under systemd with
# Restart= and a wrong PIN file would log in once per restart and lock the token within minutes; the session
# recovery inside one process would do the same at every health probe. So a refused PIN is remembered (in the
# process, and in `refused_pin_record` across processes) and the next login with that same PIN is refused here,
# without C_Login. A different PIN (the administrator corrected the file or the credential) is tried once.
#
# The record holds HMAC-SHA256(random salt, PIN) of a PIN the token *refused*: at worst it tells who can read
# the state directory a wrong PIN. The right PIN is never recorded (the record is deleted at a good login).

_refused_in_process: set[tuple[str, bytes]] = set()  # (token label, HMAC under _PROCESS_SALT)
_PROCESS_SALT = secrets.token_bytes(32)


def _mac(salt: bytes, pin: str) -> bytes:
    return hmac.new(salt, pin.encode("utf-8"), hashlib.sha256).digest()


def refused_before(cfg: HsmConfig, pin: str) -> str | None:
    """When the token refused this very PIN before: the time it did ("earlier in this process" when only this
    process knows); None if it did not, or nobody remembers it."""
    if (cfg.token_label, _mac(_PROCESS_SALT, pin)) in _refused_in_process:
        return "earlier in this process"
    if cfg.refused_pin_record is None:
        return None
    try:
        with open(cfg.refused_pin_record, encoding="utf-8") as f:
            record = json.load(f)
        same = record["token"] == cfg.token_label and hmac.compare_digest(
            bytes.fromhex(record["hmac"]), _mac(bytes.fromhex(record["salt"]), pin)
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # An unreadable record must not open the way to a lockout: treat the PIN as refused before, and say so.
        return f"at an unknown time (the record {cfg.refused_pin_record} cannot be read)"
    return f"at {record.get('at', 'an unknown time')}" if same else None


def remember_refused(cfg: HsmConfig, pin: str) -> str | None:
    """Remember that the token refused `pin`; returns why the record could not be written (None when it was).
    The process remembers it whatever happens to the file."""
    _refused_in_process.add((cfg.token_label, _mac(_PROCESS_SALT, pin)))
    if cfg.refused_pin_record is None:
        return None
    salt = secrets.token_bytes(16)
    record = {
        "token": cfg.token_label,
        "salt": salt.hex(),
        "hmac": _mac(salt, pin).hex(),
        "at": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    path = cfg.refused_pin_record
    tmp = f"{path}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        return f"cannot record the refused PIN in {path}: {exc.strerror or exc}"
    return None


def forget_refused(cfg: HsmConfig) -> None:
    """After a good login: nothing to remember (a later wrong PIN is a new one)."""
    if cfg.refused_pin_record is not None:
        # A record that cannot be removed (read-only state) only means one needless refusal of this PIN later.
        with contextlib.suppress(OSError):
            os.unlink(cfg.refused_pin_record)
