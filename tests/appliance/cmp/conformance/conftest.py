"""The CMP server as the conformance tests see it: the real issuance core (SoftHSM token, journal with the
production floor, work-order policy) behind the real HTTP server on 127.0.0.1, and a peer that builds the
messages a conformant or a faulty client would send (tests/appliance/cmp/conformance/peer.py)."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance import ca as ca_mod
from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.cmp.ra import ensure_ra
from appliance.cmp.server import CmpLabel, CmpResponder, CmpSettings, make_cmp_app
from appliance.issuance.journal import Journal
from appliance.issuance.service import IssueService
from appliance.production.policy import WorkOrderPolicy
from appliance.profiles import builtin_profiles
from appliance.va.http import VaServer
from hsm.token import Token
from tests.appliance.cmp.conformance.peer import SECRET, Peer, SoftCa
from tests.appliance.conftest import put_on_line


@pytest.fixture
async def peer(production_journal_template: Path, hsm_token: Token, tmp_path: Path) -> AsyncIterator[Peer]:
    shutil.copy(production_journal_template, tmp_path / "journal.sqlite")
    with Journal(tmp_path / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        creds = reg.add_station(journal, hsm_token, "cmp-signer", "lan", audit=audit, actor="alice")
        put_on_line(journal, "cmp-signer")
        issuing = ca_mod.load_ca(journal, "issuing")
        management = ca_mod.load_ca(journal, "management")
        ra = ensure_ra(hsm_token, management, tmp_path / "ra.pem")
        downstream = SoftCa("Downstream RA CA")
        ra_label = CmpLabel("ra", "fixture-1", trusted_cas=(downstream.cert,), allow_nested=True, allow_rr=True,
                            accept_ra_verified=True, signer_revocation="none")  # fmt: skip
        labels = {
            "mac": CmpLabel("mac", "fixture-1", secret=SECRET),
            "signed": CmpLabel("signed", "cmp-signer", station_signature=True),
            "ra": ra_label,
        }
        service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                               policy=WorkOrderPolicy("issuing"), audit=audit)  # fmt: skip
        async with service:
            responder = CmpResponder(service, journal, audit, labels, management_ca=management.certificate, ra=ra,
                                     settings=CmpSettings(max_message_bytes=65536))  # fmt: skip
            async with VaServer(make_cmp_app(responder), "127.0.0.1", 0) as http:
                yield Peer(
                    responder, service, journal, http.address[1], tmp_path, ra.certificate, downstream, creds
                )
