"""micromdm's scepclient (Debian package scep) against the daemon's SCEP server: enrol, the refusals it meets,
and renewal as it does it (with the same key, which this appliance refuses: it certifies a key once)."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from appliance.config import ScepLabelSection
from hsm.softhsm import SoftHsmToken
from tests.appliance.est.support import station_status
from tests.appliance.scep.support import SCEPCLIENT, ra_fingerprint, scepclient, served

pytestmark = pytest.mark.skipif(SCEPCLIENT is None, reason="scepclient (Debian package scep) not installed")

# scepclient 2.1.0 envelopes with DES-CBC and signs with SHA-1 whatever GetCACaps says: a label for it must
# accept both (docs/scep.md says what that costs).
LEGACY = {"line1": ScepLabelSection(station="fixture-1", legacy_algorithms=("des", "sha1"))}


async def test_scepclient_enrols_with_a_device_challenge(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    async with served(softhsm_token, production_journal_template, tmp_path, LEGACY) as s:
        secret = s.challenge(device_serial="SN-0001")
        work = tmp_path / "dev"
        rc, out = await scepclient(s.url, work, challenge=secret, fingerprint=ra_fingerprint(s.ra_cert))
        assert rc == 0, out
        cert = x509.load_pem_x509_certificate((work / "client.pem").read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == "SN-0001"
        rows = s.daemon.journal.rows("device_serial=?", ("SN-0001",))
        assert len(rows) == 1 and rows[0].state == "confirmed"
        assert rows[0].cert_der == cert.public_bytes(serialization.Encoding.DER)
        assert rows[0].station == "fixture-1" and rows[0].request_id.startswith("scep:line1:")
        station = await station_status(s.daemon, "fixture-1")
        assert station["kind"] == "scep" and station["state"] == "issuing", station


async def test_scepclient_with_a_work_order_challenge_names_the_device_in_its_cn(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    labels = {"line1": ScepLabelSection(station="fixture-1", legacy_algorithms=("des", "sha1"),
                                        device_serial_from="commonName")}  # fmt: skip
    async with served(softhsm_token, production_journal_template, tmp_path, labels) as s:
        secret = s.challenge(work_order="WO-1")
        fingerprint = ra_fingerprint(s.ra_cert)
        for serial in ("SN-0002", "SN-0003"):
            work = tmp_path / serial
            rc, out = await scepclient(s.url, work, challenge=secret, cn=serial, fingerprint=fingerprint)
            assert rc == 0, out
            cert = x509.load_pem_x509_certificate((work / "client.pem").read_bytes())
            assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == serial
        # A serial outside the work order: refused, as the core says; scepclient reports the failInfo.
        rc, out = await scepclient(
            s.url, tmp_path / "x", challenge=secret, cn="NOT-ON-WO-1", fingerprint=fingerprint
        )
        assert rc != 0 and "badRequest" in out
        assert not s.daemon.journal.rows("device_serial=?", ("NOT-ON-WO-1",))


async def test_scepclient_refusals(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    labels = {**LEGACY, "strict": ScepLabelSection(station="fixture-1")}
    async with served(softhsm_token, production_journal_template, tmp_path, labels) as s:
        fingerprint = ra_fingerprint(s.ra_cert)
        # DES and SHA-1 on a label that does not accept them: badAlg.
        strict = s.url.replace("/line1", "/strict")
        secret = s.challenge("strict", device_serial="SN-0004")
        rc, out = await scepclient(strict, tmp_path / "a", challenge=secret, fingerprint=fingerprint)
        assert rc != 0 and "badAlg" in out, out
        # No challenge, or a wrong one: badRequest.
        for challenge in ("", "00112233445566778899aabbccddeeff"):
            rc, out = await scepclient(s.url, tmp_path / "b", challenge=challenge, fingerprint=fingerprint)
            assert rc != 0 and "badRequest" in out, out
        # Without the RA's fingerprint, scepclient encrypts to every certificate GetCACert returns, and cannot
        # encrypt to the management CA's EC key: it fails before sending anything (docs/scep.md).
        rc, out = await scepclient(s.url, tmp_path / "c", challenge=s.challenge(device_serial="SN-0005"))
        assert rc != 0
        assert not s.daemon.journal.rows("device_serial IN ('SN-0004', 'SN-0005')")


async def test_scepclient_renewal_with_the_same_key_is_refused(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    """scepclient renews by signing a RenewalReq for the same key with the certificate of that key; this appliance
    certifies a key once, so it is refused (certmonger re-keys instead: test_certmonger.py)."""
    async with served(softhsm_token, production_journal_template, tmp_path, LEGACY) as s:
        fingerprint = ra_fingerprint(s.ra_cert)
        work = tmp_path / "dev"
        rc, out = await scepclient(
            s.url, work, challenge=s.challenge(device_serial="SN-0006"), fingerprint=fingerprint
        )
        assert rc == 0, out
        first = (work / "client.pem").read_bytes()
        rc, out = await scepclient(s.url, work, certificate=work / "client.pem", fingerprint=fingerprint)
        assert rc != 0 and "RenewalReq" in out and "badRequest" in out, out
        assert (work / "client.pem").read_bytes() == first
        (row,) = s.daemon.journal.rows("device_serial=?", ("SN-0006",))
        assert row.state == "confirmed"
