"""Report and export numbers against the journal rows."""

from __future__ import annotations

import csv
import hashlib
import io
import subprocess

from cryptography import x509

from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.production import reconcile, store
from appliance.va.revocation import Reason, revoke
from tests.appliance.conftest import make_csr
from tests.appliance.production.conftest import Floor


async def test_report_and_export_match_the_journal(floor: Floor, service: IssueService) -> None:
    floor.work_order(quantity=10)
    results = [
        await service.issue(IssueRequest(f"SN-{i:04d}", make_csr()[1], station="st1")) for i in range(6)
    ]
    for r in results[:3]:
        await service.confirm(r.cert_serial)
    store.scrap(floor.journal, floor.audit, floor.supervisor, "SN-0003", "cracked", ca="issuing")
    store.rework(floor.journal, floor.audit, floor.supervisor, "SN-0004", "new key", ca="issuing")
    rework = await service.issue(IssueRequest("SN-0004", make_csr()[1], station="st1"))
    await service.issue(IssueRequest("SN-0006", make_csr()[1], station="st1"))

    rep = reconcile.report(floor.journal, "WO-1")
    assert rep.planned == 10 and rep.issued == 7 and rep.quota_used == 7 and rep.remaining == 3
    assert (rep.confirmed, rep.pending_confirmation, rep.scrapped, rep.reworked) == (3, 3, 1, 1)
    assert rep.in_progress == 0 and rep.consistent
    rows = floor.journal.rows()
    by_state = {s: sum(r.state == s for r in rows) for s in ("confirmed", "issued", "scrapped", "reworked")}
    assert by_state == {"confirmed": 3, "issued": 3, "scrapped": 1, "reworked": 1}

    certs = reconcile.certificates(floor.journal, "WO-1")
    table = list(csv.DictReader(io.StringIO(reconcile.export_csv(certs))))
    assert len(table) == len(rows) == 8
    for line, row in zip(table, rows, strict=True):
        assert row.cert_der is not None
        # The serial as openssl prints it (whole bytes, a leading zero kept), the certificate's own.
        shown = subprocess.run(["openssl", "x509", "-inform", "DER", "-noout", "-serial"], input=row.cert_der,
                               capture_output=True, check=True, timeout=60).stdout.decode().strip()  # fmt: skip
        assert shown == f"serial={line['certificate_serial']}" and line["device_serial"] == row.device_serial
        assert int(line["certificate_serial"], 16) == int(row.cert_serial, 16)
        assert line["sha256_fingerprint"] == hashlib.sha256(row.cert_der).hexdigest()
        assert line["station"] == "st1" and line["state"] == row.state and line["issued_at"].endswith("Z")
        assert bool(line["confirmed_at"]) == (row.confirmed_at is not None)
        # Scrap and rework revoke (journal triggers): the export says with which reason and when.
        revoked = {"scrapped": "cessationOfOperation", "reworked": "superseded"}.get(row.state, "")
        assert line["revocation_reason"] == revoked and bool(line["revoked_at"]) == bool(revoked)
    pem = x509.load_pem_x509_certificates(reconcile.export_pem(certs))
    good = [r.cert_serial for r in rows if r.state in ("issued", "confirmed")]
    assert [format(c.serial_number, "x") for c in pem] == good and len(good) == 6
    assert rework.cert_serial in {t["certificate_serial"].lower().lstrip("0") for t in table}


async def test_a_revoked_certificate_is_never_reported_or_exported_as_good(
    floor: Floor, service: IssueService
) -> None:
    """Issue 17 item 4: OCSP and the CRL said revoked while the CSV said "confirmed", the PEM list held it and
    the report counted no revocation."""
    floor.work_order(quantity=10)
    results = [
        await service.issue(IssueRequest(f"SN-{i:04d}", make_csr()[1], station="st1")) for i in range(4)
    ]
    for r in results:
        await service.confirm(r.cert_serial)
    compromised, withdrawn = results[1], results[2]
    revoke(floor.journal, floor.audit, floor.supervisor, device_serial=compromised.device_serial,
           reason=Reason.KEY_COMPROMISE)  # fmt: skip
    revoke(floor.journal, floor.audit, floor.supervisor, cert_serial=withdrawn.cert_serial,
           reason=Reason.PRIVILEGE_WITHDRAWN)  # fmt: skip
    store.scrap(floor.journal, floor.audit, floor.supervisor, "SN-0003", "cracked", ca="issuing")

    rep = reconcile.report(floor.journal, "WO-1")
    # Review finding 9: the report said "confirmed 3" beside the CSV's one confirmed row (docs/production.md:
    # confirmed counts current certificates); a revoked one is counted as revoked only.
    assert rep.revoked == 3 and rep.confirmed == 1 and rep.pending_confirmation == 0 and rep.scrapped == 1
    assert rep.issued == 4
    assert rep.revoked_by_reason == {"cessationOfOperation": 1, "keyCompromise": 1, "privilegeWithdrawn": 1}
    assert rep.last_revoked_at is not None and rep.last_revoked_at.endswith("Z")

    table = {row["device_serial"]: row for row in csv.DictReader(io.StringIO(
        reconcile.export_csv(reconcile.certificates(floor.journal, "WO-1"))))}  # fmt: skip
    assert [table[f"SN-{i:04d}"]["state"] for i in range(4)] == [
        "confirmed",
        "revoked",
        "revoked",
        "scrapped",
    ]
    assert rep.confirmed == sum(row["state"] == "confirmed" for row in table.values())
    assert table["SN-0001"]["revocation_reason"] == "keyCompromise" and table["SN-0001"]["revoked_at"]
    assert table["SN-0002"]["revocation_reason"] == "privilegeWithdrawn"
    assert table["SN-0000"]["revocation_reason"] == table["SN-0000"]["revoked_at"] == ""
    pem = x509.load_pem_x509_certificates(reconcile.export_pem(reconcile.certificates(floor.journal, "WO-1")))
    assert [format(c.serial_number, "x") for c in pem] == [results[0].cert_serial]

    summary = reconcile.revocation_summary(floor.journal)
    assert summary["total"] == 3 and summary["by_source"] == {"cli": 2, "scrap": 1}
    assert summary["by_reason"] == rep.revoked_by_reason


def test_the_export_keeps_a_serials_leading_zero() -> None:
    """One certificate in 16 has a serial whose first byte is below 0x10: the journal's hex drops that zero, so
    the CSV gave one digit fewer than `openssl x509 -serial` and the brand owner's comparison failed."""
    cert = reconcile.ExportedCertificate(
        "a1b2c", "SN-1", "00" * 32, "st1", 0.0, None, "issued", b"", revocation_reason=None
    )
    table = list(csv.DictReader(io.StringIO(reconcile.export_csv([cert]))))
    assert table[0]["certificate_serial"] == "0A1B2C"
    assert reconcile.whole_bytes("7f") == "7F"
