"""A PKCS#11 fault wrapper for tests: it sits between Birthline's hsm package and python-pkcs11 (the real
SoftHSM module below it) and injects the faults a real HSM shows and SoftHSM never does on demand: session
loss, the device going away and coming back, slow calls, login errors, corrupted signatures. It counts every
C_Login attempt, in this process (`Faults.logins`) or, for a daemon in a child process, in a file.

Installed by replacing `hsm.token._load_lib` (the only place the hsm package gets the module from): nothing of
it exists in production. Every call that is not faulted goes to the real SoftHSM.

In a child process: `python -m tests.p11_faults LOGIN_COUNT_FILE birthline-arguments...` runs the CLI with the
wrapper installed and appends one line to LOGIN_COUNT_FILE for each C_Login attempt.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pkcs11
from pkcs11 import ObjectClass

import hsm.token


def flip_one_bit(signature: bytes) -> bytes:
    """`signature` with one bit of its middle byte flipped: SoftHSM never returns a bad signature, so a test that
    needs one makes it from a real one."""
    sig = bytearray(signature)
    sig[len(sig) // 2] ^= 0x01
    return bytes(sig)


def corrupting(sign: Callable[..., bytes]) -> Callable[..., bytes]:
    """`sign` (hsm.keys.c_sign, for mocker.patch) with one bit of every signature it returns flipped."""

    def corrupt(*args: Any, **kw: Any) -> bytes:
        return flip_one_bit(sign(*args, **kw))

    return corrupt


@dataclass
class Faults:
    """What to inject; the test changes these while the code under test runs (plain attributes: the PKCS#11
    thread reads them, the GIL makes each read whole)."""

    session_lost: int = 0  # the next n C_Sign calls fail with CKR_SESSION_HANDLE_INVALID
    removed: bool = False  # the device is gone: C_Sign, C_OpenSession and C_GetTokenInfo fail
    delay_s: float = 0.0  # every C_Sign takes this long first (an HSM that hangs, or a slow network HSM)
    corrupt: bool = False  # C_Sign returns a signature with one bit flipped
    login_error: type[Exception] | None = None  # C_Login fails with this
    login_count_file: Path | None = None
    logins: int = 0  # C_Login attempts seen (with a PIN), successful or not
    signs: int = 0  # C_Sign calls that reached the wrapper
    initializes: int = 0  # C_Finalize + C_Initialize (the hsm package's recovery after a device failure)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count_login(self) -> None:
        with self._lock:
            self.logins += 1
        if self.login_count_file is not None:
            with open(self.login_count_file, "a", encoding="utf-8") as f:
                f.write("C_Login\n")


class _Key:
    def __init__(self, real: Any, faults: Faults) -> None:
        self._real = real
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def __getitem__(self, item: Any) -> Any:
        return self._real[item]

    def sign(self, data: bytes, **kw: Any) -> bytes:
        f = self._faults
        f.signs += 1
        if f.removed:
            raise pkcs11.DeviceRemoved()
        if f.session_lost > 0:
            f.session_lost -= 1
            raise pkcs11.SessionHandleInvalid()
        if f.delay_s:
            time.sleep(f.delay_s)
        sig = bytes(self._real.sign(data, **kw))
        return flip_one_bit(sig) if f.corrupt else sig


class _Slot:
    def __init__(self, real: Any, faults: Faults) -> None:
        self._real = real
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def get_token(self) -> Any:
        if self._faults.removed:
            raise pkcs11.TokenNotPresent()
        return self._real.get_token()


class _Token:
    def __init__(self, real: Any, faults: Faults) -> None:
        self._real = real
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    @property
    def slot(self) -> _Slot:
        return _Slot(self._real.slot, self._faults)

    def open(self, rw: bool = False, user_pin: Any = None, so_pin: Any = None) -> _Session:
        f = self._faults
        if f.removed:
            raise pkcs11.TokenNotPresent()
        if user_pin is not None:
            f.count_login()
            if f.login_error is not None:
                raise f.login_error()
        return _Session(self._real.open(rw=rw, user_pin=user_pin, so_pin=so_pin), f)


class _Session:
    def __init__(self, real: Any, faults: Faults) -> None:
        self.real = real
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    @property
    def token(self) -> _Token:
        return _Token(self.real.token, self._faults)

    def get_key(self, *args: Any, **kw: Any) -> Any:
        key = self.real.get_key(*args, **kw)
        return _Key(key, self._faults) if kw.get("object_class") is ObjectClass.PRIVATE_KEY else key


class _Lib:
    def __init__(self, real: Any, faults: Faults) -> None:
        self._real = real
        self._faults = faults

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def reinitialize(self) -> None:
        self._faults.initializes += 1
        self._real.reinitialize()

    def get_tokens(self, **kw: Any) -> Iterator[_Token]:
        if self._faults.removed:
            raise pkcs11.TokenNotPresent()
        return (_Token(t, self._faults) for t in self._real.get_tokens(**kw))


def _rewrap(faults: Faults | None) -> None:
    """Every open TokenSession: wrap (or unwrap) its session and forget the key handles found through the other
    kind, so that every later C_Sign goes through the wrapper (or no longer does)."""
    with hsm.token._registry_lock:
        cores = list(hsm.token._registry.values())
    for core in cores:

        def swap(core: hsm.token.TokenSession = core) -> None:
            session = core.session
            if isinstance(session, _Session):
                session = session.real
            if session is not None and faults is not None:
                session = _Session(session, faults)
            core.session = session
            core._private.clear()

        core.thread.call(swap)


@contextlib.contextmanager
def installed(faults: Faults | None = None) -> Iterator[Faults]:
    """The wrapper in place for the duration: over the sessions already open, and any opened meanwhile."""
    faults = faults or Faults()
    real_load = hsm.token._load_lib

    def load(cfg: Any) -> _Lib:
        return _Lib(real_load(cfg), faults)

    hsm.token._load_lib = load  # type: ignore[assignment]
    _rewrap(faults)
    try:
        yield faults
    finally:
        hsm.token._load_lib = real_load
        _rewrap(None)


def main(argv: list[str]) -> int:
    """The birthline CLI with the wrapper installed, counting C_Login attempts in argv[0]'s file."""
    from appliance.cli.main import main as birthline

    with installed(Faults(login_count_file=Path(argv[0]))):
        return birthline(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
