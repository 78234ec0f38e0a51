"""Greenfield enrolment (issue 11 item 3; 3GPP TS 33.310 vendor-certificate enrolment): a device that already holds
its birth certificate (IDevID) - from this appliance, or from another vendor's CA - signs its ir with it and gets
an operational certificate (an LDevID profile, its own issuing CA) for the device serial in that birth
certificate, within a work order, through the one issuance core. The real `openssl cmp` client on 127.0.0.1."""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import time
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
from appliance.cmp.ra import ensure_ra
from appliance.cmp.server import CmpLabel, CmpResponder, make_cmp_app
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.production import store
from appliance.production.allowlist import SerialRange
from appliance.production.model import WorkOrderSpec
from appliance.production.policy import WorkOrderPolicy
from appliance.production.users import Role, User
from appliance.profiles import Profile, builtin_profiles
from appliance.va.http import VaServer
from appliance.va.revocation import Reason, Source, revoke_in_transaction
from hsm.token import Token
from tests.appliance.cmp.conformance.peer import SoftCa

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")

PEM = serialization.Encoding.PEM
OPERATIONAL = "gf-operational"
LDEVID = Profile(name="gf-ldevid", subject_o="Acme Operations", not_after=None, validity_days=365)


@pytest.fixture(scope="session")
def field_template(
    production_journal_template: Path, hsm_token: Token, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The production floor plus an operational issuing CA, an LDevID product and work order on line FIELD,
    where station field-1 (the greenfield label's) stands."""
    path = tmp_path_factory.mktemp("field") / "journal.sqlite"
    shutil.copy(production_journal_template, path)
    with Journal(path) as journal:
        audit = AuditLog(journal)
        admin = User("alice", Role.ADMINISTRATOR)
        ca_mod.create_issuing(
            journal, hsm_token, OPERATIONAL, "O=Birthline Test,CN=Test Operational CA", "root"
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


@dataclass
class Field:
    journal: Journal
    audit: AuditLog
    birth: IssueService
    responder: CmpResponder
    port: int
    tmp: Path
    ra_pem: Path
    vendor: SoftCa
    vendor_issuing: SoftCa
    chain: Path  # this appliance's issuing CA, for -extracerts

    async def openssl(self, *args: str | Path) -> tuple[int, str]:
        cmd = ["openssl", "cmp", "-config", "", "-server", f"127.0.0.1:{self.port}", "-path",
               ".well-known/cmp/p/field", "-srvcert", str(self.ra_pem), "-msg_timeout", "10",
               "-total_timeout", "30", *map(str, args)]  # fmt: skip
        proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        return int(proc.returncode or 0), out.decode() + err.decode()

    def write_key(self, name: str) -> tuple[ec.EllipticCurvePrivateKey, Path]:
        key = ec.generate_private_key(ec.SECP256R1())
        path = self.tmp / f"{name}.key"
        path.write_bytes(
            key.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
        return key, path

    def write_cert(self, name: str, *certs: x509.Certificate) -> Path:
        path = self.tmp / f"{name}.pem"
        path.write_bytes(b"".join(c.public_bytes(PEM) for c in certs))
        return path

    async def own_idevid(self, serial: str) -> tuple[Path, Path, x509.Certificate]:
        """A birth certificate from this appliance's production line (issuing CA "issuing")."""
        key, key_path = self.write_key(f"idevid-{serial}")
        spki = key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        result = await self.birth.issue(IssueRequest(serial, b"", "fixture-1", public_key_der=spki))
        cert = x509.load_der_x509_certificate(result.certificate)
        return self.write_cert(f"idevid-{serial}", cert), key_path, cert

    def vendor_idevid(self, serial: str) -> tuple[Path, Path, x509.Certificate]:
        """A birth certificate from another vendor's CA (root -> issuing -> device)."""
        key, key_path = self.write_key(f"vendor-{serial}")
        subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Other Vendor"),
                             x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])  # fmt: skip
        cert = self.vendor_issuing.issue(subject, key.public_key())
        return self.write_cert(f"vendor-{serial}", cert), key_path, cert

    def operational(self, serial: str) -> list[tuple[str, str, str]]:
        rows = self.journal.call(lambda: self.journal.conn.execute(
            "SELECT ca, station, state FROM issuance WHERE device_serial=? ORDER BY id", (serial,)).fetchall())  # fmt: skip
        return [tuple(map(str, r)) for r in rows]  # type: ignore[misc]


@pytest.fixture
async def field(field_template: Path, hsm_token: Token, tmp_path: Path) -> AsyncIterator[Field]:
    shutil.copy(field_template, tmp_path / "journal.sqlite")
    vendor = SoftCa("Other Vendor Root")
    vendor_issuing = SoftCa("Other Vendor Device CA", parent=vendor)
    with Journal(tmp_path / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        issuing = ca_mod.load_ca(journal, "issuing")
        operational = ca_mod.load_ca(journal, OPERATIONAL)
        management = ca_mod.load_ca(journal, "management")
        ra = ensure_ra(hsm_token, management, tmp_path / "ra.pem")
        root = ca_mod.load_ca(journal, "root").certificate
        label = CmpLabel("field", "field-1", LDEVID.name, issuing_ca=OPERATIONAL, idevid_roots=(root, vendor.cert),
                         crls=(vendor.crl(), vendor_issuing.crl()), crl_fetch=False)  # fmt: skip
        profiles = {**builtin_profiles(), LDEVID.name: LDEVID}
        birth = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), profiles,
                             policy=WorkOrderPolicy("issuing"), audit=audit)  # fmt: skip
        ops = IssueService(journal, operational, hsm_token.get_key(operational.key_label), profiles,
                           policy=WorkOrderPolicy(OPERATIONAL), audit=audit)  # fmt: skip
        async with birth, ops:
            responder = CmpResponder(birth, journal, audit, {"field": label}, management_ca=management.certificate,
                                     ra=ra, services={OPERATIONAL: ops})  # fmt: skip
            async with VaServer(make_cmp_app(responder), "127.0.0.1", 0) as http:
                f = Field(journal, audit, birth, responder, http.address[1], tmp_path, tmp_path / "ra.pem", vendor,
                          vendor_issuing, tmp_path / "issuing.pem")  # fmt: skip
                f.write_cert("issuing", issuing.certificate)
                yield f


async def test_a_device_with_this_appliances_birth_certificate_gets_its_operational_certificate(
    field: Field,
) -> None:
    idevid, idevid_key, birth = await field.own_idevid("SN-0001")
    _, op_key = field.write_key("op-SN-0001")
    rc, said = await field.openssl("-cmd", "ir", "-cert", idevid, "-key", idevid_key, "-extracerts", field.chain,
                                   "-newkey", op_key, "-subject", "/serialNumber=SN-0001",
                                   "-certout", field.tmp / "op.pem")  # fmt: skip
    assert rc == 0, said
    op = x509.load_pem_x509_certificate((field.tmp / "op.pem").read_bytes())
    assert op.issuer.rfc4514_string() == "O=Birthline Test,CN=Test Operational CA"
    assert op.subject.rfc4514_string() == "2.5.4.5=SN-0001,O=Acme Operations"
    assert op.not_valid_after_utc.year < 9999 and op.public_key() != birth.public_key()
    assert field.operational("SN-0001") == [
        ("issuing", "fixture-1", "issued"),
        (OPERATIONAL, "field-1", "confirmed"),
    ]
    consumed = field.journal.call(lambda: field.journal.conn.execute(
        "SELECT consumed FROM work_order WHERE id='WO-FIELD'").fetchone()[0])  # fmt: skip
    assert consumed == 1
    events = [e.event for e in field.audit.entries()]
    assert events.count("issuance.intent") == 2 and "issuance.confirmed" in events


async def test_a_device_with_another_vendors_birth_certificate(field: Field) -> None:
    idevid, idevid_key, _ = field.vendor_idevid("SN-0002")
    vendor_chain = field.write_cert("vendor-chain", field.vendor_issuing.cert)
    _, op_key = field.write_key("op-SN-0002")
    rc, said = await field.openssl("-cmd", "ir", "-cert", idevid, "-key", idevid_key, "-extracerts", vendor_chain,
                                   "-newkey", op_key, "-subject", "/serialNumber=SN-0002",
                                   "-certout", field.tmp / "op.pem")  # fmt: skip
    assert rc == 0, said
    assert field.operational("SN-0002") == [(OPERATIONAL, "field-1", "confirmed")]


async def test_refusals(field: Field) -> None:
    # a birth certificate revoked here signs nothing
    idevid, idevid_key, birth = await field.own_idevid("SN-0003")

    def revoke(conn: object) -> None:
        revoke_in_transaction(conn, field.audit, "sam", [(format(birth.serial_number, "x"), "issuing", "SN-0003")],  # type: ignore[arg-type]
                              Reason.KEY_COMPROMISE, Source.CLI, now=time.time())  # fmt: skip

    field.journal.call(field.journal.transaction, revoke, "test revoke")

    def args() -> list[str | Path]:
        return ["-newkey", field.write_key("op")[1], "-certout", field.tmp / "op.pem"]

    rc, said = await field.openssl("-cmd", "ir", "-cert", idevid, "-key", idevid_key, "-extracerts", field.chain,
                                   "-subject", "/serialNumber=SN-0003", *args())  # fmt: skip
    assert rc != 0 and "certRevoked" in said, said
    # one revoked by its vendor's CRL
    videvid, vkey, vcert = field.vendor_idevid("SN-0004")
    chain = field.write_cert("vendor-chain", field.vendor_issuing.cert)
    label = field.responder.labels["field"]
    crls = (field.vendor.crl(), field.vendor_issuing.crl([vcert.serial_number]))
    field.responder.labels["field"] = dataclasses.replace(label, crls=crls)
    rc, said = await field.openssl("-cmd", "ir", "-cert", videvid, "-key", vkey, "-extracerts", chain,
                                   "-subject", "/serialNumber=SN-0004", *args())  # fmt: skip
    assert rc != 0 and "certRevoked" in said, said
    # without a current CRL of the vendor's CA its devices' status is unknown: refused, until the label opts out
    field.responder.labels["field"] = dataclasses.replace(label, crls=())
    videvid8, vkey8, _ = field.vendor_idevid("SN-0008")
    rc, said = await field.openssl("-cmd", "ir", "-cert", videvid8, "-key", vkey8, "-extracerts", chain,
                                   "-subject", "/serialNumber=SN-0008", *args())  # fmt: skip
    assert rc != 0 and "signerNotTrusted" in said, said
    field.responder.labels["field"] = dataclasses.replace(label, crls=(), signer_revocation="none")
    rc, said = await field.openssl("-cmd", "ir", "-cert", videvid8, "-key", vkey8, "-extracerts", chain,
                                   "-subject", "/serialNumber=SN-0008", *args())  # fmt: skip
    assert rc == 0, said
    field.responder.labels["field"] = label
    # the device asks for another serial than its birth certificate's
    idevid5, key5, _ = await field.own_idevid("SN-0005")
    rc, said = await field.openssl("-cmd", "ir", "-cert", idevid5, "-key", key5, "-extracerts", field.chain,
                                   "-subject", "/serialNumber=SN-0006", *args())  # fmt: skip
    assert rc != 0 and "badCertTemplate" in said, said
    # a device of the vendor outside the work order's allowlist
    videvid, vkey, _ = field.vendor_idevid("XX-0007")
    rc, said = await field.openssl("-cmd", "ir", "-cert", videvid, "-key", vkey, "-extracerts", chain,
                                   "-subject", "/serialNumber=XX-0007", *args())  # fmt: skip
    assert rc != 0 and "notAuthorized" in said, said
    assert [r for r in field.operational("SN-0003") if r[0] == OPERATIONAL] == []
    assert field.operational("SN-0006") == [] and field.operational("XX-0007") == []
    assert field.operational("SN-0004") == []


async def _operational(field: Field, serial: str) -> tuple[Path, Path, Path]:
    """A device with a birth certificate of this appliance enrolled on the greenfield label: its operational
    certificate, that certificate's key, and the operational CA's certificate (the chain it sends)."""
    idevid, idevid_key, _ = await field.own_idevid(serial)
    _, op_key = field.write_key(f"op-{serial}")
    op = field.tmp / f"op-{serial}.pem"
    rc, said = await field.openssl("-cmd", "ir", "-cert", idevid, "-key", idevid_key, "-extracerts", field.chain,
                                   "-newkey", op_key, "-subject", f"/serialNumber={serial}", "-certout", op)  # fmt: skip
    assert rc == 0, said
    op_ca = field.write_cert("operational-ca", ca_mod.load_ca(field.journal, OPERATIONAL).certificate)
    return op, op_key, op_ca


async def test_an_operational_certificate_updates_its_key_and_revokes_itself_on_the_greenfield_label(
    field: Field,
) -> None:
    """Review finding 1: the greenfield label trusts the birth certificates' root (idevid_roots), which also
    certifies the operational CA; a kur and an rr signed by an operational certificate that sends its chain (as
    `-extracerts` does, RFC 9483 3.3) are the certificate acting on itself, whatever else its chain reaches."""
    op, op_key, op_ca = await _operational(field, "SN-0020")
    _, new_key = field.write_key("op2-SN-0020")
    updated = field.tmp / "op2.pem"
    rc, said = await field.openssl("-cmd", "kur", "-cert", op, "-key", op_key, "-oldcert", op, "-extracerts", op_ca,
                                   "-newkey", new_key, "-certout", updated)  # fmt: skip
    assert rc == 0, said
    assert [r[0] for r in field.operational("SN-0020")] == ["issuing", OPERATIONAL, OPERATIONAL]
    rc, said = await field.openssl("-cmd", "rr", "-cert", updated, "-key", new_key, "-oldcert", updated,
                                   "-extracerts", op_ca, "-revreason", "1")  # fmt: skip
    assert rc == 0, said
    serial = format(x509.load_pem_x509_certificate(updated.read_bytes()).serial_number, "x")
    reason = field.journal.call(lambda: field.journal.conn.execute(
        "SELECT reason FROM revocation WHERE cert_serial=?", (serial,)).fetchone())  # fmt: skip
    assert reason is not None and reason[0] == "keyCompromise"


async def test_an_operational_certificate_is_not_a_birth_certificate(field: Field) -> None:
    """Review finding 3: an ir signed by a certificate this label itself issued (an operational certificate,
    under the same root as the birth certificates) is refused as a signer, with a text that says why; it is not
    taken for a birth certificate and refused later as a duplicate."""
    op, op_key, op_ca = await _operational(field, "SN-0021")
    rc, said = await field.openssl("-cmd", "ir", "-cert", op, "-key", op_key, "-extracerts", op_ca,
                                   "-newkey", field.write_key("op3")[1], "-subject", "/serialNumber=SN-0021",
                                   "-certout", field.tmp / "op3.pem")  # fmt: skip
    assert rc != 0 and "signerNotTrusted" in said and "not a birth certificate" in said, said
    assert [r[0] for r in field.operational("SN-0021")] == ["issuing", OPERATIONAL]
