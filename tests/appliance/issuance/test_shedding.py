"""Over capacity the issuance queue stays bounded: past `max_queued` waiting requests a new one is refused BUSY
at once, with a retry-after and nothing recorded, and the station front end answers it PENDING(retry-after)."""

from __future__ import annotations

import asyncio

import pytest

from appliance.ca import CaRecord
from appliance.daemon_enroller import CoreEnroller
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import SHED_RETRY_AFTER_S, IssueService
from appliance.profiles import builtin_profiles
from hsm.token import Token
from stations.server import EnrollPending
from tests.appliance.conftest import make_csr


async def test_requests_past_max_queued_are_refused_busy_and_not_recorded(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                           max_queued=5)  # fmt: skip
    async with service:
        # Twenty requests put before the issuance loop takes the first: asyncio runs ready tasks in order, so
        # the queue holds five when the sixth arrives.
        results = await asyncio.gather(
            *(service.issue(IssueRequest(f"SN-SHED-{i}", make_csr()[1])) for i in range(20)),
            return_exceptions=True,
        )
        refused = [r for r in results if isinstance(r, IssuanceRefused)]
        issued = [r for r in results if not isinstance(r, BaseException)]
        assert len(issued) == 5 and len(refused) == 15
        assert all(r.code is ReasonCode.BUSY for r in refused)
        assert all(r.details["retry_after_s"] == SHED_RETRY_AFTER_S for r in refused)
        assert service.shed == 15
        assert len(journal.rows()) == 5  # a refused request left no intent, no serial, no quota
        # Once the queue has drained, the same devices are issued.
        again = await asyncio.gather(
            *(service.issue(IssueRequest(f"SN-SHED-{i}", make_csr()[1])) for i in range(5, 10))
        )
        assert len(again) == 5 and len(journal.rows()) == 10


async def test_no_limit_by_default(journal: Journal, issuing: CaRecord, hsm_token: Token) -> None:
    service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()))
    async with service:
        results = await asyncio.gather(
            *(service.issue(IssueRequest(f"SN-ALL-{i}", make_csr()[1])) for i in range(30))
        )
    assert len(results) == 30 and service.shed == 0


async def test_a_station_is_told_pending_with_the_retry_after(
    journal: Journal, issuing: CaRecord, hsm_token: Token, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The station front end turns the shed refusal into PENDING(retry_after_ms): the station waits and sends
    the same ENROLL again. The full queue is injected (a real one fills only under a real overload:
    bench/soak.py's overload phase shows it end to end)."""
    service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                           max_queued=4)  # fmt: skip
    enroller = CoreEnroller(service, journal)
    async with service:
        monkeypatch.setattr(service._queue, "qsize", lambda: 4)
        with pytest.raises(EnrollPending) as pending:
            await enroller.enroll("st1", bytes(16), "SN-PENDING", make_csr()[1], None)
        assert pending.value.retry_after_ms == int(SHED_RETRY_AFTER_S * 1000)
        assert journal.rows() == []
        monkeypatch.undo()
        chain = await enroller.enroll("st1", bytes(16), "SN-PENDING", make_csr()[1], None)
        assert chain[1:] == list(service.chain) and len(journal.rows()) == 1
