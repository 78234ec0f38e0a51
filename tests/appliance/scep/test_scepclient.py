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
