from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from hsm.algorithms import KeyAlgorithm
from hsm.errors import UnsupportedAlgorithmError
from hsm.keys import HsmPrivateKey
from hsm.token import Token

_keys: dict[KeyAlgorithm, HsmPrivateKey] = {}


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def new_label() -> Callable[[str], str]:
    """Labels unique within the session-wide token."""
    return unique


@pytest.fixture(params=list(KeyAlgorithm), ids=lambda a: a.value)
def any_key(request: pytest.FixtureRequest, hsm_token: Token) -> HsmPrivateKey:
    """One key per algorithm, generated once per session (RSA-3072 generation is slow)."""
    alg: KeyAlgorithm = request.param
    if alg not in _keys:
        try:
            _keys[alg] = hsm_token.generate_key(unique(alg.value), alg)
        except UnsupportedAlgorithmError as exc:
            pytest.skip(f"this token cannot do {alg.value}: {exc}")
    return _keys[alg]


@pytest.fixture
def ec_key(hsm_token: Token) -> HsmPrivateKey:
    label = "test-ec-p256"
    return (
        hsm_token.get_key(label)
        if hsm_token.has_key(label)
        else hsm_token.generate_key(label, KeyAlgorithm.EC_P256)
    )
