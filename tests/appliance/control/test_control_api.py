"""The control API against a real daemon: a real station over TLS, the real journal and audit log, the Unix
socket through the client a console uses."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from appliance.errors import ReasonCode
from appliance.issuance.policy import IssueRequest
from console import wire
from console.client import ControlClient, ControlError, Credentials
from stations.codes import Code
from stations.messages import Cert, Confirm, Confirmed, Enroll, Error
from stations.session import Authenticated
from tests.appliance.conftest import PRODUCTION_PASSWORD, make_csr
from tests.appliance.control.conftest import Floor
from tests.stations.station_link import Link, request_id

PW = PRODUCTION_PASSWORD


def _audit(floor: Floor, event: str) -> list[tuple[str, dict[str, Any]]]:
    j = floor.daemon.journal
    rows = j.call(
        lambda: j.conn.execute(
            "SELECT actor, data FROM audit WHERE event=? ORDER BY seq", (event,)
        ).fetchall()
    )
    return [(str(a), json.loads(d)) for a, d in rows]


class Stream:
    """An event stream read in the background, so the test can wait for the events it expects."""

    def __init__(self, client: ControlClient) -> None:
        self.events: list[dict[str, Any]] = []
        self._new = asyncio.Event()
        self._task = asyncio.create_task(self._read(client))

    async def _read(self, client: ControlClient) -> None:
        async for event in client.events():
            self.events.append(event)
            self._new.set()

    async def wait_for(self, pred: Any, timeout: float = 20.0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for e in self.events:
                    if pred(e):
                        return e
                self._new.clear()
                await self._new.wait()

    async def close(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


@pytest.fixture
async def api(floor: Floor) -> AsyncIterator[ControlClient]:
    async with floor.client() as c:
        yield c


async def test_event_stream_sees_connects_issuances_refusals_confirmations_and_alarms(
    floor: Floor, api: ControlClient
) -> None:
    bundle = await floor.station("st-ev")
    stream = Stream(api)
    try:
        await stream.wait_for(lambda e: e["type"] == wire.EVENT_HELLO)
        assert floor.daemon.lan_address is not None
        link = await Link.tls(floor.daemon.lan_address, bundle)
        assert isinstance(await link.handshake(), Authenticated)
        await stream.wait_for(
            lambda e: e["type"] == "station" and e["station"] == "st-ev" and e["state"] == "connected"
        )
        rid = request_id()
        cert = await link.request(Enroll(rid, "SN-0042", make_csr("SN-0042")[1]))
        assert isinstance(cert, Cert)
        issued = await stream.wait_for(lambda e: e["type"] == "issued")
        assert issued["station"] == "st-ev" and issued["device_serial"] == "SN-0042"
        assert issued["work_order"] == "WO-1" and issued["product"] == "sensor" and not issued["reused"]
        assert issued["front_end"] == "station"
        ok = await link.request(Confirm(rid, hashlib.sha256(cert.chain[0]).digest()))
        assert isinstance(ok, Confirmed)
        confirmed = await stream.wait_for(lambda e: e["type"] == "confirmed")
        assert confirmed["station"] == "st-ev" and confirmed["cert_serial"] == issued["cert_serial"]
        refused = await link.request(Enroll(request_id(), "OTHER-1", make_csr("OTHER-1")[1]))
        assert isinstance(refused, Error) and refused.code == Code.NOT_AUTHORISED
        ev = await stream.wait_for(lambda e: e["type"] == "refused")
        assert ev["code"] == "NOT_AUTHORISED" and ev["code_number"] == int(ReasonCode.NOT_AUTHORISED)
        assert (
            ev["device_serial"] == "OTHER-1" and "allowlist" in ev["reason"] and ev["front_end"] == "station"
        )
        assert floor.daemon.core is not None
        floor.daemon.core.alarms.raise_alarm("test.cause", "something broke", "fix it", severity="warning")
        alarm = await stream.wait_for(lambda e: e["type"] == "alarm" and e["action"] == "raised")
        assert alarm["alarm"]["cause"] == "test.cause" and alarm["alarm"]["advice"] == "fix it"
        await link.close()
        await stream.wait_for(lambda e: e["type"] == "station" and e["state"] == "disconnected")
        seqs = [e["seq"] for e in stream.events if e["type"] != wire.EVENT_HELLO]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    finally:
        await stream.close()


async def test_status_document_lists_lines_stations_work_orders_upstream_alarms_and_rate(
    floor: Floor, api: ControlClient
) -> None:
    bundle = await floor.station("st-status")
    assert floor.daemon.lan_address is not None
    link = await Link.tls(floor.daemon.lan_address, bundle)
    assert isinstance(await link.handshake(), Authenticated)
    rid = request_id()
    cert = await link.request(Enroll(rid, "SN-0043", make_csr("SN-0043")[1]))
    assert isinstance(cert, Cert)
    await link.request(Confirm(rid, hashlib.sha256(cert.chain[0]).digest()))
    await asyncio.sleep(0.6)  # the status document is cached for 0.5 s; this one must include the issuance
    status = await api.status()
    (line,) = status["lines"]
    assert line["name"] == "L1" and line["work_orders"] == ["WO-1"]
    st = next(s for s in line["stations"] if s["name"] == "st-status")
    assert st["connected"] and st["authenticated"] and st["state"] == "issuing" and st["issued"] == 1
    assert st["last_device_serial"] == "SN-0043" and st["paused"] is None
    (wo,) = status["work_orders"]
    assert (wo["id"], wo["planned"], wo["issued"], wo["confirmed"], wo["remaining"]) == ("WO-1", 50, 1, 1, 49)
    assert status["upstream"] == {"enabled": False, "link": "disabled"}
    assert status["hsm"]["state"] == "ok" and status["clock"]["trusted"]
    assert status["issuance"]["issued"] == 1 and len(status["issuance"]["per_minute_last_hour"]) == 60
    assert status["api"] == wire.API_VERSION
    await link.close()


async def test_pause_refuses_issuance_with_station_paused_and_resume_restores_it(
    floor: Floor, api: ControlClient
) -> None:
    bundle = await floor.station("st-pause")
    await api.login("olga", PW)
    await api.pause_station("st-pause", "jammed fixture")
    assert floor.daemon.lan_address is not None
    link = await Link.tls(floor.daemon.lan_address, bundle)
    assert isinstance(await link.handshake(), Authenticated)
    rid = request_id()
    csr = make_csr("SN-0044")[1]
    refused = await link.request(Enroll(rid, "SN-0044", csr))
    assert isinstance(refused, Error) and refused.code == Code.STATION_PAUSED == 19
    assert "paused" in refused.text and "olga" in refused.text
    await asyncio.sleep(0.6)
    st = next(s for s in (await api.status())["lines"][0]["stations"] if s["name"] == "st-pause")
    assert st["state"] == "paused" and st["paused"]["paused_by"] == "olga"
    await api.resume_station("st-pause")
    again = await link.request(Enroll(rid, "SN-0044", csr))  # the same request, once resumed
    assert isinstance(again, Cert)
    (paused,) = _audit(floor, "station.pause")
    assert paused[0] == "olga" and paused[1]["station"] == "st-pause" and paused[1]["via"] == "console"
    assert [a for a, _ in _audit(floor, "station.resume")] == ["olga"]
    await link.close()


# (action, fields, role that may not, role that may); privileged actions are confirmed by that role's person.
CASES: list[tuple[str, dict[str, str], str, str]] = [
    (wire.ACTION_STATION_PAUSE, {"station": "fixture-1"}, "audrey", "olga"),
    (wire.ACTION_STATION_RESUME, {"station": "fixture-1"}, "audrey", "olga"),
    (wire.ACTION_ALARM_ACKNOWLEDGE, {"cause": "test.ack"}, "audrey", "olga"),
    (wire.ACTION_WORKORDER_CLOSE, {"work_order": "WO-2"}, "olga", "sam"),
    (wire.ACTION_WORKORDER_ACTIVATE, {"work_order": "WO-3"}, "olga", "alice"),
    (wire.ACTION_DEVICE_REWORK, {"device_serial": "SN-0050", "reason": "bad flash"}, "alice", "sam"),
    (wire.ACTION_DEVICE_SCRAP, {"device_serial": "SN-0051", "reason": "dropped"}, "alice", "sam"),
]
AUDIT_EVENT = {
    wire.ACTION_WORKORDER_CLOSE: "workorder.close",
    wire.ACTION_WORKORDER_ACTIVATE: "workorder.activate",
}


async def _prepare(floor: Floor) -> None:
    """What the actions act on: an alarm, work orders WO-2 (active) and WO-3 (draft), devices SN-0050/51."""
    from appliance.production import store
    from appliance.production.model import WorkOrderSpec
    from appliance.production.users import Role, User

    d = floor.daemon
    assert d.core is not None and d.enroller is not None
    d.core.alarms.raise_alarm("test.ack", "a condition", "acknowledge it", severity="warning")
    alice = User("alice", Role.ADMINISTRATOR)
    for wo, activate in (("WO-2", True), ("WO-3", False)):
        spec = WorkOrderSpec(wo, "sensor", 5, ("L1",), serials=(f"{wo}-A",))
        await asyncio.to_thread(store.add_work_order, d.journal, d.core.audit, alice, spec, activate=activate)
    from appliance.issuance.policy import IssueRequest

    for serial in ("SN-0050", "SN-0051"):
        await d.enroller.service.issue(IssueRequest(serial, make_csr(serial)[1], station="fixture-1"))


@pytest.mark.parametrize(("action", "fields", "below", "allowed"), CASES, ids=[c[0] for c in CASES])
async def test_each_action_is_refused_below_its_role_and_audited_under_the_person(
    floor: Floor, api: ControlClient, action: str, fields: dict[str, str], below: str, allowed: str
) -> None:
    await _prepare(floor)
    if action == wire.ACTION_STATION_RESUME:
        await api.login("olga", PW)
        await api.pause_station("fixture-1")
        await api.logout()
    privileged = action in wire.PRIVILEGED
    # Refused: the role below (the session's person, or the person confirming a privileged action).
    await api.login(below if not privileged else "olga", PW)
    confirm = Credentials(below, PW) if privileged else None
    with pytest.raises(ControlError) as refused:
        await api.action(action, fields, confirm)
    assert refused.value.status == 403 and refused.value.code == wire.ERR_FORBIDDEN
    (entry,) = [e for e in _audit(floor, "control.refused") if e[1]["action"] == action]
    assert entry[0] == below and entry[1]["via"] == "console"
    if privileged:
        with pytest.raises(ControlError) as unconfirmed:
            await api.action(action, fields)  # no password asked again: refused before anything
        assert unconfirmed.value.status == 400 and "privileged" in unconfirmed.value.message
        with pytest.raises(ControlError) as wrong:
            await api.action(action, fields, Credentials(allowed, "not the password"))
        assert wrong.value.status == 401 and wrong.value.code == wire.ERR_LOGIN_FAILED
    # Allowed: done, and audited under the person who was authorised (the confirming one when privileged).
    await api.logout()
    await api.login("olga" if privileged else allowed, PW)
    result = await api.action(action, fields, Credentials(allowed, PW) if privileged else None)
    assert result["ok"]
    event = AUDIT_EVENT.get(action, action)
    entries = _audit(floor, event)
    assert entries, event
    actor, data = entries[-1]
    assert (
        actor == allowed
        and data["via"] == "console"
        and data["session"] == ("olga" if privileged else allowed)
    )


async def test_actions_need_a_session_and_a_logout_ends_it(floor: Floor, api: ControlClient) -> None:
    with pytest.raises(ControlError) as none:
        await api.pause_station("fixture-1")
    assert none.value.status == 401 and none.value.code == wire.ERR_UNAUTHENTICATED
    with pytest.raises(ControlError) as bad:
        await api.login("olga", "wrong password")
    assert bad.value.code == wire.ERR_LOGIN_FAILED
    assert [d["why"] for _, d in _audit(floor, "login.failure") if d["user"] == "olga"] == ["wrong password"]
    # A name as typed is never repeated in a refusal (a password typed into the name field would be shown).
    with pytest.raises(ControlError) as typo:
        await api.login("Sup3rSecretPW", "x")
    assert typo.value.code == wire.ERR_LOGIN_FAILED and "Sup3rSecretPW" not in typo.value.message
    session = await api.login("olga", PW)
    assert session["user"] == "olga" and session["role"] == "operator" and "token" not in session
    assert (await api.session())["user"] == "olga"
    token = api.token
    await api.logout()
    api.token = token
    with pytest.raises(ControlError) as ended:
        await api.session()
    assert ended.value.status == 401


async def test_passwords_never_travel_in_a_url_or_reach_the_log(
    floor: Floor, api: ControlClient, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "Hunter2-never-logged"
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ControlError) as in_url:
        await api._call("POST", f"{wire.LOGIN}?user=olga&password={secret}", {})
    assert in_url.value.status == 400 and "URL" in in_url.value.message
    with pytest.raises(ControlError):
        await api.login("olga", secret)
    await api.login("olga", PW)
    with pytest.raises(ControlError):
        await api.close_work_order("WO-1", confirm=Credentials("sam", secret))
    assert secret not in caplog.text
    j = floor.daemon.journal
    dump = j.call(lambda: "\n".join(str(r) for r in j.conn.execute("SELECT * FROM audit").fetchall()))
    assert secret not in dump and PW not in dump


async def test_bad_bodies_are_refused_with_a_reason(floor: Floor, api: ControlClient) -> None:
    await api.login("olga", PW)
    for body, status in (({"station": 5}, 400), ({"station": "x\x1b[2J"}, 400), ({"station": "nope"}, 404),
                         ({"station": "s" * 500}, 400)):  # fmt: skip
        with pytest.raises(ControlError) as exc:
            await api.action(wire.ACTION_STATION_PAUSE, body)
        assert exc.value.status == status, body
    with pytest.raises(ControlError) as large:
        await api.action(wire.ACTION_STATION_PAUSE, {"station": "fixture-1", "reason": "x" * 40_000})
    assert large.value.status == 413 and large.value.code == wire.ERR_TOO_LARGE
    with pytest.raises(ControlError) as unknown:
        await api.action("station.explode", {"station": "fixture-1"})
    assert unknown.value.status == 404
    await api.pause_station("fixture-1")
    with pytest.raises(ControlError) as twice:
        await api.pause_station("fixture-1")
    assert twice.value.status == 409 and twice.value.code == wire.ERR_CONFLICT


async def test_a_retry_counts_under_its_certificates_work_order_and_product(
    floor: Floor, api: ControlClient
) -> None:
    """A retry answered with the stored certificate names the work order and product it was issued under (in
    its event and birthline_reused_total): product is empty only for a refusal before a work order was chosen."""
    d = floor.daemon
    assert d.enroller is not None and d.control is not None
    csr = make_csr("SN-0077")[1]
    stream = Stream(api)
    try:
        await stream.wait_for(lambda e: e["type"] == wire.EVENT_HELLO)
        first = await d.enroller.service.issue(IssueRequest("SN-0077", csr, station="fixture-1"))
        again = await d.enroller.service.issue(IssueRequest("SN-0077", csr, station="fixture-1"))
        assert again.reused and again.certificate == first.certificate
        retry = await stream.wait_for(lambda e: e["type"] == "issued" and e["reused"])
        assert retry["work_order"] == "WO-1" and retry["product"] == "sensor", retry
    finally:
        await stream.close()
    assert d.control.hub.stats.reused == {("fixture-1", "sensor"): 1}
