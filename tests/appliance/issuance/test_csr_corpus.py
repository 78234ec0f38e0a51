"""The CSR regression corpus (csr_corpus/MANIFEST): what fuzzing found, and one input of each class of bad CSR,
each with the reason code it must get; in-process through the worker-side path, and all of them through the
real IssueService with a worker process, beside good requests."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography import x509

from appliance.ca import CaRecord
from appliance.errors import IssuanceRefused
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.prepare import Job, PrepareContext, Preparer, Refusal
from appliance.issuance.service import IssueService
from appliance.profiles import builtin_profiles
from hsm.token import Token
from tests.appliance.conftest import make_csr

CORPUS = Path(__file__).parent / "csr_corpus"
ISSUED = "ISSUED"


def manifest() -> dict[str, tuple[str, str]]:
    entries = {}
    for line in (CORPUS / "MANIFEST").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, code, what = line.split(None, 2)
            entries[name] = (code, what)
    return entries


ENTRIES = manifest()


def test_every_corpus_file_is_in_the_manifest_and_back() -> None:
    assert sorted(p.name for p in CORPUS.glob("*.der")) == sorted(ENTRIES)


@pytest.fixture(scope="module")
def preparer(ca_journal_template: Path) -> Preparer:
    from appliance import ca as ca_mod

    with Journal(ca_journal_template) as journal:
        issuing = ca_mod.load_ca(journal, "issuing")
    return Preparer(
        PrepareContext(dict(builtin_profiles()), issuing.cert_der or b"", issuing.key_algorithm, 8192)
    )


@pytest.mark.parametrize("name", sorted(ENTRIES))
def test_corpus_input_gets_its_reason_code(preparer: Preparer, name: str) -> None:
    expected, what = ENTRIES[name]
    result = preparer.prepare(Job("SN-CORPUS", (CORPUS / name).read_bytes(), "idevid", 1_770_000_000))
    got = result.code.name if isinstance(result, Refusal) else ISSUED
    assert got == expected, f"{name} ({what}): {result}"


async def test_the_whole_corpus_through_the_service_beside_good_requests(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    names = sorted(ENTRIES)
    service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                           prepare_workers=1, batch_max=64)  # fmt: skip
    async with service:
        results = await asyncio.gather(
            *(
                service.issue(IssueRequest(f"SN-C{i}", (CORPUS / n).read_bytes()))
                for i, n in enumerate(names)
            ),
            *(service.issue(IssueRequest(f"SN-G{i}", make_csr()[1])) for i in range(len(names))),
            return_exceptions=True,
        )
        after = await service.issue(IssueRequest("SN-AFTER", make_csr()[1]))
        assert service.prepare_stats["deaths"] == 0
    for name, r in zip(names, results, strict=False):
        expected = ENTRIES[name][0]
        if expected == ISSUED:
            assert not isinstance(r, BaseException), (name, r)
            cert = x509.load_der_x509_certificate(r.certificate)
            assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
        else:
            assert isinstance(r, IssuanceRefused) and r.code.name == expected, (name, r)
    for r in results[len(names) :]:
        assert not isinstance(r, BaseException), r
    assert not after.reused
