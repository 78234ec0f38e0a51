"""Over capacity the issuance queue stays bounded: past `max_queued` waiting requests a new one is refused BUSY
at once, with a retry-after and nothing recorded, and the station front end answers it PENDING(retry-after)."""

from __future__ import annotations

import asyncio

from appliance.ca import CaRecord
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import SHED_RETRY_AFTER_S, IssueService
from appliance.profiles import builtin_profiles
from hsm.token import Token
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
