"""Refusals in the audit log: in full up to a burst per station and window, then counted into one summary."""

from __future__ import annotations

import asyncio
import json

import pytest

from appliance.audit.log import AuditLog
from appliance.audit.verify import verify
from appliance.ca import CaRecord
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.refusals import RefusalLimiter
from appliance.issuance.service import IssueService
from appliance.profiles import builtin_profiles
from hsm.token import Token
from tests.appliance.conftest import make_csr


def test_limiter_burst_window_and_summary() -> None:
    lim = RefusalLimiter(burst=2, window_s=10)
    assert [lim.admit("a", "BAD_CSR", t) for t in (0, 1, 2, 3)] == [True, True, False, False]
    assert lim.admit("b", "BAD_CSR", 3)  # another station has its own burst
    assert lim.admit("a", "BAD_POP", 4) is False
    assert not lim.pending(9.9) and lim.due(9.9) == []
    assert lim.pending(10)
    # A refusal after the window closed opens a new one; the old one's summary is still due, once.
    assert lim.admit("a", "BAD_CSR", 11)
    due = lim.due(11)
    assert due == [
        {"station": "a", "window_start": 0, "window_s": 10, "suppressed": {"BAD_CSR": 2, "BAD_POP": 1}}
    ]
    assert lim.due(11) == [] and lim.due(100) == []
    lim.admit("c", "X", 200), lim.admit("c", "X", 200), lim.admit("c", "X", 200)
    assert [d["suppressed"] for d in lim.due(200, all_windows=True)] == [{"X": 1}]


def _events(journal: Journal, event: str) -> list[dict[str, object]]:
    rows = journal.call(
        lambda: journal.conn.execute("SELECT data FROM audit WHERE event=? ORDER BY seq", (event,)).fetchall()
    )
    return [json.loads(r[0]) for r in rows]


async def test_a_flood_of_bad_requests_is_audited_in_bounded_space(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    audit = AuditLog(journal)
    service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                           audit=audit, refusal_burst=3, refusal_window_s=3600)  # fmt: skip
    async with service:

        async def bad(station: str, i: int) -> None:
            with pytest.raises(IssuanceRefused) as exc:
                await service.issue(IssueRequest(f"SN-{i}", b"not a CSR", station))
            assert exc.value.code is ReasonCode.BAD_CSR

        await asyncio.gather(*(bad("noisy", i) for i in range(40)), bad("quiet", 99))
        _, csr = make_csr("SN-OK")
        await service.issue(IssueRequest("SN-OK", csr, "noisy"))  # issuance is not limited
    detailed = [item for e in _events(journal, "issuance.refused") for item in e["items"]]  # type: ignore[attr-defined]
    assert sorted(i["station"] for i in detailed) == ["noisy"] * 3 + ["quiet"]
    assert all(i["code"] == "BAD_CSR" and i["reason"] for i in detailed)
    # The 37 others are counted, and written as one summary when the service stopped.
    (summary,) = _events(journal, "issuance.refused-summary")
    assert summary["items"] == [
        {"station": "noisy", "window_start": summary["items"][0]["window_start"], "window_s": 3600,  # type: ignore[index]
         "suppressed": {"BAD_CSR": 37}}
    ]  # fmt: skip
    assert len(_events(journal, "issuance.intent")) == 1
    assert verify(journal).ok


async def test_the_summary_is_written_when_the_window_closes(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                           audit=AuditLog(journal), refusal_burst=1, refusal_window_s=0.4)  # fmt: skip
    async with service:
        for i in range(3):
            with pytest.raises(IssuanceRefused):
                await service.issue(IssueRequest(f"SN-{i}", b"\x30\x00", "noisy"))
        for _ in range(50):  # the periodic flush, not the shutdown, writes it
            if _events(journal, "issuance.refused-summary"):
                break
            await asyncio.sleep(0.05)
        (summary,) = _events(journal, "issuance.refused-summary")
    assert summary["items"][0]["suppressed"] == {"BAD_CSR": 2}  # type: ignore[index]
    assert len(_events(journal, "issuance.refused-summary")) == 1
