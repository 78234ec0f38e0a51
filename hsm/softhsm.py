"""Dev/test/demo helper: a private SoftHSM2 token in a directory of its own. Not for production."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from hsm.config import HsmConfig
from hsm.errors import HsmError

_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/arm-linux-gnueabihf/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)

# Runs in a child so that its logins cannot collide with this process's single login per token.
# PINs arrive on stdin, never in argv or the environment.
_SET_PINS = """
import sys, pkcs11
module, label, old_so, new_so, old_user, new_user = sys.stdin.read().split("\\n")[:6]
token = pkcs11.lib(module).get_token(token_label=label)
with token.open(rw=True, so_pin=old_so) as s:
    s.set_pin(old_so, new_so)
with token.open(rw=True, user_pin=old_user) as s:
    s.set_pin(old_user, new_user)
"""


@dataclass(frozen=True)
class SoftHsmToken:
    directory: Path
    conf_path: Path
    module: str
    label: str
    pin_file: Path

    def hsm_config(self) -> HsmConfig:
        return HsmConfig(
            module=self.module,
            token_label=self.label,
            pin_file=str(self.pin_file),
            softhsm_conf=str(self.conf_path),
        )


def find_softhsm_module() -> str:
    for candidate in _MODULE_CANDIDATES:
        if os.path.exists(candidate):
            return candidate
    raise HsmError(
        "SoftHSM2 is not installed (no libsofthsm2.so in " + ", ".join(_MODULE_CANDIDATES) + "); "
        "apt-get install softhsm2"
    )


def _util(conf: Path, *args: str) -> str:
    exe = shutil.which("softhsm2-util")
    if exe is None:
        raise HsmError("softhsm2-util not found; apt-get install softhsm2")
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    done = subprocess.run([exe, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise HsmError(f"softhsm2-util {args[0]} failed: {done.stderr.strip() or done.stdout.strip()}")
    return done.stdout


def _has_token(conf: Path, label: str) -> bool:
    for line in _util(conf, "--show-slots").splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Label" and value.strip() == label:
            return True
    return False


def _write_secret(path: Path, value: str) -> None:
    """0600 from its first byte, and never written through a link planted at the PIN file's name: a new file
    under a random name (O_EXCL|O_NOFOLLOW) is renamed over it, which replaces a link instead of following it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(value + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def create_softhsm_token(directory: Path, label: str = "birthline") -> SoftHsmToken:
    directory = Path(directory).resolve()
    module = find_softhsm_module()
    conf = directory / "softhsm2.conf"
    token = SoftHsmToken(directory, conf, module, label, directory / "user.pin")
    so_pin_file = directory / "so.pin"
    if conf.exists() and _has_token(conf, label):
        if not (token.pin_file.exists() and so_pin_file.exists()):
            raise HsmError(f"token {label!r} in {directory} exists but its PIN files are missing; remove it")
        return token
    (directory / "tokens").mkdir(parents=True, exist_ok=True, mode=0o700)
    conf.write_text(
        f"directories.tokendir = {directory / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    # softhsm2-util only takes PINs in argv, so give it throwaway ones and replace them at once.
    old_so, old_user = secrets.token_hex(8), secrets.token_hex(8)
    _util(conf, "--init-token", "--free", "--label", label, "--so-pin", old_so, "--pin", old_user)
    new_so, new_user = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    done = subprocess.run(
        [sys.executable, "-c", _SET_PINS],
        input="\n".join([module, label, old_so, new_so, old_user, new_user]) + "\n",
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise HsmError(f"changing the PINs of token {label!r} failed: {last}")
    _write_secret(so_pin_file, new_so)
    _write_secret(token.pin_file, new_user)
    return token
