"""A real device loss: the SoftHSM token vanishes under the open session and comes back."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hsm.errors import DeviceError, HsmError
from hsm.keys import HsmEcPrivateKey
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from tests.real_faults import hsm_token_removed

ECDSA = ec.ECDSA(hashes.SHA256())


def test_removed_token_fails_closed_and_signs_again_once_back(
    softhsm_token: SoftHsmToken, hsm_token: Token, ec_key: HsmEcPrivateKey
) -> None:
    with hsm_token_removed(softhsm_token):
        with pytest.raises(DeviceError):
            ec_key.sign(b"while removed", ECDSA)
        # Still away: every call fails (and none hangs), with an error that says so.
        for _ in range(3):
            with pytest.raises(HsmError) as info:
                ec_key.sign(b"while removed", ECDSA)
            assert "closed" not in info.value.message
    # Back: the next call re-initialises the module, logs in again, and signs.
    sig = ec_key.sign(b"back", ECDSA)
    pub = ec_key.public_key()
    pub.verify(sig, b"back", ECDSA)
    assert hsm_token.has_key(ec_key.label)


def test_key_lookup_while_removed_is_a_device_failure_not_a_missing_key(
    softhsm_token: SoftHsmToken, hsm_token: Token, ec_key: HsmEcPrivateKey
) -> None:
    """SoftHSM finds no objects on a vanished token instead of failing: the layer asks the token itself, so the
    caller sees the device failure (and the session recovers later) rather than a key that seems deleted."""
    with hsm_token_removed(softhsm_token), pytest.raises(DeviceError):
        hsm_token.get_key(ec_key.label)
    assert hsm_token.get_key(ec_key.label).public_key() == ec_key.public_key()
