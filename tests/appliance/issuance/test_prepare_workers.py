"""The prepare worker processes (issue 10, item 1): nothing a device sends, and no death of a worker, stops
issuance. Real IssueService with prepare_workers > 0, real SoftHSM token, real journal."""

from __future__ import annotations

import asyncio

import pytest
from cryptography import x509

from appliance.ca import CaRecord
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.profiles import Profile, builtin_profiles
from hsm.token import Token
from tests.appliance.conftest import make_csr


def _service(journal: Journal, issuing: CaRecord, token: Token, **kw: object) -> IssueService:
    profiles: dict[str, Profile] = dict(builtin_profiles())
    kw.setdefault("prepare_workers", 1)
    return IssueService(journal, issuing, token.get_key(issuing.key_label), profiles, **kw)  # type: ignore[arg-type]


def with_version(csr: bytes, version: int) -> bytes:
    """The CSR with its CertificationRequestInfo version INTEGER (0 for v1) set to `version` (one octet)."""
    at = csr.index(b"\x02\x01\x00")
    return csr[: at + 2] + bytes([version]) + csr[at + 3 :]


async def _issues(svc: IssueService, issuing: CaRecord, serial: str) -> None:
    result = await svc.issue(IssueRequest(serial, make_csr()[1]))
    x509.load_der_x509_certificate(result.certificate).verify_directly_issued_by(issuing.certificate)


async def test_csr_version_1_is_bad_csr_and_the_next_request_still_issues(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    """The defect found: cryptography's InvalidVersion (not a ValueError) escaped the worker, could not be
    unpickled in the parent, and broke the pool for every later request."""
    async with _service(journal, issuing, hsm_token) as svc:
        for version in (1, 2, 0x7F):
            try:
                await svc.issue(IssueRequest(f"SN-V{version}", with_version(make_csr()[1], version)))
            except IssuanceRefused as exc:
                assert exc.code == ReasonCode.BAD_CSR, exc
            else:
                raise AssertionError(f"a CSR of version {version} was accepted")
            await _issues(svc, issuing, f"SN-AFTER-V{version}")
        # Many at once, mixed with good ones in the same batches.
        results = await asyncio.gather(
            *(svc.issue(IssueRequest(f"SN-M{i}", with_version(make_csr()[1], 1) if i % 3 == 0 else make_csr()[1]))
              for i in range(24)),
            return_exceptions=True,
        )  # fmt: skip
    for i, r in enumerate(results):
        if i % 3 == 0:
            assert isinstance(r, IssuanceRefused) and r.code == ReasonCode.BAD_CSR, r
        else:
            assert not isinstance(r, BaseException), r


async def test_a_bug_in_preparation_refuses_that_request_internal_and_is_logged_once(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Our own bug (injected: no input reaches one now) costs the request it hit an INTERNAL refusal, not the
    batch; the log names where it happened once, without the input, however many requests hit it."""
    from appliance.issuance import prepare

    real = prepare.build_certificate

    def buggy(profile: Profile, **kw: object) -> object:
        if str(kw["device_serial"]).startswith("SN-BUG"):
            raise KeyError("SN-BUG secret input")
        return real(profile, **kw)  # type: ignore[arg-type]

    mocker.patch.object(prepare, "build_certificate", side_effect=buggy)
    async with _service(journal, issuing, hsm_token, prepare_workers=0) as svc:
        results = await asyncio.gather(
            *(svc.issue(IssueRequest(f"SN-BUG{i}" if i % 2 else f"SN-OK{i}", make_csr()[1])) for i in range(8)),
            return_exceptions=True,
        )  # fmt: skip
        await _issues(svc, issuing, "SN-AFTER-BUG")
    for i, r in enumerate(results):
        if i % 2:
            assert isinstance(r, IssuanceRefused) and r.code == ReasonCode.INTERNAL, r
            assert "secret" not in r.message
        else:
            assert not isinstance(r, BaseException), r
    lines = [r.getMessage() for r in caplog.records if "fault in CSR checking" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "KeyError at" in lines[0] and "buggy" in lines[0] and "secret" not in lines[0]
