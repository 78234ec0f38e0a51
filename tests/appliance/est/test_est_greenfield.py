"""Greenfield over EST: a device presents its birth certificate (from a CA in the label's idevid_roots) as the TLS
client certificate and gets an operational certificate from the label's own issuing CA, for the device serial in
the birth certificate; judged by the same signer trust as the CMP greenfield label."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.config import EstLabelSection
from appliance.daemon import Daemon
from appliance.issuance.journal import Journal
from appliance.production import store
from appliance.production.allowlist import SerialRange
from appliance.production.model import WorkOrderSpec
from appliance.production.users import Role, User
from appliance.va.revocation import Reason, Source, revoke_in_transaction
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from tests.appliance.cmp.test_greenfield import LDEVID
from tests.appliance.est.support import Curl, est_config, openssl_csr, write_pem
from tests.appliance.test_daemon import _config

pytestmark = pytest.mark.skipif(
    shutil.which("openssl") is None or shutil.which("curl") is None, reason="openssl and curl needed"
)


OPERATIONAL = (
    "est-operational"  # not the CMP greenfield tests' CA: both make their CA key in the session's token
)


@pytest.fixture(scope="session")
def est_field_template(
    production_journal_template: Path, hsm_token: Token, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The production floor plus an operational issuing CA, an LDevID product and work order on line FIELD,
    where station field-1 (the greenfield label's) stands."""
    path = tmp_path_factory.mktemp("est-field") / "journal.sqlite"
    shutil.copy(production_journal_template, path)
    with Journal(path) as journal:
        audit = AuditLog(journal)
        admin = User("alice", Role.ADMINISTRATOR)
        ca_mod.create_issuing(
            journal, hsm_token, OPERATIONAL, "O=Birthline Test,CN=Test EST Operational CA", "root"
        )
        store.add_product(journal, audit, admin, "sensor-op", tenant="acme", profile=LDEVID, ca=OPERATIONAL)
        store.add_line(journal, audit, admin, "FIELD")
        journal.call(journal.transaction, lambda conn: conn.execute(
            "INSERT INTO stations (name, kind, key, created_at) VALUES ('field-1', 'lan', ?, ?)",
            (bytes(32), time.time())), "test station")  # fmt: skip
        store.assign_station(journal, audit, admin, "field-1", "FIELD")
        spec = WorkOrderSpec(
            "WO-FIELD", "sensor-op", 50, ("FIELD",), ranges=(SerialRange("SN-", 0, 9999, 4),)
        )
        store.add_work_order(journal, audit, admin, spec, activate=True)
    return path


@pytest.fixture
async def est(softhsm_token: SoftHsmToken, est_field_template: Path, tmp_path: Path) -> AsyncIterator[Daemon]:
    cfg = est_config(_config(tmp_path / "state", softhsm_token, est_field_template), tmp_path)
    cfg = dataclasses.replace(cfg, profiles={**cfg.profiles, LDEVID.name: LDEVID})
    roots = tmp_path / "idevid-roots.pem"
    # The anchor is the CA that issues birth certificates, not the root that also certifies the operational CA.
    with Journal(cfg.journal.path) as journal:
        write_pem(roots, ca_mod.load_ca(journal, "issuing").certificate)
    field = EstLabelSection(
        station="field-1", profile=LDEVID.name, issuing_ca=OPERATIONAL, idevid_roots=roots
    )
    cfg = dataclasses.replace(
        cfg, est=dataclasses.replace(cfg.est, labels={**cfg.est.labels, "field": field})
    )
    async with Daemon(cfg) as d:
        yield d


async def test_a_birth_certificate_enrols_for_an_operational_certificate(est: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    curl = Curl(est, work)
    birth_key, csr = openssl_csr(work, "birth", "/serialNumber=SN-0030")
    (birth,) = (await curl("simpleenroll", *curl.basic(), body=csr)).certificates()
    tls = ("--cert", str(write_pem(work / "birth.pem", birth)), "--key", str(birth_key))

    _, other = openssl_csr(work, "other", "/serialNumber=SN-0031")
    wrong_device = await curl("field/simpleenroll", *tls, body=other)
    assert wrong_device.status == 403 and "SN-0031" in wrong_device.text, wrong_device.text
    op_key, op_csr = openssl_csr(work, "op", "/serialNumber=SN-0030")
    assert est.control is not None
    events = est.control.hub.bus.subscribe()
    assert events is not None
    answer = await curl("field/simpleenroll", *tls, body=op_csr)
    assert answer.status == 200, answer.text
    (op,) = answer.certificates()
    assert est.core is not None
    assert op.issuer == ca_mod.load_ca(est.journal, OPERATIONAL).certificate.subject
    rows = {(r.ca, r.station) for r in est.journal.rows("device_serial=?", ("SN-0030",))}
    assert rows == {("issuing", "fixture-1"), (OPERATIONAL, "field-1")}
    # The operational CA's issuance is an event of the control API too.
    while (event := await asyncio.wait_for(events.next_event(), 30)) is not None and event[
        "type"
    ] != "issued":
        pass
    assert event is not None and event["station"] == "field-1" and event["front_end"] == "est"
    events.close()
    # The operational certificate is no birth certificate on this label.
    _, again = openssl_csr(work, "again", "/serialNumber=SN-0030")
    op_tls = ("--cert", str(write_pem(work / "op.pem", op)), "--key", str(op_key))
    refused = await curl("field/simpleenroll", *op_tls, body=again)
    assert refused.status == 403 and "renews itself at simplereenroll" in refused.text, refused.text
    # Nor does a birth certificate enrol on a label that does not trust birth certificates.
    assert (await curl("st/simpleenroll", *tls, body=again)).status == 403
    assert op.public_bytes(serialization.Encoding.DER) != birth.public_bytes(serialization.Encoding.DER)


async def test_a_revoked_birth_certificate_enrols_nothing(est: Daemon, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    curl = Curl(est, work)
    birth_key, csr = openssl_csr(work, "birth", "/serialNumber=SN-0032")
    (birth,) = (await curl("simpleenroll", *curl.basic(), body=csr)).certificates()
    assert est.core is not None
    audit = est.core.audit

    def revoke(conn: object) -> None:
        revoke_in_transaction(conn, audit, "sam", [(format(birth.serial_number, "x"), "issuing", "SN-0032")],  # type: ignore[arg-type]
                              Reason.KEY_COMPROMISE, Source.CLI, now=time.time())  # fmt: skip

    await est.journal.acall(est.journal.transaction, revoke, "test revoke")
    tls = ("--cert", str(write_pem(work / "birth.pem", birth)), "--key", str(birth_key))
    _, op_csr = openssl_csr(work, "op", "/serialNumber=SN-0032")
    refused = await curl("field/simpleenroll", *tls, body=op_csr)
    assert refused.status == 403 and "revoked" in refused.text, refused.text
    assert [r.ca for r in est.journal.rows("device_serial=?", ("SN-0032",))] == ["issuing"]
