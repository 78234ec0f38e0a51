"""Commissioning a token: initialising one (SoftHSM; any module with C_InitToken) and checking that the
appliance can use it (`birthline config check`).

PINs never travel in argv or the environment. softhsm2-util reads them only from its argv or a terminal, so the
token is initialised through PKCS#11 itself: C_InitToken (python-pkcs11 does not wrap it; ctypes calls the
module's own symbol) and C_InitPIN, in a child process that gets the PINs on its standard input, so that its
logins never meet this process's single login per token.

The checks run in this order and stop at the first failure, because each needs the one before: the PIN source
(owner, mode, content), the module (it loads), the token (found once by its label, initialised, its user PIN
set and not locked) and the login. The login is ONE attempt with the PIN as read: a wrong PIN counts towards
the token's lockout on most HSMs, so it is never retried, and it is not tried at all when the token says the
next failure would lock the PIN.
"""

from __future__ import annotations

import os
import pwd
import stat
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hsm.config import HsmConfig
from hsm.errors import HsmError, PinSourceError
from hsm.pin import pin_content_problem, read_pin

LABEL_MAX = 32  # CK_TOKEN_INFO.label: 32 bytes, blank padded
PIN_MIN, PIN_MAX = 4, 255  # SoftHSM's bounds; vendors' are narrower, never wider

# CKF_* token flags (PKCS#11 2.40 section 3.2, CK_TOKEN_INFO).
_TOKEN_INITIALIZED = 0x400
_USER_PIN_INITIALIZED = 0x8
_USER_PIN_COUNT_LOW = 0x10000
_USER_PIN_FINAL_TRY = 0x20000
_USER_PIN_LOCKED = 0x40000


class CommissionError(HsmError):
    """Initialising or checking a token failed; the message says what to do."""


@dataclass(frozen=True)
class Check:
    """One passed check: what was checked and what was found."""

    what: str
    found: str


# -- checks ------------------------------------------------------------------------------------------------------
def check_pin_source(cfg: HsmConfig) -> Check:
    """The PIN file is a regular file owned by the user running the check (the daemon's user: run the check as
    that user), readable by nobody else, and holds a PIN; a systemd credential is checked where it is readable."""
    if cfg.pin_credential is not None:
        directory = os.environ.get("CREDENTIALS_DIRECTORY")
        if not directory:
            return Check(f"hsm.pin_credential {cfg.pin_credential!r}", "not checked here: systemd provides it to"
                         " the unit only (check it there with `systemd-run --pipe -p LoadCredentialEncrypted=..."
                         " birthline config check`)")  # fmt: skip
        read_pin(cfg)
        return Check(f"hsm.pin_credential {cfg.pin_credential!r}", f"readable in {directory}")
    assert cfg.pin_file is not None
    path = Path(cfg.pin_file)
    where = f"hsm.pin_file {path}"
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise CommissionError(f"{where}: no such file: write the token's user PIN there (one line, mode 0600),"
                              " or let `birthline hsm init-token` create it") from None  # fmt: skip
    except OSError as exc:
        raise CommissionError(f"{where}: cannot be read: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise CommissionError(f"{where}: is not a regular file (a link or a device is refused): put the PIN in a"
                              " regular file")  # fmt: skip
    me = os.geteuid()
    if st.st_uid != me:
        raise CommissionError(
            f"{where}: owned by {_user(st.st_uid)}, not by {_user(me)} who runs this check: the daemon's user must"
            f" own it (chown {_user(me)} {path}), and this check must run as the daemon's user"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o077:
        raise CommissionError(f"{where}: group or others may read it (mode {mode:04o}): chmod 600 {path}")
    read_pin(cfg)  # the content: UTF-8, not empty
    return Check(where, f"owned by {_user(me)}, mode {mode:04o}")


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _load(cfg: HsmConfig) -> Any:
    from hsm.token import library

    return library(cfg)


def check_module(cfg: HsmConfig) -> Check:
    where = f"hsm.module {cfg.module}"
    if not Path(cfg.module).is_file():
        raise CommissionError(f"{where}: no such file: install the HSM's PKCS#11 library (SoftHSM: apt-get install"
                              " softhsm2) and give its path")  # fmt: skip
    try:
        lib = _run(_load, cfg)
    except Exception as exc:  # noqa: BLE001 - whatever the library does when loading, the answer is "it does not load"
        raise CommissionError(f"{where}: does not load as a PKCS#11 module ({type(exc).__name__}: {exc}): check"
                              " the path and that it is the vendor's PKCS#11 library for this machine") from None  # fmt: skip
    return Check(where, f"loads: {lib.manufacturer_id.strip()} {lib.library_description.strip()}".rstrip())


def _token_info(cfg: HsmConfig) -> tuple[list[str], list[int]]:
    """Every token's label, and the flags of those labelled cfg.token_label."""
    tokens = list(_load(cfg).get_tokens())
    return [t.label for t in tokens], [int(t.flags) for t in tokens if t.label == cfg.token_label]


def check_token(cfg: HsmConfig) -> Check:
    where = f"hsm.token_label {cfg.token_label!r}"
    labels, matching = _run(_token_info, cfg)
    if not matching:
        seen = ", ".join(repr(x) for x in labels if x) or "none"
        raise CommissionError(f"{where}: no such token (tokens seen: {seen}): initialise it (SoftHSM: `birthline"
                              " hsm init-token`; a vendor HSM: its own tool) or correct the label")  # fmt: skip
    if len(matching) > 1:
        raise CommissionError(f"{where}: {len(matching)} tokens carry this label: give each its own label")
    flags = matching[0]
    if not flags & _TOKEN_INITIALIZED or not flags & _USER_PIN_INITIALIZED:
        raise CommissionError(f"{where}: the token has no user PIN yet: set it with the SO PIN (`birthline hsm"
                              " init-token` does for a new SoftHSM token; a vendor HSM: its own tool)")  # fmt: skip
    if flags & _USER_PIN_LOCKED:
        raise CommissionError(f"{where}: the user PIN is locked after too many wrong PINs: reset it with the SO PIN"
                              " (C_InitPIN: `pkcs11-tool --login --login-type so --init-pin`, or the vendor's"
                              " tool), then write the new PIN to the PIN file")  # fmt: skip
    return Check(where, "found, initialised, user PIN set")


def check_login(cfg: HsmConfig) -> Check:
    """ONE login with the configured PIN, never retried; not tried when the token says the next failure locks
    the PIN."""
    where = f"hsm login to {cfg.token_label!r}"
    _, matching = _run(_token_info, cfg)
    flags = matching[0] if len(matching) == 1 else 0
    if flags & _USER_PIN_FINAL_TRY:
        raise CommissionError(f"{where}: not tried: the token says one more wrong PIN locks it; make sure the PIN"
                              " file is right (or reset the PIN with the SO PIN) before anything logs in")  # fmt: skip
    pin = read_pin(cfg)
    try:
        _run(_login_once, cfg, pin)
    except Exception as exc:  # noqa: BLE001 - classified below; never retried
        name = type(exc).__name__
        if name in ("PinIncorrect", "PinInvalid", "PinLenRange"):
            raise CommissionError(f"{where}: the PIN in the PIN source is wrong ({name}); this one attempt counts"
                                  " towards the token's lockout and is not retried: correct the PIN file, then"
                                  " check once more") from None  # fmt: skip
        if name in ("PinLocked", "PinExpired"):
            raise CommissionError(f"{where}: {name}: reset the user PIN with the SO PIN (vendor tool, or"
                                  " `pkcs11-tool --login --login-type so --init-pin`)") from None  # fmt: skip
        raise CommissionError(f"{where}: failed ({name}: {exc})") from None
    finally:
        del pin
    low = " (the token reports wrong PINs before this one)" if flags & _USER_PIN_COUNT_LOW else ""
    return Check(where, f"the PIN logs in{low}")


def _login_once(cfg: HsmConfig, pin: str) -> None:
    import pkcs11

    lib = _load(cfg)
    token = lib.get_token(token_label=cfg.token_label)
    try:
        session = token.open(user_pin=pin)
    except pkcs11.UserAlreadyLoggedIn:  # this process logged in before: the PIN was good then
        session = token.open()
    session.close()


def _run(fn: Any, *args: Any) -> Any:
    """On this process's PKCS#11 thread, like every PKCS#11 call (hsm/worker.py)."""
    from hsm.worker import process_thread

    return process_thread().call(fn, *args)


# -- initialising a token ------------------------------------------------------------------------------------------
# PINs and the label arrive on stdin, one per line. Exit codes: 0 done, 3 the label exists, 4 no free slot,
# 5 C_InitToken failed (its CKR_ value follows).
_INIT = r"""
import ctypes, sys
import pkcs11
module, label, so_pin, user_pin = sys.stdin.read().split("\n")[:4]
lib = pkcs11.lib(module)
if any(t.label == label for t in lib.get_tokens()):
    sys.exit(3)
free = [s for s in lib.get_slots(token_present=True) if not int(s.get_token().flags) & 0x400]
if not free:
    sys.exit(4)
init = ctypes.CDLL(module).C_InitToken
init.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
init.restype = ctypes.c_ulong
so = so_pin.encode()
rv = init(free[0].slot_id, so, len(so), label.encode().ljust(32, b" "))
if rv:
    print(f"{rv:#x}")
    sys.exit(5)
with lib.get_token(token_label=label).open(rw=True, so_pin=so_pin) as session:
    session.init_pin(user_pin)
print(free[0].slot_id)
"""


def check_new_pin(pin: str, what: str) -> None:
    """The rule read_pin applies to the PIN file, so a PIN written there reads back as it was set."""
    if not PIN_MIN <= len(pin.encode()) <= PIN_MAX or pin_content_problem(pin):
        raise CommissionError(
            f"the {what} must be {PIN_MIN} to {PIN_MAX} bytes on one line, without blanks before or after it"
        )


def init_token(cfg: HsmConfig, so_pin: str, user_pin: str) -> int:
    """Initialise a new token labelled cfg.token_label in a free slot of cfg.module with these PINs; return the
    slot id. Refused when a token with that label exists: C_InitToken erases whatever a token holds."""
    label = cfg.token_label
    if not label or len(label.encode()) > LABEL_MAX or label != label.strip() or "\n" in label:
        raise CommissionError(f"token label {label!r}: 1 to {LABEL_MAX} bytes, no leading or trailing blanks")
    check_new_pin(so_pin, "SO PIN")
    check_new_pin(user_pin, "user PIN")
    env = dict(os.environ)
    if cfg.softhsm_conf is not None:
        env["SOFTHSM2_CONF"] = cfg.softhsm_conf
    done = subprocess.run(
        [sys.executable, "-c", _INIT], input="\n".join([cfg.module, label, so_pin, user_pin]) + "\n", env=env,
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    if done.returncode == 3:
        raise CommissionError(f"a token labelled {label!r} exists already; it is left as it is (initialising it"
                              " again would erase its keys)")  # fmt: skip
    if done.returncode == 4:
        raise CommissionError(f"{cfg.module} offers no free slot for a new token (SoftHSM: check that the"
                              " tokendir of its configuration exists and is writable)")  # fmt: skip
    if done.returncode != 0:
        last = (done.stdout.strip() or done.stderr.strip() or "?").splitlines()[-1]
        raise CommissionError(f"initialising token {label!r} failed: {last[:200]}")
    return int(done.stdout.strip().splitlines()[-1])


def refuse_existing_label(cfg: HsmConfig) -> None:
    """Refused before anything is written when a token already carries the label (init_token checks again)."""
    check_module(cfg)
    labels, _ = _run(_token_info, cfg)
    if cfg.token_label in labels:
        raise CommissionError(f"a token labelled {cfg.token_label!r} exists already; it is left as it is"
                              " (initialising it again would erase its keys); no file was written")  # fmt: skip


def softhsm_tokendir(conf: Path) -> Path | None:
    """The `directories.tokendir` a SoftHSM configuration names, or None."""
    for line in conf.read_text(errors="replace").splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "directories.tokendir":
            return Path(value.strip())
    return None


def give_to(cfg: HsmConfig, uid: int, gid: int) -> list[Path]:
    """The daemon's user owns the user PIN file and, for SoftHSM, its configuration and every file of its token
    directory (SoftHSM opens them for writing at each session)."""
    paths: list[Path] = []
    if cfg.pin_file is not None:
        paths.append(Path(cfg.pin_file))
    if cfg.softhsm_conf is not None:
        conf = Path(cfg.softhsm_conf)
        paths.append(conf)
        tokendir = softhsm_tokendir(conf)
        if tokendir is not None:
            paths.append(tokendir)
            for top, dirs, files in os.walk(tokendir):
                for name in dirs + files:
                    os.lchown(os.path.join(top, name), uid, gid)
    for path in paths:
        os.lchown(path, uid, gid)
    return paths


def check_softhsm_conf(cfg: HsmConfig) -> Check:
    """SoftHSM only: its configuration file and token directory exist and this user may use them. SoftHSM
    reports either as a bare GeneralError when the module is loaded, which says nothing of the cause."""
    if cfg.softhsm_conf is None:
        return Check("hsm.softhsm_conf", "not set (a vendor HSM)")
    conf = Path(cfg.softhsm_conf)
    where = f"hsm.softhsm_conf {conf}"
    me = _user(os.geteuid())
    if not conf.is_file():
        raise CommissionError(f"{where}: no such file: correct the path, or let `birthline hsm init-token` write"
                              " it")  # fmt: skip
    if not os.access(conf, os.R_OK):
        raise CommissionError(f"{where}: {me} who runs this check cannot read it (owned by"
                              f" {_user(conf.stat().st_uid)}): the daemon's user must own it and its token"
                              " directory (`birthline hsm init-token --owner USER`, or chown -R USER the"
                              " directory), and this check must run as that user")  # fmt: skip
    tokendir = softhsm_tokendir(conf)
    if tokendir is None:
        raise CommissionError(f"{where}: names no directories.tokendir")
    if not tokendir.is_dir():
        raise CommissionError(f"{where}: its tokendir {tokendir} does not exist: create it (mode 0700, owned by the"
                              " daemon's user)")  # fmt: skip
    unusable = [tokendir] if not os.access(tokendir, os.R_OK | os.W_OK | os.X_OK) else []
    if not unusable:
        for top, dirs, files in os.walk(tokendir):
            for name in dirs:
                if not os.access(os.path.join(top, name), os.R_OK | os.W_OK | os.X_OK):
                    unusable.append(Path(top, name))
            for name in files:
                if not os.access(os.path.join(top, name), os.R_OK | os.W_OK):
                    unusable.append(Path(top, name))
    if unusable:
        first = unusable[0]
        raise CommissionError(f"{where}: {me} who runs this check cannot read and write {first} (owned by"
                              f" {_user(first.stat().st_uid)}) in its tokendir: the daemon's user must own the"
                              f" token directory (chown -R {me} {tokendir}, or `birthline hsm init-token --owner"
                              " USER` for a new token), and this check must run as that user")  # fmt: skip
    return Check(where, f"readable; tokendir {tokendir} readable and writable by {me}")


def write_softhsm_conf(conf: Path) -> Path:
    """A SoftHSM configuration whose tokens live in `tokens/` beside it (0700), unless the file exists."""
    if conf.exists():
        return conf
    tokens = conf.parent / "tokens"
    tokens.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    return conf


# In order; each needs the one before. Each returns what it found, or raises (CommissionError, PinSourceError)
# saying what is wrong and what to do.
CHECKS = (check_pin_source, check_softhsm_conf, check_module, check_token, check_login)


__all__ = [
    "CHECKS",
    "Check",
    "CommissionError",
    "PinSourceError",
    "give_to",
    "init_token",
    "refuse_existing_label",
    "write_softhsm_conf",
]
