"""RSA key transport in the HSM (the SCEP RA's key): C_Decrypt with CKM_RSA_PKCS on the PKCS#11 thread."""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.asymmetric import padding

from hsm.algorithms import KeyAlgorithm
from hsm.errors import CiphertextError, HsmError, UnsupportedAlgorithmError
from hsm.keys import HsmRsaPrivateKey
from hsm.token import Token


@pytest.fixture(scope="module")
def decrypting_key(hsm_token: Token) -> HsmRsaPrivateKey:
    key = hsm_token.generate_key(f"test-decrypt-{os.urandom(4).hex()}", KeyAlgorithm.RSA_2048, decrypt=True)
    assert isinstance(key, HsmRsaPrivateKey)
    return key


async def test_decrypts_what_its_public_key_encrypted(decrypting_key: HsmRsaPrivateKey) -> None:
    secret = os.urandom(32)
    ciphertext = decrypting_key.public_key().encrypt(secret, padding.PKCS1v15())
    assert decrypting_key.decrypt(ciphertext, padding.PKCS1v15()) == secret
    assert await decrypting_key.adecrypt(ciphertext, padding.PKCS1v15()) == secret
    # The same key still signs (the RA signs its answers with it).
    assert decrypting_key.sign_many([b"answer"])


def test_a_bad_ciphertext_is_the_inputs_fault(decrypting_key: HsmRsaPrivateKey, hsm_token: Token) -> None:
    """A peer's garbage is CiphertextError and leaves the token alone. (With CKM_RSA_PKCS SoftHSM answers a bad
    padding with CKR_GENERAL_ERROR: a device failure, after which the module was re-initialised for everyone.)"""
    n = decrypting_key.public_key().public_numbers().n
    for _ in range(20):
        garbage = (int.from_bytes(os.urandom(256), "big") % n).to_bytes(256, "big")
        with pytest.raises(CiphertextError):
            decrypting_key.decrypt(garbage, padding.PKCS1v15())
    for bad in (b"short", b"\xff" * 256, (n).to_bytes(256, "big")):
        with pytest.raises(CiphertextError):
            decrypting_key.decrypt(bad, padding.PKCS1v15())
    session = hsm_token._core
    assert not session.lost and session.session is not None
    assert decrypting_key.sign_many([b"still signs"])


def test_only_pkcs1v15_and_only_keys_made_to_decrypt(
    decrypting_key: HsmRsaPrivateKey, hsm_token: Token, new_label: Callable[[str], str]
) -> None:
    ciphertext = decrypting_key.public_key().encrypt(b"k" * 16, padding.PKCS1v15())
    with pytest.raises(UnsupportedAlgorithmError):
        decrypting_key.decrypt(
            ciphertext, padding.OAEP(padding.MGF1(padding.hashes.SHA256()), padding.hashes.SHA256(), None)
        )
    signing_only = hsm_token.generate_key(new_label("sign-only"), KeyAlgorithm.RSA_2048)
    assert isinstance(signing_only, HsmRsaPrivateKey)
    other = signing_only.public_key().encrypt(b"k" * 16, padding.PKCS1v15())
    with pytest.raises(HsmError):
        signing_only.decrypt(other, padding.PKCS1v15())
    with pytest.raises(UnsupportedAlgorithmError):
        hsm_token.generate_key(new_label("ec-decrypt"), KeyAlgorithm.EC_P256, decrypt=True)
