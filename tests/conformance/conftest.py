"""The conformance appliance's own floor, in the session's SoftHSM token: CAs under names no other test uses (a
token holds one key per label), a tenant, a product, line CONF with no station yet, and no work order."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.issuance.journal import Journal
from appliance.production import store
from appliance.production.users import Role, User
from appliance.profiles import builtin_profiles
from hsm.token import Token

ISSUING, MANAGEMENT, LINE = "conf-issuing", "conf-management", "CONF"
ADMIN = User("conformance-admin", Role.ADMINISTRATOR)


@pytest.fixture(scope="session")
def conformance_template(hsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conformance-template") / "journal.sqlite"
    with Journal(path) as journal:
        audit = AuditLog(journal)
        ca_mod.create_root(journal, hsm_token, "conf-root", "O=Conformance,CN=Conformance Root CA")
        ca_mod.create_issuing(
            journal, hsm_token, ISSUING, "O=Conformance,CN=Conformance Birth CA", "conf-root"
        )
        ca_mod.create_management(journal, hsm_token, MANAGEMENT, "O=Conformance,CN=Conformance Management CA")
        store.add_tenant(journal, audit, ADMIN, "conf", "Conformance")
        store.add_product(journal, audit, ADMIN, "conf-sensor", tenant="conf", profile=builtin_profiles()["idevid"],
                          ca=ISSUING)  # fmt: skip
        store.add_line(journal, audit, ADMIN, LINE)
    return path
