"""A CSR handed over as PEM (birthline issue --csr dev.csr, a station library) is journaled and queued upstream as
DER: the upstream p10cr carries a CertificationRequest, never PEM text (issue 11 item 5)."""

from __future__ import annotations

import hashlib

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.ca import CaRecord
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.profiles import builtin_profiles
from hsm.token import Token
from tests.appliance.conftest import make_csr


async def test_a_pem_csr_is_journaled_and_queued_as_der(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    async with IssueService(
        journal, issuing, hsm_token.get_key(issuing.key_label), builtin_profiles()
    ) as service:
        await _issue_pem(journal, service)


async def _issue_pem(journal: Journal, service: IssueService) -> None:
    _, der = make_csr("SN-PEM1")
    pem = x509.load_der_x509_csr(der).public_bytes(serialization.Encoding.PEM)
    first = await service.issue(IssueRequest("SN-PEM1", pem, "st1"))
    again = await service.issue(IssueRequest("SN-PEM1", der, "st1"))  # the same request in DER is a retry
    assert again.reused and again.certificate == first.certificate
    csr_der, csr_sha = journal.call(lambda: journal.conn.execute(
        "SELECT o.csr_der, i.csr_sha256 FROM outbox o JOIN issuance i ON i.id = o.issuance_id").fetchone())  # fmt: skip
    assert bytes(csr_der) == der and bytes(csr_sha) == hashlib.sha256(der).digest()
    x509.load_der_x509_csr(bytes(csr_der))  # what the forwarder puts in the p10cr body
