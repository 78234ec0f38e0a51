"""certmonger's SCEP helper (scep-submit) against the SCEP server: enrol, renew (certmonger re-keys with a PKCSReq
signed by the certificate it holds), a refusal, and polling while the upstream CA works (RA mode).

scep-submit only transmits messages the certmonger daemon built, so certmonger runs for each test on a D-Bus
session of its own with all its files in the test's directory (support.certmonger)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from appliance import ca as ca_mod
from appliance.httplisten import HttpListener
from appliance.scep.labels import ScepLabel
from appliance.scep.ra import ensure_scep_ra
from appliance.scep.responder import ScepResponder
from appliance.scep.server import make_scep_app
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from tests.appliance.cmp.test_upstream_mode import Ra, drain
from tests.appliance.cmp.upstream_support import Upstream
from tests.appliance.scep.support import CERTMONGER, DBUS_RUN_SESSION, certmonger, served

pytestmark = pytest.mark.skipif(
    CERTMONGER is None or DBUS_RUN_SESSION is None, reason="certmonger (and dbus) not installed"
)


def _status(out: str) -> list[str]:
    return [line.split(":", 1)[1].strip() for line in out.splitlines() if line.strip().startswith("status:")]


async def test_certmonger_enrols_and_rekeys(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    async with served(softhsm_token, production_journal_template, tmp_path) as s:
        (tmp_path / "challenge").write_text(s.challenge(device_serial="SN-0101"))
        w = tmp_path / "cm"
        rc, out = await certmonger(f"""
getcert add-scep-ca -s -c birthline -u {s.url}
getcert request -s -c birthline -I dev -k {w}/dev.key -f {w}/dev.pem -N "serialNumber=SN-0101" \\
    -l {tmp_path}/challenge -w --wait-timeout 60
getcert list -s -i dev
cp {w}/dev.pem {w}/first.pem
getcert rekey -s -i dev -w --wait-timeout 60
getcert list -s -i dev
""", w)  # fmt: skip
        assert rc == 0, out
        assert _status(out) == ["MONITORING", "MONITORING"], out
        first = x509.load_pem_x509_certificate((w / "first.pem").read_bytes())
        second = x509.load_pem_x509_certificate((w / "dev.pem").read_bytes())
        assert first.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0101"
        assert second.subject == first.subject and second.public_key() != first.public_key()
        journal = s.daemon.journal
        rows = {r.cert_serial: r for r in journal.rows("device_serial=?", ("SN-0101",))}
        old = rows[format(first.serial_number, "x")]
        new = rows[format(second.serial_number, "x")]
        assert new.cert_der == second.public_bytes(serialization.Encoding.DER) and new.state == "confirmed"
        links = journal.call(lambda: journal.conn.execute(
            "SELECT updates FROM issuance WHERE id=?", (new.id,)).fetchone())  # fmt: skip
        assert links[0] == old.id


async def test_certmonger_is_told_a_refusal(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    async with served(softhsm_token, production_journal_template, tmp_path) as s:
        (tmp_path / "challenge").write_text("0123456789abcdef0123456789abcdef")  # no such challenge
        w = tmp_path / "cm"
        _, out = await certmonger(f"""
getcert add-scep-ca -s -c birthline -u {s.url}
getcert request -s -c birthline -I dev -k {w}/dev.key -f {w}/dev.pem -N "serialNumber=SN-0102" \\
    -l {tmp_path}/challenge -w --wait-timeout 60
getcert list -s -i dev
""", w)  # fmt: skip
        # A signed FAILURE it could verify (not "no content"), read as the CA refusing the request.
        assert _status(out) == ["CA_REJECTED"], out
        assert "not permitted or is not supported by server" in out and "no content" not in out
        assert not (w / "dev.pem").exists() and not s.daemon.journal.rows("device_serial=?", ("SN-0102",))


@pytest.fixture
async def ra_mode_scep(ra_mode: Ra, hsm_token: Token, tmp_path: Path) -> AsyncIterator[str]:
    """A SCEP server in front of an IssueService whose product is in upstream (RA) mode."""
    from appliance.audit.log import AuditLog
    from appliance.scep import challenges
    from tests.appliance.scep.support import SUPERVISOR

    management = ca_mod.load_ca(ra_mode.journal, "management")
    scep_ra = ensure_scep_ra(hsm_token, management, tmp_path / "scep-ra_mode.pem")
    responder = ScepResponder(
        ra_mode.service, ra_mode.audit, {"line1": ScepLabel("line1", "fixture-1")}, scep_ra
    )
    _, secret = challenges.add(
        ra_mode.journal, AuditLog(ra_mode.journal), SUPERVISOR, "line1", device_serial="SN-0103"
    )
    (tmp_path / "challenge").write_text(secret)
    async with HttpListener(make_scep_app(responder), "127.0.0.1", 0, name="scep") as http:
        yield f"{http.url}/scep/line1"


async def test_certmonger_polls_while_the_upstream_ca_works(
    ra_mode_scep: str, ra_mode: Ra, upstream: Upstream, tmp_path: Path
) -> None:
    ra = ra_mode
    w = tmp_path / "cm"
    go = tmp_path / "upstream-issued"
    script = f"""
getcert add-scep-ca -s -c birthline -u {ra_mode_scep}
getcert request -s -c birthline -I dev -k {w}/dev.key -f {w}/dev.pem -N "serialNumber=SN-0103" \\
    -l {tmp_path}/challenge -w --wait-timeout 5
getcert list -s -i dev
while [ ! -e {go} ]; do sleep 0.2; done
for i in $(seq 60); do
    getcert refresh -s -i dev >/dev/null
    getcert list -s -i dev | grep -q "status: MONITORING" && break
    sleep 1
done
getcert list -s -i dev
"""
    task = asyncio.create_task(certmonger(script, w))
    # The request reaches the core, which records it for the upstream CA and answers PENDING.
    for _ in range(600):
        if ra.requests() or task.done():
            break
        await asyncio.sleep(0.1)
    assert ra.requests() and ra.requests()[0][1] == "pending"
    await drain(ra, upstream)
    go.write_text("")
    rc, out = await task
    assert rc == 0, out
    statuses = _status(out)
    assert statuses[0] in ("CA_WORKING", "SUBMITTING") and statuses[-1] == "MONITORING", out
    cert = x509.load_pem_x509_certificate((w / "dev.pem").read_bytes())
    (row,) = ra.requests()
    assert row[1] == "confirmed" and bytes(row[3]) == cert.public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]
