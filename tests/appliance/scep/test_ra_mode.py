"""SCEP in RA mode: the product's certificates come from the upstream CA (a second Birthline). PKCSReq is answered
PENDING; CertPoll (the same transactionID, signed with the same key) asks again until the forwarder has stored
the upstream's certificate, which is then answered and confirmed."""

from __future__ import annotations

from pathlib import Path

import aiohttp
from cryptography.hazmat.primitives import serialization

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.httplisten import HttpListener
from appliance.scep import challenges, client
from appliance.scep.labels import ScepLabel
from appliance.scep.oids import MessageType, PkiStatus
from appliance.scep.ra import ensure_scep_ra
from appliance.scep.responder import ScepResponder
from appliance.scep.server import make_scep_app
from hsm.token import Token
from tests.appliance.cmp.test_upstream_mode import Ra, drain
from tests.appliance.cmp.upstream_support import Upstream
from tests.appliance.scep.support import SUPERVISOR
from tests.appliance.scep.test_server import Device, make_csr


async def test_pending_then_polled_until_the_upstream_has_issued(
    ra_mode: Ra, upstream: Upstream, hsm_token: Token, tmp_path: Path
) -> None:
    ra = ra_mode
    scep_ra = ensure_scep_ra(hsm_token, ca_mod.load_ca(ra.journal, "management"), tmp_path / "scep-ra.pem")
    responder = ScepResponder(ra.service, ra.audit, {"line1": ScepLabel("line1", "fixture-1")}, scep_ra)
    _, secret = challenges.add(ra.journal, AuditLog(ra.journal), SUPERVISOR, "line1", device_serial="SN-0201")
    dev = Device.new()
    csr = make_csr(dev.key, challenge=secret)
    poll = client.issuer_and_subject(scep_ra.certificate.subject, dev.signer.subject)

    async with (
        HttpListener(make_scep_app(responder), "127.0.0.1", 0, name="scep") as http,
        aiohttp.ClientSession() as s,
    ):

        async def ask(kind: MessageType, payload: bytes) -> client.Reply:
            data = client.request(kind, payload, signer=dev.signer, key=dev.key, ra=scep_ra.certificate,
                                  transaction_id="tx-ra", sender_nonce=b"n" * 16)  # fmt: skip
            async with s.post(f"{http.url}/scep/line1?operation=PKIOperation", data=data) as r:
                assert r.status == 200
                body = await r.read()
            return client.read_reply(body, ra=scep_ra.certificate, signer=dev.signer, key=dev.key,
                                     transaction_id="tx-ra", sender_nonce=b"n" * 16)  # fmt: skip

        assert (await ask(MessageType.PKCS_REQ, csr)).status is PkiStatus.PENDING
        assert (await ask(MessageType.CERT_POLL, poll)).status is PkiStatus.PENDING
        assert [r[1] for r in ra.requests()] == ["pending"]
        await drain(ra, upstream)
        done = await ask(MessageType.CERT_POLL, poll)
        assert done.status is PkiStatus.SUCCESS
        (row,) = ra.requests()
        assert row[1] == "confirmed"
        assert bytes(row[3]) == done.certificates[0].public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]
        # The PKCSReq sent again gets the same certificate; one unit was taken for the device.
        again = await ask(MessageType.PKCS_REQ, csr)
        assert again.status is PkiStatus.SUCCESS and again.certificates == done.certificates
        assert ra.consumed() == 1
