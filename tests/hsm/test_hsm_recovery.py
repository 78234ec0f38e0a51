from __future__ import annotations

from typing import Any

import pkcs11
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pytest_mock import MockerFixture

import hsm.keys
from hsm.errors import DeviceError, SignatureVerificationError
from hsm.keys import HsmEcPrivateKey, HsmPrivateKey
from hsm.token import Token
from tests.p11_faults import corrupting

ECDSA = ec.ECDSA(hashes.SHA256())


def test_real_session_loss_is_recovered(hsm_token: Token, ec_key: HsmEcPrivateKey) -> None:
    before = hsm_token.run(lambda s: s)
    # Behind the Token's back: C_Logout + C_CloseSession on the session it holds.
    hsm_token.thread.call(before.close)
    sig = ec_key.sign(b"after loss", ECDSA)
    pub = ec_key.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    pub.verify(sig, b"after loss", ECDSA)
    assert hsm_token.run(lambda s: s) is not before
    assert ec_key.sign_many([b"a", b"b"])


def test_session_error_retried_once(mocker: MockerFixture, ec_key: HsmEcPrivateKey) -> None:
    real = hsm.keys.c_sign
    calls: list[int] = []

    def flaky(*args: Any, **kw: Any) -> bytes:
        calls.append(1)
        if len(calls) == 1:
            raise pkcs11.SessionHandleInvalid()
        return real(*args, **kw)

    mocker.patch("hsm.keys.c_sign", side_effect=flaky)
    assert ec_key.sign(b"x", ECDSA)
    assert len(calls) == 2


def test_persistent_session_error_gives_up_after_one_retry(
    mocker: MockerFixture, ec_key: HsmEcPrivateKey
) -> None:
    from hsm.errors import SessionLostError

    patched = mocker.patch("hsm.keys.c_sign", side_effect=pkcs11.UserNotLoggedIn())
    with pytest.raises(SessionLostError) as info:
        ec_key.sign(b"x", ECDSA)
    assert info.value.retryable
    assert patched.call_count == 2


@pytest.mark.parametrize(
    "fault", [pkcs11.DeviceRemoved, pkcs11.DeviceError, pkcs11.TokenNotPresent, pkcs11.GeneralError]
)
def test_device_loss_fails_closed(
    mocker: MockerFixture, ec_key: HsmEcPrivateKey, fault: type[Exception]
) -> None:
    patched = mocker.patch("hsm.keys.c_sign", side_effect=fault())
    with pytest.raises(DeviceError) as info:
        ec_key.sign(b"x", ECDSA)
    assert not info.value.retryable
    assert patched.call_count == 1


def test_corrupted_signature_is_never_returned(mocker: MockerFixture, any_key: HsmPrivateKey) -> None:
    mocker.patch("hsm.keys.c_sign", side_effect=corrupting(hsm.keys.c_sign))
    with pytest.raises(SignatureVerificationError):
        any_key.sign_many([b"tbs"])
    with pytest.raises(SignatureVerificationError):
        if isinstance(any_key, hsm.keys.HsmEcPrivateKey):
            any_key.sign(b"tbs", ECDSA)
        elif isinstance(any_key, hsm.keys.HsmRsaPrivateKey):
            from cryptography.hazmat.primitives.asymmetric import padding

            any_key.sign(b"tbs", padding.PKCS1v15(), hashes.SHA256())
        else:
            any_key.sign(b"tbs")
