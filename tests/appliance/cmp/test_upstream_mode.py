"""RA mode (a product in `upstream` issuance mode): the work-order policy authorises here, the upstream CA (a
second Birthline instance on 127.0.0.1) issues, the station is told "pending" until the forwarder has stored
the upstream's certificate. Real SoftHSM token, journals, work-order policy and CMP over HTTP on both sides."""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import hashlib
import io
import shutil
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.audit.verify import verify
from appliance.cmp.forwarder import Forwarder, queue_status
from appliance.cmp.protection import SignatureProtector
from appliance.cmp.ra import ensure_ra
from appliance.cmp.server import CmpLabel, CmpResponder, make_cmp_app
from appliance.config import UpstreamSection
from appliance.daemon_enroller import CoreEnroller
from appliance.der import split_certificates
from appliance.errors import IssuancePending, IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.production import reconcile, store
from appliance.production.model import ProductionError
from appliance.production.policy import WorkOrderPolicy
from appliance.production.users import Role, User
from appliance.profiles import builtin_profiles
from appliance.va.http import VaServer
from hsm.token import Token
from stations.codes import Code
from stations.errors import StationError
from stations.server import EnrollPending
from tests.appliance.cmp.support import make_cert
from tests.appliance.cmp.upstream_support import SPKI, Local, Upstream, device_csr

DER = serialization.Encoding.DER
SECRET = b"ra mode label secret"
ALICE = User("alice", Role.ADMINISTRATOR)


@dataclass
class Ra:
    journal: Journal
    service: IssueService
    ra: SignatureProtector
    audit: AuditLog
    tmp: Path

    def consumed(self) -> int:
        return int(self.journal.call(lambda: self.journal.conn.execute(
            "SELECT consumed FROM work_order WHERE id='WO-1'").fetchone()[0]))  # fmt: skip

    def requests(self) -> list[tuple[object, ...]]:
        return self.journal.call(lambda: self.journal.conn.execute(
            "SELECT id, state, device_serial, cert_der, chain_der, failure FROM ra_request ORDER BY id").fetchall())  # fmt: skip


@pytest.fixture
async def ra(production_journal_template: Path, hsm_token: Token, tmp_path: Path) -> AsyncIterator[Ra]:
    home = tmp_path / "ra-mode"  # apart from the `local` and `upstream` fixtures' files in tmp_path
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


def audit_events(journal: Journal) -> list[str]:
    return [
        str(r[0]) for r in journal.call(lambda: journal.conn.execute("SELECT event FROM audit").fetchall())
    ]


def forwarder(ra: Ra, up: Upstream, **kw: object) -> Forwarder:
    s = UpstreamSection(url=up.url, mode="batched", batch_max=10, batch_wait_s=0, backoff_base_s=0.2,
                        backoff_cap_s=1, request_timeout_s=10, poll_s=0.1)  # fmt: skip
    anchors = kw.pop("ca_certs", None)
    s = dataclasses.replace(s, **kw)  # type: ignore[arg-type]
    if anchors is None:
        anchors = (upstream_root(up),)
    return Forwarder(ra.journal, s, ra.ra, server_certs=(up.ra.certificate,), audit=ra.audit,
                     ca_certs=anchors)  # type: ignore[arg-type]  # fmt: skip


def upstream_root(up: Upstream) -> x509.Certificate:
    root = ca_mod.load_ca(up.journal, "root").certificate
    assert root is not None
    return root


async def drain(ra: Ra, up: Upstream, **kw: object) -> Forwarder:
    fwd = forwarder(ra, up, **kw)
    try:
        await fwd.drain(timeout_s=30)
    finally:
        await fwd.close()
    return fwd


async def test_pending_then_the_upstream_certificate_then_confirmed(ra: Ra, upstream: Upstream) -> None:
    key, csr = device_csr("SN-0001")
    request = IssueRequest("SN-0001", csr, "fixture-1", "req-1")
    with pytest.raises(IssuancePending) as first:
        await ra.service.issue(request)
    assert first.value.retry_after_s == 1.0
    # Authorised and counted here; nothing signed locally; the request queued with its outbox row.
    assert ra.consumed() == 1
    assert ra.journal.rows() == []
    rows = ra.requests()
    assert [(r[1], r[2]) for r in rows] == [("pending", "SN-0001")]
    ob = ra.journal.call(lambda: ra.journal.conn.execute(
        "SELECT kind, ra_request_id, csr_der, state FROM outbox").fetchall())  # fmt: skip
    assert [(k, i, bytes(c), s) for k, i, c, s in ob] == [("p10cr", rows[0][0], csr, "queued")]
    # Asking again (the station's poll) changes nothing and takes no second unit.
    with pytest.raises(IssuancePending) as again:
        await ra.service.issue(request)
    assert again.value.request == first.value.request and ra.consumed() == 1
    status = queue_status(ra.journal, UpstreamSection(url=upstream.url))
    assert status["ra_requests"] == {"pending": 1} and status["open"] == 1

    fwd = await drain(ra, upstream)
    assert fwd.stats["done"] == 1
    (row,) = ra.requests()
    assert row[1] == "issued"
    cert = x509.load_der_x509_certificate(bytes(row[3]))  # type: ignore[arg-type]
    up_issuing = ca_mod.load_ca(upstream.journal, "issuing").certificate
    assert cert.public_key().public_bytes(*SPKI) == key.public_key().public_bytes(*SPKI)
    assert cert.issuer == up_issuing.subject
    cert.verify_directly_issued_by(up_issuing)
    # The upstream issued it once, for this device.
    assert [s for _, s in upstream.issued()] == ["SN-0001"]

    result = await ra.service.issue(request)
    assert result.upstream and result.reused and result.certificate == cert.public_bytes(DER)
    assert result.chain[0] == up_issuing.public_bytes(DER)  # the chain from the upstream's extraCerts
    await ra.service.confirm_upstream(result.issuance_id, hashlib.sha256(result.certificate).digest())
    assert ra.requests()[0][1] == "confirmed"
    status = queue_status(ra.journal, UpstreamSection(url=upstream.url))
    assert status["ra_requests"] == {"confirmed": 1} and status["open"] == 0
    events = audit_events(ra.journal)
    for event in ("issuance.forwarded", "issuance.upstream-issued", "issuance.confirmed"):
        assert event in events
    assert verify(ra.journal).ok


async def test_crmf_request_goes_upstream_as_cr_with_the_built_subject(ra: Ra, upstream: Upstream) -> None:
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*SPKI)
    with pytest.raises(IssuancePending):
        await ra.service.issue(IssueRequest("SN-0002", b"", "fixture-1", public_key_der=key))
    await drain(ra, upstream)
    (row,) = ra.requests()
    cert = x509.load_der_x509_certificate(bytes(row[3]))  # type: ignore[arg-type]
    assert cert.public_key().public_bytes(*SPKI) == key
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0002"


async def test_conflicts_and_no_upstream(ra: Ra, upstream: Upstream, hsm_token: Token) -> None:
    _, csr = device_csr("SN-0003")
    with pytest.raises(IssuancePending):
        await ra.service.issue(IssueRequest("SN-0003", csr, "fixture-1"))
    _, other = device_csr("SN-0003")
    with pytest.raises(IssuanceRefused) as exc:
        await ra.service.issue(IssueRequest("SN-0003", other, "fixture-1"))
    assert exc.value.code is ReasonCode.DEVICE_ALREADY_ISSUED
    with pytest.raises(IssuanceRefused) as exc:
        await ra.service.issue(IssueRequest("SN-0004", csr, "fixture-1"))
    assert exc.value.code is ReasonCode.KEY_ALREADY_CERTIFIED
    assert ra.consumed() == 1

    # The same product on an appliance without an upstream: refused, nothing recorded, no unit taken.
    issuing = ca_mod.load_ca(ra.journal, "issuing")
    bare = IssueService(ra.journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                        policy=WorkOrderPolicy("issuing"), audit=ra.audit)  # fmt: skip
    async with bare:
        with pytest.raises(IssuanceRefused) as exc:
            await bare.issue(IssueRequest("SN-0005", device_csr("SN-0005")[1], "fixture-1"))
    assert exc.value.code is ReasonCode.UNKNOWN_PROFILE and "no upstream CA" in exc.value.message
    assert len(ra.requests()) == 1 and ra.consumed() == 1


async def test_an_upstream_rejection_is_final_for_the_key_and_gives_the_unit_back(
    ra: Ra, upstream: Upstream
) -> None:
    # The upstream's own work order does not allow this serial: it refuses (notAuthorized), for good.
    _, csr = device_csr("XX-0001")

    def allow_here(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE work_order SET pattern='(SN|XX)-[A-Z0-9-]+' WHERE id='WO-1'")

    ra.journal.call(ra.journal.transaction, allow_here, "test: widen the local allowlist")
    with pytest.raises(IssuancePending):
        await ra.service.issue(IssueRequest("XX-0001", csr, "fixture-1"))
    assert ra.consumed() == 1
    fwd = await drain(ra, upstream)
    assert fwd.stats["failed"] == 1
    (row,) = ra.requests()
    assert row[1] == "failed" and "allowlist" in str(row[5])
    assert ra.consumed() == 0  # the unit is given back: nothing was issued
    with pytest.raises(IssuanceRefused) as exc:
        await ra.service.issue(IssueRequest("XX-0001", csr, "fixture-1"))
    assert exc.value.code is ReasonCode.UPSTREAM_REJECTED
    # A new key for the device is a new request (and takes a unit again).
    with pytest.raises(IssuancePending):
        await ra.service.issue(IssueRequest("XX-0001", device_csr("XX-0001")[1], "fixture-1"))
    assert ra.consumed() == 1 and [r[1] for r in ra.requests()] == ["failed", "pending"]
    assert "issuance.upstream-refused" in audit_events(ra.journal)


async def test_a_station_is_told_pending_then_gets_and_confirms_the_chain(ra: Ra, upstream: Upstream) -> None:
    enroller = CoreEnroller(ra.service, ra.journal)
    _, csr = device_csr("SN-0006")
    rid = bytes(range(1, 17))
    with pytest.raises(EnrollPending) as pending:
        await enroller.enroll("fixture-1", rid, "SN-0006", csr, None)
    assert pending.value.retry_after_ms == 1000
    with pytest.raises(StationError) as early:
        await enroller.confirm("fixture-1", rid, bytes(32))
    assert early.value.code is Code.UNKNOWN_REQUEST
    await drain(ra, upstream)
    chain = await enroller.enroll("fixture-1", rid, "SN-0006", csr, None)
    up_issuing = ca_mod.load_ca(upstream.journal, "issuing").certificate
    assert len(chain) >= 2 and chain[1] == up_issuing.public_bytes(DER)
    with pytest.raises(StationError) as wrong:
        await enroller.confirm("fixture-1", rid, bytes(32))
    assert wrong.value.code is Code.CONFIRM_MISMATCH
    await enroller.confirm("fixture-1", rid, hashlib.sha256(chain[0]).digest())
    assert ra.requests()[0][1] == "confirmed"
    # A retry under a new request id is answered from the same request and can confirm too.
    rid2 = bytes(range(2, 18))
    assert (await enroller.enroll("fixture-1", rid2, "SN-0006", csr, None))[0] == chain[0]
    await enroller.confirm("fixture-1", rid2, hashlib.sha256(chain[0]).digest())


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_openssl_cmp_client_polls_until_the_upstream_has_issued(ra: Ra, upstream: Upstream) -> None:
    """openssl cmp (ir, MAC) against this appliance's CMP server in RA mode: ip "waiting", pollReq / pollRep
    while the daemon-style forwarder (its polling loop) takes the request upstream, then the certificate."""
    issuing = ca_mod.load_ca(ra.journal, "issuing")
    management = ca_mod.load_ca(ra.journal, "management")
    label = CmpLabel("line1", "fixture-1", secret=SECRET)
    responder = CmpResponder(ra.service, ra.journal, ra.audit, {"line1": label},
                             management_ca=management.certificate, ra=ra.ra)  # fmt: skip
    assert issuing.certificate is not None
    key = ec.generate_private_key(ec.SECP256R1())
    (ra.tmp / "dev.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))  # fmt: skip
    fwd = forwarder(ra, upstream, batch_wait_s=1.5)
    async with VaServer(make_cmp_app(responder), "127.0.0.1", 0) as http, fwd:
        cmd = ["openssl", "cmp", "-config", "", "-server", f"127.0.0.1:{http.address[1]}", "-path",
               ".well-known/cmp/p/line1", "-msg_timeout", "10", "-total_timeout", "40", "-cmd", "ir", "-ref", "line1",
               "-secret", f"pass:{SECRET.decode()}", "-mac", "hmacWithSHA256", "-recipient", "/CN=Birthline",
               "-newkey", str(ra.tmp / "dev.key"), "-subject", "/serialNumber=SN-0007",
               "-certout", str(ra.tmp / "out.pem"), "-extracertsout", str(ra.tmp / "extra.pem")]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    said = (out + err).decode()
    assert proc.returncode == 0, said
    cert = x509.load_pem_x509_certificate((ra.tmp / "out.pem").read_bytes())
    assert cert.public_key().public_bytes(*SPKI) == key.public_key().public_bytes(*SPKI)
    up_issuing = ca_mod.load_ca(upstream.journal, "issuing").certificate
    assert cert.issuer == up_issuing.subject  # the upstream CA's certificate, not this appliance's
    extra = x509.load_pem_x509_certificates((ra.tmp / "extra.pem").read_bytes())
    assert up_issuing in extra
    assert ra.requests()[0][1] == "confirmed" and not responder.pending
    assert responder.stats["issued"] == 1
    assert (
        responder.stats["requests"] >= 4
    )  # ir, at least one pollReq answered by pollRep, the final one, certConf


async def test_an_upstream_certificate_is_released_only_if_it_chains_to_a_configured_ca(
    ra: Ra, upstream: Upstream
) -> None:
    """The reply cannot choose the trust anchor: without [upstream] ca_certs, or with another CA there, the
    device stays pending and the record is retried; with the upstream's root it is released."""
    _, csr = device_csr("SN-0008")
    with pytest.raises(IssuancePending):
        await ra.service.issue(IssueRequest("SN-0008", csr, "fixture-1"))
    # Another root with the upstream root's very name (both test appliances share one CA hierarchy): the subject
    # matches, the signature does not.
    other_key = ec.generate_private_key(ec.SECP256R1())
    stranger = make_cert(upstream_root(upstream).subject, other_key.public_key(), other_key, ca=True)
    for anchors, why in (((), "needs [upstream] ca_certs"), ((stranger,), "does not chain")):
        fwd = forwarder(ra, upstream, ca_certs=anchors)
        try:
            await fwd.run_pass(force=True)
        finally:
            await fwd.close()
        assert fwd.stats["retried"] == 1 and fwd.stats["done"] == 0
        (row,) = ra.requests()
        assert row[1] == "pending"
        err = ra.journal.call(lambda: ra.journal.conn.execute("SELECT last_error FROM outbox").fetchone()[0])
        assert why in err
        ra.journal.call(
            ra.journal.transaction, lambda c: c.execute("UPDATE outbox SET next_attempt_at=0"), "t"
        )
    await drain(ra, upstream)
    (row,) = ra.requests()
    assert row[1] == "issued"
    chain = [x509.load_der_x509_certificate(c) for c in split_certificates(bytes(row[4]))]  # type: ignore[arg-type]
    assert chain[-1] == upstream_root(upstream)
    # The same device was issued once upstream, however often the record was sent.
    assert [s for _, s in upstream.issued()] == ["SN-0008"]


async def test_rework_and_scrap_of_an_ra_mode_device_are_refused_with_the_reason(ra: Ra) -> None:
    _, csr = device_csr("SN-0009")
    with pytest.raises(IssuancePending):
        await ra.service.issue(IssueRequest("SN-0009", csr, "fixture-1"))
    supervisor = User("sam", Role.SUPERVISOR)
    for change in (store.rework, store.scrap):
        with pytest.raises(ProductionError, match=r"RA mode.*upstream CA"):
            change(ra.journal, ra.audit, supervisor, "SN-0009", reason="test", ca="issuing")
    assert [r[1] for r in ra.requests()] == ["pending"]


async def test_three_tiers_a_downstream_batch_waits_and_polls_through_an_ra_mode_appliance(
    ra: Ra, upstream: Upstream, local: Local
) -> None:
    """A (local issuance) forwards batched to B (this fixture, RA mode), which forwards batched to C (the
    upstream fixture). B answers A's nested requests "waiting"; A polls in nested pollReqs until B's own
    forwarder has C's certificates; then A confirms through B. Each device is issued once at C."""
    management = ca_mod.load_ca(ra.journal, "management").certificate
    assert management is not None
    label = CmpLabel(
        "ra",
        "fixture-1",
        trusted_cas=(management,),
        allow_nested=True,
        accept_ra_verified=True,
        signer_revocation="none",
    )
    responder = CmpResponder(
        ra.service, ra.journal, ra.audit, {"ra": label}, management_ca=management, ra=ra.ra
    )
    serials = [f"SN-00{i:02d}" for i in range(20, 26)]
    keys = {}
    for s in serials:
        key, csr = device_csr(s)
        await local.service.issue(IssueRequest(s, csr, "fixture-1"))
        keys[s] = key.public_key().public_bytes(*SPKI)
    async with (
        VaServer(make_cmp_app(responder), "127.0.0.1", 0) as b_http,
        forwarder(ra, upstream, poll_s=0.1),
    ):
        a_settings = UpstreamSection(url=f"http://127.0.0.1:{b_http.address[1]}/.well-known/cmp/p/ra",
                                     mode="batched", batch_max=10, batch_wait_s=0, backoff_base_s=0.2,
                                     backoff_cap_s=1, request_timeout_s=10)  # fmt: skip
        a = Forwarder(local.journal, a_settings, local.ra, server_certs=(ra.ra.certificate,))
        try:
            assert await a.drain(timeout_s=60)
        finally:
            await a.close()
    rows = local.journal.call(lambda: local.journal.conn.execute(
        "SELECT o.state, o.upstream_cert_der, i.device_serial FROM outbox o JOIN issuance i ON i.id = o.issuance_id"
    ).fetchall())  # fmt: skip
    assert len(rows) == 6 and {r[0] for r in rows} == {"done"}
    up_issuing = ca_mod.load_ca(upstream.journal, "issuing").certificate
    for _, der, device in rows:
        cert = x509.load_der_x509_certificate(bytes(der))
        assert cert.public_key().public_bytes(*SPKI) == keys[device]
        cert.verify_directly_issued_by(up_issuing)  # C's certificate, relayed by B
    assert sorted(s for _, s in upstream.issued()) == serials  # once each at C
    assert {r[1] for r in ra.requests()} == {"confirmed"}  # A's certConfs reached B's RA-mode requests
    assert responder.stats["errors"] == 0


async def test_reconciliation_counts_ra_mode_units(ra: Ra, upstream: Upstream) -> None:
    """Report, quota check and export see RA-mode devices: pending ones as pending, issued ones as certified
    (issued_by upstream), an upstream refusal as a unit given back."""

    def allow_xx(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE work_order SET pattern='(SN|XX)-[A-Z0-9-]+' WHERE id='WO-1'")

    ra.journal.call(ra.journal.transaction, allow_xx, "test: widen the local allowlist")
    for serial in ("SN-0030", "SN-0031", "XX-0032"):  # XX- is refused by the upstream's own work order
        with pytest.raises(IssuancePending):
            await ra.service.issue(IssueRequest(serial, device_csr(serial)[1], "fixture-1"))
    rep = reconcile.report(ra.journal, "WO-1")
    assert (rep.upstream_pending, rep.issued, rep.quota_used, rep.consistent) == (3, 0, 3, True)
    assert reconcile.quota_problems(ra.journal) == []
    await drain(ra, upstream)
    rep = reconcile.report(ra.journal, "WO-1")
    assert (rep.upstream_pending, rep.issued, rep.pending_confirmation, rep.quota_used) == (0, 2, 2, 2)
    assert rep.consistent and reconcile.quota_problems(ra.journal) == []
    certs = reconcile.certificates(ra.journal, "WO-1")
    table = list(csv.DictReader(io.StringIO(reconcile.export_csv(certs))))
    assert [(t["device_serial"], t["issued_by"], t["state"]) for t in table] == [
        ("SN-0030", "upstream", "issued"), ("SN-0031", "upstream", "issued")]  # fmt: skip
    up_issuing = ca_mod.load_ca(upstream.journal, "issuing").certificate
    for c in x509.load_pem_x509_certificates(reconcile.export_pem(certs)):
        assert c.issuer == up_issuing.subject


async def test_a_wrong_poll_req_leaves_the_device_its_waiting_transaction(ra: Ra) -> None:
    """Review finding 4: a pollReq naming another certReqId (0 after a p10cr, which has -1) is answered with an
    error (badCertId) and the transaction stays open: the corrected pollReq is answered (pollRep, the upstream
    has not issued yet: no forwarder runs here), not refused as belonging to no transaction."""
    from appliance.cmp import (
        BodyType,
        ErrorBody,
        FailInfo,
        MacProtector,
        P10crBody,
        PollReqBody,
        build_message,
    )
    from appliance.cmp.header import follow_up_header, request_header
    from appliance.cmp.parse import parse_message

    management = ca_mod.load_ca(ra.journal, "management")
    responder = CmpResponder(ra.service, ra.journal, ra.audit, {"line1": CmpLabel("line1", "fixture-1", secret=SECRET)},
                             management_ca=management.certificate, ra=ra.ra)  # fmt: skip
    mac = MacProtector(SECRET, b"line1", iterations=1000)
    me = x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0010")]))
    csr = x509.load_der_x509_csr(device_csr("SN-0010")[1])
    p10cr = build_message(
        request_header(sender=me, recipient=me), BodyType.P10CR, P10crBody(csr), protection=mac
    )
    waiting = parse_message((await responder.handle("line1", p10cr.der))[1])
    assert waiting.body_type is BodyType.CP

    async def poll(after: object, cert_req_id: int) -> object:
        msg = build_message(follow_up_header(after.header, sender=me), BodyType.POLLREQ,  # type: ignore[attr-defined]
                            PollReqBody((cert_req_id,)), protection=mac)  # fmt: skip
        return parse_message((await responder.handle("line1", msg.der))[1])

    wrong = await poll(waiting, 0)
    assert isinstance(wrong.body, ErrorBody) and wrong.body.status.fail_info == {FailInfo.BAD_CERT_ID}  # type: ignore[attr-defined]
    right = await poll(wrong, -1)  # recipNonce: the error's senderNonce, the last message of the transaction
    assert right.body_type is BodyType.POLLREP, right  # type: ignore[attr-defined]
