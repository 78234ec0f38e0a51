"""Issuance first on the CPU: while issuance is at work (appliance/issuance/activity.py), the OCSP and CRL
requests of all network clients together are paced to [va] request_rate_while_issuing, on top of each client's
own request rate (docs/revocation.md "Load"). Cheap warm answers from many clients took a quarter of issuance's
rate before (bench/ocsp.py --mixed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from cryptography.x509 import ocsp

from appliance.errors import BirthlineError
from appliance.issuance.activity import Activity
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.production.policy import WorkOrderPolicy
from appliance.profiles import builtin_profiles
from appliance.va.fastpath import OcspListener
from appliance.va.ocsp import OcspResponder
from tests.appliance.conftest import make_csr
from tests.appliance.va.conftest import Va
from tests.appliance.va.test_line_bounds import _answer, _post
from tests.appliance.va.test_ocsp_load import GUARD_S, Clock, hold, until
from tests.ports import free_ports

S = ocsp.OCSPResponseStatus


def test_activity_is_busy_while_a_request_is_open_and_for_the_linger_after() -> None:
    clock = Clock()
    activity = Activity(linger_s=1.0, clock=clock)
    assert not activity.busy()  # nothing ever issued
    activity.begin()
    activity.begin()
    clock.now += 50.0
    assert activity.busy() and activity.open == 2  # open requests: busy however long they take
    activity.end()
    activity.end()
    assert activity.open == 0 and activity.busy()  # the line's next device is a moment away
    clock.now += 0.99
    assert activity.busy()
    clock.now += 0.02
    assert not activity.busy()
    with pytest.raises(RuntimeError):
        activity.end()


async def test_every_issuance_request_is_marked_from_its_queueing_to_its_answer(va: Va) -> None:
    clock = Clock()
    activity = Activity(linger_s=1.0, clock=clock)
    service = IssueService(
        va.journal, va.issuing, va.token.get_key(va.issuing.key_label), dict(builtin_profiles()),
        policy=WorkOrderPolicy("issuing"), audit=va.audit, activity=activity,
    )  # fmt: skip
    async with service:
        async with hold(va.token.thread) as gate:  # the HSM busy: the request waits at its signature
            issued = asyncio.ensure_future(
                service.issue(IssueRequest("SN-0060", make_csr("SN-0060")[1], station="fixture-1"))
            )
            await until(lambda: activity.open == 1)
            assert activity.busy()
        await issued
        gate.result(GUARD_S)
        assert activity.open == 0 and activity.busy()
        clock.now += 1.5
        assert not activity.busy()
        # A refused request is marked too, and ends: a refusal is work issuance did.
        with pytest.raises(BirthlineError):
            await service.issue(IssueRequest("SN-0061", b"not a CSR", station="fixture-1"))
        assert activity.open == 0 and activity.busy()


def _responder(va: Va, clock: Clock, issuing: list[bool], **kw: float) -> OcspResponder:
    return OcspResponder(
        va.journal, va.token, va.audit, request_rate_while_issuing=10, pace_max_delay_s=0.35, limit_clock=clock,
        issuing=lambda: issuing[0], **kw,
    )  # fmt: skip


def test_while_issuing_all_clients_together_are_paced_to_the_shared_rate(va: Va) -> None:
    clock, issuing = Clock(), [False]
    responder = _responder(va, clock, issuing)
    clients = [f"192.0.2.{i}" for i in range(1, 6)]
    # Issuance idle: each client within its own rate is answered at once, however many clients there are.
    assert [responder.pace(c) for c in clients] == [0.0] * 5
    issuing[0] = True
    # 10/s in bursts of 1 for all of them together: each next one held 100 ms longer, the fifth (400 ms) is past
    # pace_max_delay_s (350 ms): held that long and answered tryLater.
    delays = [responder.pace(c) for c in clients]
    assert delays[:4] == pytest.approx([0.0, 0.1, 0.2, 0.3]) and delays[4] is None
    counts = responder.yielded, responder.yielded_refused, responder.tarpitted, responder.paced
    assert counts == (3, 1, 1, 3)
    clock.now += 1.0  # the shared rate has caught up
    assert responder.pace(clients[4]) == 0.0
    issuing[0] = False
    assert [responder.pace(c) for c in clients] == [0.0] * 5  # idle again: no shared budget


def test_a_request_refused_for_its_own_rate_takes_nothing_from_the_others(va: Va) -> None:
    clock, issuing = Clock(), [True]
    responder = _responder(va, clock, issuing, request_rate=1, request_burst=1)
    assert responder.pace("192.0.2.1") == 0.0
    assert responder.pace("192.0.2.1") is None  # its own rate: a second early, past 350 ms
    assert responder.yielded_refused == 0
    # The shared budget it reserved was given back: the next client waits for one request ahead, not two.
    assert responder.pace("192.0.2.2") == pytest.approx(0.1)


async def _pipelined(va: Va, responder: OcspResponder, n: int) -> list[S]:
    async with OcspListener(responder, "127.0.0.1", free_ports(1)) as server:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(_post(va.request("SN-0001")) * n)
        statuses = []
        for _ in range(n):
            _, body = await asyncio.wait_for(_answer(reader), GUARD_S)
            statuses.append(ocsp.load_der_ocsp_response(body).response_status)
        writer.close()
        return statuses


async def test_the_line_listener_holds_warm_answers_while_issuance_is_at_work(va: Va) -> None:
    issuing = [True]
    responder = OcspResponder(
        va.journal, va.token, va.audit, request_rate_while_issuing=100, pace_max_delay_s=30,
        issuing=lambda: issuing[0],
    )  # fmt: skip
    await asyncio.to_thread(responder.load)
    # 30 pipelined requests for one certificate: all answered, in order, from the cache after the first; all but
    # the burst (10) held to the shared rate.
    assert await _pipelined(va, responder, 30) == [S.SUCCESSFUL] * 30
    assert responder.yielded >= 19 and responder.yielded_refused == 0 and responder.signed == 1
    issuing[0] = False
    before = responder.yielded
    assert await _pipelined(va, responder, 30) == [S.SUCCESSFUL] * 30
    assert responder.yielded == before  # issuance idle: answered at once


def test_config_key_reaches_the_responder(tmp_path: Path) -> None:
    from appliance.config import parse_config
    from appliance.errors import ConfigError

    base = {"hsm": {"module": "m", "token_label": "t", "pin_file": "p"}}
    settings = parse_config(
        {**base, "va": {"request_rate_while_issuing": 750}}, base_dir=tmp_path
    ).va.settings
    assert settings.request_rate_while_issuing == 750
    assert parse_config(base, base_dir=tmp_path).va.settings.request_rate_while_issuing == 2000
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "va": {"request_rate_while_issuing": 0}})
    assert {p.where for p in info.value.problems} == {"va.request_rate_while_issuing"}
    documented = (Path(__file__).parents[3] / "docs" / "configuration.md").read_text()
    assert "| `request_rate_while_issuing` |" in documented


async def test_crl_fetches_on_the_http_listener_yield_too(va: Va) -> None:
    """The aiohttp listener's requests (OCSP and CRL alike) pass the same shared budget: far over it while
    issuance is at work, a CRL fetch is held and answered 503 with Retry-After."""
    import aiohttp

    from appliance.va.http import VaServer, make_app
    from appliance.va.service import ValidationAuthority, VaSettings

    issuing = [True]
    settings = VaSettings(request_rate_while_issuing=1, pace_max_delay_s=0.01)
    authority = ValidationAuthority(va.journal, va.token, va.audit, settings, issuing=lambda: issuing[0])
    async with authority, VaServer(make_app(authority), "127.0.0.1", 0) as srv:
        statuses = []
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.get(srv.url + "/crl/issuing.crl") as r:
                    statuses.append((r.status, r.headers.get("Retry-After")))
            issuing[0] = False
            async with s.get(srv.url + "/crl/issuing.crl") as r:
                statuses.append((r.status, r.headers.get("Retry-After")))
    # A burst of one at 1/s: the first at once, the next two far over it; with issuance idle, at once again.
    assert statuses == [(200, None), (503, "1"), (503, "1"), (200, None)]
    assert authority.responder.yielded_refused == 2
