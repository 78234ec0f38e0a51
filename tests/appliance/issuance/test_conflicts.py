"""The batch's conflict pre-check (appliance/issuance/conflicts.py) misses no conflict: within one batch (the
rows an earlier request of the same transaction wrote) as across batches, and its queries use indexes."""

from __future__ import annotations

import asyncio
import itertools

import pytest

from appliance.ca import CaRecord
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance import prepare
from appliance.issuance.conflicts import Present
from appliance.issuance.items import IssueResult
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.profiles import builtin_profiles
from hsm.token import Token
from tests.appliance.conftest import make_csr


def _service(journal: Journal, issuing: CaRecord, token: Token) -> IssueService:
    key = token.get_key(issuing.key_label)
    return IssueService(journal, issuing, key, builtin_profiles(), batch_max=64)  # type: ignore[arg-type]


async def _one_batch(svc: IssueService, requests: list[IssueRequest]) -> list[IssueResult | BaseException]:
    before = svc.stats["batches"]
    results = await asyncio.gather(*(svc.issue(r) for r in requests), return_exceptions=True)
    assert svc.stats["batches"] == before + 1, (
        "the requests must share one batch for this test to mean anything"
    )
    return results


def _codes(results: list[IssueResult | BaseException]) -> list[ReasonCode | None]:
    return [r.code if isinstance(r, IssuanceRefused) else None for r in results]


async def test_conflicts_within_one_batch_are_found(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    key, csr = make_csr()
    async with _service(journal, issuing, hsm_token) as svc:
        # Same device, two keys; then one key for two devices: each second request meets the row the first wrote
        # in the same transaction, which the batch query (made before either) did not see.
        results = await _one_batch(svc, [
            IssueRequest("SN-D", make_csr()[1]), IssueRequest("SN-D", make_csr()[1]),
            IssueRequest("SN-K1", csr), IssueRequest("SN-K2", make_csr(key=key)[1]),
        ])  # fmt: skip
    assert _codes(results) == [None, ReasonCode.DEVICE_ALREADY_ISSUED, None, ReasonCode.KEY_ALREADY_CERTIFIED]


async def test_conflicts_with_earlier_batches_are_found(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    key, csr = make_csr()
    async with _service(journal, issuing, hsm_token) as svc:
        first = await svc.issue(IssueRequest("SN-A", csr))
        results = await _one_batch(svc, [
            IssueRequest("SN-A", make_csr()[1]), IssueRequest("SN-B", make_csr(key=key)[1]),
            IssueRequest("SN-A", csr), IssueRequest("SN-C", make_csr()[1]),
        ])  # fmt: skip
    assert _codes(results) == [ReasonCode.DEVICE_ALREADY_ISSUED, ReasonCode.KEY_ALREADY_CERTIFIED, None, None]
    again = results[2]
    assert isinstance(again, IssueResult) and again.reused and again.cert_serial == first.cert_serial


async def test_a_serial_drawn_twice_is_refused_never_reused(
    journal: Journal, issuing: CaRecord, hsm_token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CSPRNG drawing a serial again (2^-63 odds: forced here) refuses that request BUSY, within a batch and
    against the journal."""
    serials = itertools.chain([1 << 100, 1 << 100, 1 << 101, 1 << 100], itertools.count((1 << 102) + 1))
    monkeypatch.setattr(prepare, "new_serial_number", lambda: next(serials))
    async with _service(journal, issuing, hsm_token) as svc:
        within = await _one_batch(
            svc, [IssueRequest("SN-S1", make_csr()[1]), IssueRequest("SN-S2", make_csr()[1])]
        )
        across = await _one_batch(
            svc, [IssueRequest("SN-S3", make_csr()[1]), IssueRequest("SN-S4", make_csr()[1])]
        )
    assert _codes(within) == [None, ReasonCode.BUSY]
    assert _codes(across) == [None, ReasonCode.BUSY]
    issued = [r.cert_serial for r in journal.rows() if r.state == "issued"]
    assert sorted(issued) == sorted({format(1 << 100, "x"), format(1 << 101, "x")})


def test_the_batch_queries_use_indexes(journal: Journal) -> None:
    seen: list[str] = []

    def plans() -> None:
        conn = journal.conn
        conn.set_trace_callback(seen.append)
        try:
            Present(conn, "issuing", ["d1", "d2"], [b"k1", b"k2"], ["s1", "s2"])
        finally:
            conn.set_trace_callback(None)
        for sql in seen:
            detail = [str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql)]
            assert not any(d.startswith("SCAN ") and " USING " not in d for d in detail), (sql, detail)

    journal.call(plans)
    assert len(seen) == 5
