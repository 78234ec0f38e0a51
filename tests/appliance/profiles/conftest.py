"""Fixtures for the profile tests: an in-memory CA and a P-256 device key."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from tests.appliance.profiles.profiles_support import Ca, make_ca, make_csr


@pytest.fixture(scope="session")
def ca() -> Ca:
    return make_ca()


@pytest.fixture(scope="session")
def p256_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="session")
def p256_csr(p256_key: ec.EllipticCurvePrivateKey) -> bytes:
    return make_csr(p256_key, hash_alg=hashes.SHA256())
