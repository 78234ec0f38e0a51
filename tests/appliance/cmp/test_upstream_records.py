"""The forwarder against a second Birthline (the `upstream` fixture: its own journal, CA, work order and CMP
server on 127.0.0.1, a label trusting our RA with accept_ra_verified and allow_rr), signature-protected, single
and batched (issue 11 item 4): key updates go upstream as kur naming the upstream's certificate of the one they
update, revocations as rr, a PEM CSR as DER; a record that can never be sent is parked with its reason and does
not hold up the others."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.cmp import parse_message
from appliance.cmp.build import build_message
from appliance.cmp.forwarder import queue_status
from appliance.cmp.header import request_header
from appliance.cmp.model import BodyType, P10crBody
from appliance.cmp.protection import SignatureProtector
from appliance.issuance.policy import IssueRequest
from appliance.va.revocation import Reason, Source, revoke_in_transaction
from tests.appliance.cmp.upstream_support import SPKI, Local, Upstream, device_csr, forwarder, outbox_rows

DER = serialization.Encoding.DER


def _key() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*SPKI)


async def _drain(local: Local, upstream: Upstream, mode: str) -> bool:
    fwd = forwarder(local, upstream, mode=mode)
    try:
        return await fwd.drain(timeout_s=60)
    finally:
        await fwd.close()


def _upstream_cert(local: Local, cert_serial: str) -> x509.Certificate:
    (der,) = [r["upstream_cert_der"] for r in outbox_rows(local.journal)
              if r["cert_serial"] == cert_serial and r["kind"] != "rr"]  # fmt: skip
    return x509.load_der_x509_certificate(bytes(der))


@pytest.mark.parametrize("mode", ["batched", "single"])
async def test_issuance_key_update_and_revocation_reach_a_birthline_upstream(
    local: Local, upstream: Upstream, mode: str
) -> None:
    # a PEM CSR (birthline issue --csr dev.pem), a CRMF key, and one more to revoke
    _, csr = device_csr("SN-0001")
    pem = x509.load_der_x509_csr(csr).public_bytes(serialization.Encoding.PEM)
    first = await local.service.issue(IssueRequest("SN-0001", pem, "fixture-1"))
    second = await local.service.issue(IssueRequest("SN-0002", b"", "fixture-1", public_key_der=_key()))
    third = await local.service.issue(IssueRequest("SN-0003", b"", "fixture-1", public_key_der=_key()))
    assert await _drain(local, upstream, mode)
    # SN-0002 updates its key here; SN-0003 is revoked here
    new_key = _key()
    updated = await local.service.issue(
        IssueRequest("SN-0002", b"", "fixture-1", public_key_der=new_key, replaces=second.cert_serial)
    )

    def revoke(conn: object) -> None:
        revoke_in_transaction(conn, local.audit, "sam", [(third.cert_serial, "issuing", "SN-0003")],  # type: ignore[arg-type]
                              Reason.KEY_COMPROMISE, Source.CLI, now=time.time())  # fmt: skip

    local.journal.call(local.journal.transaction, revoke, "test revoke")
    assert await _drain(local, upstream, mode)
    rows = {(r["kind"], r["cert_serial"]): r for r in outbox_rows(local.journal)}
    assert {r["state"] for r in rows.values()} == {"done"}, rows
    assert set(rows) == {("p10cr", first.cert_serial), ("cr", second.cert_serial), ("cr", third.cert_serial),
                         ("kur", updated.cert_serial), ("rr", third.cert_serial)}  # fmt: skip
    # the kur named the upstream's certificate of SN-0002; the upstream replaced it and kept both
    old_up = _upstream_cert(local, second.cert_serial)
    new_up = _upstream_cert(local, updated.cert_serial)
    assert new_up.public_key().public_bytes(*SPKI) == new_key
    up_rows = upstream.journal.call(lambda: upstream.journal.conn.execute(
        "SELECT cert_serial, updates, updated_by FROM issuance WHERE device_serial='SN-0002' ORDER BY id").fetchall())  # fmt: skip
    assert [r[0] for r in up_rows] == [format(old_up.serial_number, "x"), format(new_up.serial_number, "x")]
    assert up_rows[0][2] is not None and up_rows[1][1] is not None
    # the rr revoked the upstream's certificate of SN-0003
    up3 = _upstream_cert(local, third.cert_serial)
    reason = upstream.journal.call(lambda: upstream.journal.conn.execute(
        "SELECT reason FROM revocation WHERE cert_serial=?", (format(up3.serial_number, "x"),)).fetchone())  # fmt: skip
    assert tuple(reason) == ("keyCompromise",)
    # the PEM CSR went up as a DER p10cr: the upstream certified its key
    up1 = _upstream_cert(local, first.cert_serial)
    assert up1.public_key().public_bytes(*SPKI) == x509.load_der_x509_csr(csr).public_key().public_bytes(
        *SPKI
    )


async def test_records_that_can_never_be_sent_are_parked_and_the_rest_go(
    local: Local, upstream: Upstream
) -> None:
    """In one batch: a request stored with a wrong key identifier (senderKID), one the upstream cannot read (more
    extraCerts than it takes), one whose stored bytes no longer parse here, and two good ones. The three are parked
    with their reasons, `upstream status` lists them, and the good ones are done."""
    issued = [await local.service.issue(IssueRequest(f"SN-00{i}", device_csr(f"SN-00{i}")[1], "fixture-1"))
              for i in range(11, 16)]  # fmt: skip
    rows = {r["cert_serial"]: r for r in outbox_rows(local.journal)}
    wrong_kid = rows[issued[0].cert_serial]
    too_many = rows[issued[1].cert_serial]
    garbled = rows[issued[2].cert_serial]
    ra = local.ra

    def p10cr(row: dict[str, object], protector: object) -> bytes:
        header = request_header(sender=x509.DirectoryName(ra.certificate.subject),
                                recipient=x509.DirectoryName(x509.Name.from_rfc4514_string("CN=Upstream CA")),
                                transaction_id=bytes(row["transaction_id"]))  # type: ignore[arg-type]  # fmt: skip
        body = P10crBody(x509.load_der_x509_csr(bytes(row["csr_der"])))  # type: ignore[arg-type]
        return build_message(header, BodyType.P10CR, body, protection=protector).der  # type: ignore[arg-type]

    class WrongKid(SignatureProtector):
        def prepare(self, header):  # type: ignore[no-untyped-def]
            return dataclasses.replace(super().prepare(header), sender_kid=b"not the RA's key identifier")

    extra = SignatureProtector(ra.key, ra.certificate, (*ra.chain, *ra.chain, *ra.chain))
    stored = {wrong_kid["id"]: p10cr(wrong_kid, WrongKid(ra.key, ra.certificate, ra.chain)),
              too_many["id"]: p10cr(too_many, extra), garbled["id"]: b"\x30\x03\x02\x01\x01"}  # fmt: skip

    def store(conn: object) -> None:
        for row_id, der in stored.items():
            conn.execute("UPDATE outbox SET request_der=?, state='sent' WHERE id=?", (der, row_id))  # type: ignore[attr-defined]

    local.journal.call(local.journal.transaction, store, "older requests")
    upstream.responder.limits = dataclasses.replace(upstream.responder.limits, max_extra_certs=3)
    assert parse_message(stored[too_many["id"]])  # we can read it; the upstream, with its limit, cannot
    fwd = forwarder(local, upstream)
    try:
        assert not await fwd.drain(timeout_s=60)  # something did not go
    finally:
        await fwd.close()
    after = {r["id"]: r for r in outbox_rows(local.journal)}
    assert [after[r["id"]]["state"] for r in (wrong_kid, too_many, garbled)] == ["parked"] * 3
    assert "BAD_MESSAGE_CHECK" in after[wrong_kid["id"]]["last_error"]
    assert "could not read" in after[too_many["id"]]["last_error"]
    assert "does not parse" in after[garbled["id"]]["last_error"]
    assert {after[rows[i.cert_serial]["id"]]["state"] for i in issued[3:]} == {"done"}
    assert len(upstream.issued()) == 2
    status = queue_status(local.journal, fwd.settings)
    assert {p["id"] for p in status["parked"]} == set(stored) and status["open"] == 0
    assert json.dumps(status)  # what `upstream status --json` prints
