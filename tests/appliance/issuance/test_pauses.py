"""Paused stations: refused STATION_PAUSED before anything is journaled, audited, kept across a restart."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from appliance.audit.log import AuditLog
from appliance.ca import CaRecord
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.observe import Confirmation, Outcome
from appliance.issuance.pauses import PauseError
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.profiles import builtin_profiles
from hsm.token import Token
from tests.appliance.conftest import make_csr


def _service(journal: Journal, issuing: CaRecord, token: Token) -> IssueService:
    return IssueService(journal, issuing, token.get_key(issuing.key_label), dict(builtin_profiles()),
                        audit=AuditLog(journal))  # fmt: skip


@pytest.fixture
async def service(journal: Journal, issuing: CaRecord, hsm_token: Token) -> AsyncIterator[IssueService]:
    async with _service(journal, issuing, hsm_token) as svc:
        yield svc


def _register(journal: Journal, name: str) -> None:
    journal.call(journal.transaction, lambda conn: conn.execute(
        "INSERT INTO stations (name, kind, key, created_at) VALUES (?, 'lan', ?, 0)", (name, bytes(32))), "t")  # fmt: skip


def _events(journal: Journal, event: str) -> list[tuple[str, dict[str, object]]]:
    rows = journal.call(lambda: journal.conn.execute(
        "SELECT actor, data FROM audit WHERE event=? ORDER BY seq", (event,)).fetchall())  # fmt: skip
    return [(str(a), json.loads(d)) for a, d in rows]


async def test_a_paused_station_is_refused_until_resumed_and_others_go_on(
    service: IssueService, journal: Journal
) -> None:
    _register(journal, "st1")
    audit = AuditLog(journal)
    await service.pauses.pause("st1", "olga", "fixture jammed", audit, via="console")
    with pytest.raises(IssuanceRefused) as refused:
        await service.issue(IssueRequest("SN-0001", make_csr("SN-0001")[1], station="st1", request_id="r1"))
    assert refused.value.code is ReasonCode.STATION_PAUSED
    assert "paused" in refused.value.message and "olga" in refused.value.message
    assert journal.rows() == []  # nothing reserved, signed or counted for a paused station
    other = await service.issue(
        IssueRequest("SN-0002", make_csr("SN-0002")[1], station="st2", request_id="r2")
    )
    assert other.device_serial == "SN-0002"
    (refusal,) = [i for _, d in _events(journal, "issuance.refused") for i in d["items"]]  # type: ignore[attr-defined]
    assert refusal["code"] == "STATION_PAUSED" and refusal["station"] == "st1"
    await service.pauses.resume("st1", "olga", audit)
    again = await service.issue(
        IssueRequest("SN-0001", make_csr("SN-0001")[1], station="st1", request_id="r1")
    )
    assert again.device_serial == "SN-0001"
    assert [(a, d["station"]) for a, d in _events(journal, "station.pause")] == [("olga", "st1")]
    assert _events(journal, "station.pause")[0][1]["via"] == "console"
    assert [(a, d["station"]) for a, d in _events(journal, "station.resume")] == [("olga", "st1")]


async def test_a_pause_survives_a_restart_and_is_refused_twice_or_for_unknown_stations(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    _register(journal, "st1")
    audit = AuditLog(journal)
    async with _service(journal, issuing, hsm_token) as first:
        await first.pauses.pause("st1", "olga", "night shift", audit)
        with pytest.raises(PauseError, match="already paused"):
            await first.pauses.pause("st1", "olga", "again", audit)
        with pytest.raises(PauseError) as missing:
            await first.pauses.pause("no-such", "olga", "x", audit)
        assert missing.value.missing
    async with _service(journal, issuing, hsm_token) as second:
        pause = second.pauses.get("st1")
        assert pause is not None and pause.paused_by == "olga" and pause.reason == "night shift"
        with pytest.raises(IssuanceRefused) as refused:
            await second.issue(IssueRequest("SN-0003", make_csr("SN-0003")[1], station="st1"))
        assert refused.value.code is ReasonCode.STATION_PAUSED
        await second.pauses.resume("st1", "olga", audit)
        with pytest.raises(PauseError, match="not paused"):
            await second.pauses.resume("st1", "olga", audit)


class _Recorder:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []
        self.sign_calls: list[tuple[int, float]] = []
        self.confirmations: list[Confirmation] = []

    def answered(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)

    def signed(self, certificates: int, seconds: float) -> None:
        self.sign_calls.append((certificates, seconds))

    def confirmed(self, confirmations: list[Confirmation]) -> None:
        self.confirmations.extend(confirmations)


async def test_the_observer_hears_issued_reused_refused_signed_and_confirmed(service: IssueService) -> None:
    rec = _Recorder()
    service.observer = rec
    csr = make_csr("SN-0010")[1]
    first = await service.issue(IssueRequest("SN-0010", csr, station="st1", request_id="a"))
    again = await service.issue(IssueRequest("SN-0010", csr, station="st1", request_id="b", front_end="est"))
    with pytest.raises(IssuanceRefused):
        await service.issue(IssueRequest("SN-0011", b"not a csr", station="st1", request_id="c"))
    await service.confirm(first.cert_serial)
    kinds = [
        (o.cert_serial is not None, o.reused, o.error.code.name if o.error else None) for o in rec.outcomes
    ]
    assert kinds == [(True, False, None), (True, True, None), (False, False, "BAD_CSR")]
    assert [o.front_end for o in rec.outcomes] == ["station", "est", "station"]  # which front end asked
    assert again.cert_serial == first.cert_serial
    assert [n for n, _ in rec.sign_calls] == [1]  # one signing call; the retry was answered from the journal
    (conf,) = rec.confirmations
    assert conf.cert_serial == first.cert_serial and conf.station == "st1" and conf.lag_s >= 0
