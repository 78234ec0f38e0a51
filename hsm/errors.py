"""The one error hierarchy of the hsm package; vendor (python-pkcs11) errors are translated here only."""

from __future__ import annotations

import functools
from typing import Any


class HsmError(Exception):
    """Root of every error the hsm package raises; `retryable` tells callers whether trying again can help."""

    default_retryable = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retryable = self.default_retryable if retryable is None else retryable

    def __str__(self) -> str:
        return self.message


class PinSourceError(HsmError):
    pass


class TokenNotFoundError(HsmError):
    pass


class LoginError(HsmError):
    pass


class KeyNotFoundError(HsmError):
    pass


class KeyExistsError(HsmError):
    pass


class UnsupportedAlgorithmError(HsmError):
    pass


class SessionLostError(HsmError):
    """The session is gone but the token is not: re-opening and logging in again is expected to work."""

    default_retryable = True


class DeviceError(HsmError):
    """The token itself failed or vanished: fail closed, a retry would only hide a hardware problem."""


class SignatureVerificationError(HsmError):
    pass


class CiphertextError(HsmError):
    """The token would not decrypt these bytes (bad padding, wrong length): the input's fault, not the device's.
    Callers that decrypt what a peer sent must not tell this apart from a wrong key in their answer (an RSA
    PKCS#1 v1.5 padding oracle)."""


class HsmTimeoutError(HsmError):
    """A PKCS#11 call ran longer than the call time-out: the HSM is not answering."""

    default_retryable = True


class HsmBusyError(HsmError):
    """Low-priority work was not started within its lane's wait limit because more important work came first.
    Not a fault of the HSM: callers answer "try later" and raise no alarm."""

    default_retryable = True


@functools.cache
def _classes() -> dict[str, Any]:
    """python-pkcs11's exception classes by what they mean here, imported at the first error to map: processes that
    only verify signatures (the prepare workers, hsm/verify.py) never load the PKCS#11 binding."""
    import pkcs11.exceptions as p11e

    session_lost: tuple[type[BaseException], ...] = (
        p11e.SessionHandleInvalid,
        p11e.SessionClosed,
        p11e.UserNotLoggedIn,
        # Handles may be renumbered when a session is re-opened; re-finding keys by label cures these.
        p11e.ObjectHandleInvalid,
        p11e.KeyHandleInvalid,
    )
    device: tuple[type[BaseException], ...] = (
        p11e.DeviceRemoved,
        p11e.DeviceError,
        p11e.DeviceMemory,
        p11e.TokenNotPresent,
        p11e.TokenNotRecognised,
        p11e.GeneralError,
        p11e.FunctionFailed,
        p11e.HostMemory,
    )
    login: tuple[type[BaseException], ...] = (
        p11e.PinIncorrect,
        p11e.PinInvalid,
        p11e.PinLenRange,
        p11e.PinLocked,
        p11e.PinExpired,
        p11e.UserPinNotInitialized,
        p11e.AnotherUserAlreadyLoggedIn,
        p11e.UserAlreadyLoggedIn,
    )
    unsupported: tuple[type[BaseException], ...] = (
        p11e.MechanismInvalid,
        p11e.MechanismParamInvalid,
        p11e.FunctionNotSupported,
        p11e.DomainParamsInvalid,
        p11e.KeyTypeInconsistent,
        p11e.KeySizeRange,
        p11e.TemplateInconsistent,
    )

    ciphertext: tuple[type[BaseException], ...] = (p11e.EncryptedDataInvalid, p11e.EncryptedDataLenRange)
    return {
        "session_lost": session_lost, "device": device, "login": login, "unsupported": unsupported,
        "ciphertext": ciphertext, "no_key": p11e.NoSuchKey, "several": p11e.MultipleObjectsReturned,
        "no_token": p11e.NoSuchToken, "pkcs11": p11e.PKCS11Error,
    }  # fmt: skip


def _describe(exc: BaseException) -> str:
    # python-pkcs11 errors mostly carry no text; the class name is the PKCS#11 return value in CamelCase.
    # The argument text is never a PIN (python-pkcs11 does not echo inputs), but keep it short anyway.
    detail = str(exc).strip()
    name = type(exc).__name__
    return f"{name}: {detail[:200]}" if detail else name


def map_pkcs11_error(exc: BaseException) -> HsmError:
    """Translate any exception raised by a PKCS#11 call into the HsmError it means for Birthline."""
    if isinstance(exc, HsmError):
        return exc
    what = _describe(exc)
    c = _classes()
    if isinstance(exc, c["session_lost"]):
        return SessionLostError(f"PKCS#11 session lost ({what})")
    if isinstance(exc, c["device"]):
        return DeviceError(f"HSM device failure ({what})")
    if isinstance(exc, c["login"]):
        return LoginError(f"HSM login failed ({what})")
    if isinstance(exc, c["ciphertext"]):
        return CiphertextError(f"the token refused the ciphertext ({what})")
    if isinstance(exc, c["unsupported"]):
        return UnsupportedAlgorithmError(f"the token does not support this operation ({what})")
    if isinstance(exc, c["no_key"]):
        return KeyNotFoundError(f"key not found on the token ({what})")
    if isinstance(exc, c["several"]):
        return KeyExistsError(f"more than one object matches ({what})")
    if isinstance(exc, c["no_token"]):
        return TokenNotFoundError(f"token not found ({what})")
    if isinstance(exc, c["pkcs11"]):
        return HsmError(f"PKCS#11 error ({what})")
    return HsmError(f"unexpected error during an HSM operation ({what})")
