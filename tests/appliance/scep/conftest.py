"""Fixtures for the SCEP tests: `upstream` (a second Birthline acting as the upstream CA, from the CMP tests) and
`ra_mode`, this appliance's issuance service with its product in upstream (RA) mode."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.cmp.ra import ensure_ra
from appliance.issuance.journal import Journal
from appliance.issuance.service import IssueService
from appliance.production import store
from appliance.production.policy import WorkOrderPolicy
from appliance.profiles import builtin_profiles
from hsm.token import Token
from tests.appliance.cmp.test_upstream_mode import ALICE, Ra
from tests.appliance.cmp.upstream_support import upstream_fixture  # noqa: F401 - the `upstream` fixture


@pytest.fixture
async def ra_mode(production_journal_template: Path, hsm_token: Token, tmp_path: Path) -> AsyncIterator[Ra]:
    home = tmp_path / "ra-mode"
    home.mkdir()
    shutil.copy(production_journal_template, home / "journal.sqlite")
    with Journal(home / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        store.set_product_mode(journal, audit, ALICE, "sensor", "upstream")
        issuing = ca_mod.load_ca(journal, "issuing")
        protector = ensure_ra(hsm_token, ca_mod.load_ca(journal, "management"), home / "ra.pem")
        service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                               policy=WorkOrderPolicy("issuing"), audit=audit, upstream_retry_s=1.0)  # fmt: skip
        async with service:
            yield Ra(journal, service, protector, audit, home)
