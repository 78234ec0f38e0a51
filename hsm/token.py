"""One logged-in session per (module, token) per process, used only from the PKCS#11 thread."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import pkcs11

from hsm import _p11
from hsm.algorithms import KeyAlgorithm, from_public_key
from hsm.config import HsmConfig
from hsm.errors import (
    DeviceError,
    HsmError,
    KeyNotFoundError,
    LoginError,
    SessionLostError,
    TokenNotFoundError,
    UnsupportedAlgorithmError,
    map_pkcs11_error,
)
from hsm.keys import HsmPrivateKey, make_key
from hsm.pin import forget_refused, read_pin, refused_before, remember_refused
from hsm.worker import Pkcs11Thread, process_thread

T = TypeVar("T")
Op = Callable[[pkcs11.Session], T]

# The token says this PIN is wrong (or no longer usable): presenting it again can only count towards a lockout.
_PIN_REFUSED = (
    pkcs11.PinIncorrect,
    pkcs11.PinInvalid,
    pkcs11.PinLenRange,
    pkcs11.PinExpired,
    pkcs11.PinLocked,
)

# Touched only on the PKCS#11 thread, so no lock.
_libs: dict[str, Any] = {}


def _load_lib(cfg: HsmConfig) -> Any:
    if cfg.module not in _libs:
        if cfg.softhsm_conf is not None:
            # SoftHSM reads this once, when C_Initialize runs.
            os.environ["SOFTHSM2_CONF"] = cfg.softhsm_conf
        _libs[cfg.module] = pkcs11.lib(cfg.module)
    return _libs[cfg.module]


def library(cfg: HsmConfig) -> Any:
    """The PKCS#11 module `cfg` names, loaded and initialised once per process. On the PKCS#11 thread only."""
    return _load_lib(cfg)


class TokenSession:
    """The shared, refcounted state behind every Token object for one (module, label)."""

    def __init__(self, cfg: HsmConfig, thread: Pkcs11Thread) -> None:
        self.cfg = cfg
        self.thread = thread
        self.refs = 0
        self.session: Any = None
        self._private: dict[str, Any] = {}
        # The device failed under an open session (removed, reset, network HSM unreachable): the next call
        # re-initialises the module and logs in again, so the token comes back when the device does. A token
        # closed on purpose (logout) stays closed.
        self.lost = False

    # --- everything below the line runs on the PKCS#11 thread ---
    def login(self) -> None:
        try:
            lib = _load_lib(self.cfg)
            tokens = list(lib.get_tokens())
        except Exception as exc:
            raise map_pkcs11_error(exc) from exc
        matches = [t for t in tokens if t.label == self.cfg.token_label]
        if not matches:
            seen = ", ".join(repr(t.label) for t in tokens) or "none"
            raise TokenNotFoundError(f"no token labelled {self.cfg.token_label!r} (tokens seen: {seen})")
        if len(matches) > 1:
            raise TokenNotFoundError(f"{len(matches)} tokens labelled {self.cfg.token_label!r}: ambiguous")
        pin = read_pin(self.cfg)
        try:
            when = refused_before(self.cfg, pin)
            if when is not None:
                raise LoginError(
                    f"the token refused this PIN {when}; it is not presented again (each wrong attempt counts"
                    " towards the token's lockout): correct the PIN source; a different PIN is tried once",
                    retryable=False,
                )
            try:
                self.session = matches[0].open(rw=True, user_pin=pin)
            except pkcs11.UserAlreadyLoggedIn:
                # Login state is per token per process and can outlive the session that created it.
                self.session = matches[0].open(rw=True)
            except _PIN_REFUSED as exc:
                unrecorded = remember_refused(self.cfg, pin)
                err = map_pkcs11_error(exc)
                if unrecorded:
                    err.message += f" ({unrecorded}: a restart would present it again)"
                raise err from None
            except pkcs11.PKCS11Error as exc:
                raise map_pkcs11_error(exc) from None
            forget_refused(self.cfg)
        finally:
            del pin
        self._private.clear()

    def logout(self) -> None:
        session, self.session = self.session, None
        self._private.clear()
        self.lost = False  # closed on purpose unless the caller says the device failed
        if session is not None:
            # Usually already gone (that is why we are here); nothing left to release then.
            with contextlib.suppress(pkcs11.PKCS11Error):
                session.close()

    def private(self, label: str) -> Any:
        if label not in self._private:
            self._private[label] = _p11.find_private(self.session, label)
        return self._private[label]

    def recover(self) -> None:
        """After a device failure: C_Finalize + C_Initialize (a module keeps a vanished token's slot dead until
        then; SoftHSM does), then log in again. Raises the device's error while it is still away. Sessions of
        other tokens of this module become invalid and are re-opened by their own next call."""
        try:
            _load_lib(self.cfg).reinitialize()
        except Exception as exc:
            raise map_pkcs11_error(exc) from exc
        self.login()
        self.lost = False

    def _device_failed(self) -> None:
        self.logout()
        self.lost = True

    def _check_token(self) -> None:
        """A key that is not found may be a token that is gone (SoftHSM then finds nothing rather than failing):
        ask the token itself, and treat a failure to answer as the device failure it is."""
        try:
            self.session.token.slot.get_token()
        except Exception as exc:
            err = map_pkcs11_error(exc)
            if isinstance(err, DeviceError):
                self._device_failed()
                raise err from exc

    def run(self, op: Op[T]) -> T:
        """Run op(session); on a lost session log in again, re-find handles and retry exactly once. A device
        failure is raised (fail closed: no retry hides it) and the next call tries the device afresh."""
        if self.session is None:
            if not self.lost:
                raise HsmError(f"token {self.cfg.token_label!r} is closed")
            self.recover()
        try:
            return op(self.session)
        except KeyNotFoundError:
            self._check_token()
            raise
        except HsmError:
            raise
        except Exception as exc:
            err = map_pkcs11_error(exc)
            if isinstance(err, DeviceError):
                self._device_failed()
            if not isinstance(err, SessionLostError):
                raise err from exc
        self.logout()
        self.lost = True  # until the login below succeeds
        self.login()
        self.lost = False
        try:
            return op(self.session)
        except KeyNotFoundError:
            self._check_token()
            raise
        except HsmError:
            raise
        except Exception as exc:
            err = map_pkcs11_error(exc)
            if isinstance(err, DeviceError):
                self._device_failed()
            raise err from exc


_registry_lock = threading.Lock()
_registry: dict[tuple[str, str], TokenSession] = {}


class Token:
    def __init__(self, core: TokenSession) -> None:
        self._core = core
        self._closed = False

    @classmethod
    def open(cls, cfg: HsmConfig) -> Token:
        key = (cfg.module, cfg.token_label)
        with _registry_lock:
            core = _registry.get(key)
            if core is None or core.thread.closed:
                core = TokenSession(cfg, process_thread(cfg.call_timeout_s))
                try:
                    core.thread.call(core.login)
                except BaseException:
                    if not _registry:
                        core.thread.close()
                    raise
                _registry[key] = core
            core.refs += 1
        return cls(core)

    @property
    def thread(self) -> Pkcs11Thread:
        return self._core.thread

    @property
    def label(self) -> str:
        return self._core.cfg.token_label

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        core = self._core
        with _registry_lock:
            core.refs -= 1
            if core.refs > 0:
                return
            _registry.pop((core.cfg.module, core.cfg.token_label), None)
            if not core.thread.closed:
                core.thread.call(core.logout)
            if not _registry:
                core.thread.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        # Not on the PKCS#11 thread: close() takes the registry lock, which open() holds across a hop.
        await asyncio.to_thread(self.close)

    def run(self, op: Op[T]) -> T:
        """Run op(session) on the PKCS#11 thread with session recovery: the escape hatch for raw PKCS#11."""
        if self._closed:
            raise HsmError("this Token has been closed")
        return self.thread.call(self._core.run, op)

    async def arun(self, op: Op[T]) -> T:
        if self._closed:
            raise HsmError("this Token has been closed")
        return await self.thread.acall(self._core.run, op)

    def generate_key(self, label: str, algorithm: KeyAlgorithm, *, decrypt: bool = False) -> HsmPrivateKey:
        """A new key pair in the token; `decrypt` (RSA only) lets the private key decrypt as well as sign."""
        algorithm = KeyAlgorithm(algorithm)
        self.run(lambda s: _p11.generate(s, label, algorithm, decrypt=decrypt))
        key = self.get_key(label)
        if key.algorithm is not algorithm:
            raise UnsupportedAlgorithmError(f"token generated {key.algorithm} when asked for {algorithm}")
        return key

    def get_key(self, label: str) -> HsmPrivateKey:
        def op(session: pkcs11.Session) -> _p11.PublicKey:
            self._core.private(label)
            return _p11.read_public(session, label)

        return make_key(self._core, label, self.run(op))

    def has_key(self, label: str) -> bool:
        return self.run(lambda s: _p11.has_private(s, label))

    def list_keys(self) -> list[tuple[str, KeyAlgorithm]]:
        def op(session: pkcs11.Session) -> list[tuple[str, KeyAlgorithm]]:
            found = []
            for label in _p11.private_labels(session):
                try:
                    found.append((label, from_public_key(_p11.read_public(session, label))))
                except HsmError:
                    continue  # keys Birthline cannot use (other algorithms, no public half) are not ours
            return found

        return self.run(op)
