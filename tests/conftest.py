"""Shared fixtures: one real SoftHSM2 token per test session."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hsm.softhsm import SoftHsmToken, create_softhsm_token
from hsm.token import Token


@pytest.fixture(scope="session")
def softhsm_token(tmp_path_factory: pytest.TempPathFactory) -> SoftHsmToken:
    return create_softhsm_token(tmp_path_factory.mktemp("softhsm"))


@pytest.fixture(scope="session")
def hsm_token(softhsm_token: SoftHsmToken) -> Iterator[Token]:
    # Token.open exports SOFTHSM2_CONF from the config before the module is loaded.
    with Token.open(softhsm_token.hsm_config()) as token:
        yield token
