"""The dashboard against a real daemon, driven by Textual's Pilot: what it shows follows the line, and every
action goes through the control API under the person who logged in (or the supervisor who confirmed)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest
from textual.widgets import Input

from appliance.errors import BirthlineError
from appliance.issuance.policy import IssueRequest
from appliance.production import store
from appliance.production.model import WorkOrderSpec
from appliance.production.users import Role, User
from console.dashboard.app import DashboardApp
from console.dashboard.link import Link
from console.dashboard.model import LOG_MAX
from console.dashboard.screens import FormScreen
from console.dashboard.widgets import AlarmTable, EventLog, StationGrid, WorkOrderTable
from stations.messages import Cert, Confirm, Enroll
from stations.session import Authenticated
from tests.appliance.conftest import PRODUCTION_PASSWORD, make_csr
from tests.appliance.control.conftest import Floor
from tests.console.pilot import fill, screen_text, until
from tests.stations.station_link import Link as StationLink
from tests.stations.station_link import request_id

PW = PRODUCTION_PASSWORD
SIZE = (110, 32)


def _audit(floor: Floor, event: str) -> list[tuple[str, dict[str, Any]]]:
    j = floor.daemon.journal
    rows = j.call(
        lambda: j.conn.execute(
            "SELECT actor, data FROM audit WHERE event=? ORDER BY seq", (event,)
        ).fetchall()
    )
    return [(str(a), json.loads(d)) for a, d in rows]


@pytest.fixture
async def app(floor: Floor) -> AsyncIterator[DashboardApp]:
    yield DashboardApp(Link(floor.socket, poll_s=0.2), refresh_s=0.05)


async def _select(pilot: Any, table: StationGrid | WorkOrderTable | AlarmTable, key: str) -> None:
    """Choose a row (once the table shows it: it follows the model at the next refresh)."""
    await until(pilot, lambda: key in table._keys, f"{key} in the table")
    table.move_cursor(row=table._keys.index(key))
    table.focus()


async def _login(pilot: Any, user: str = "olga") -> None:
    await until(pilot, lambda: isinstance(pilot.app.screen, FormScreen), "the login form")
    await fill(pilot, user=user, password=PW)
    await until(pilot, lambda: pilot.app.api.token is not None, f"{user} logged in")


async def test_the_screen_follows_issuances_refusals_and_connects(floor: Floor, app: DashboardApp) -> None:
    bundle = await floor.station("st-dash")
    async with app.run_test(size=SIZE) as pilot:
        await until(
            pilot, lambda: app.model.connected and "st-dash" in screen_text(app), "the station listed"
        )
        assert "disconnected" in screen_text(app).split("st-dash")[1].splitlines()[0]
        assert floor.daemon.lan_address is not None
        link = await StationLink.tls(floor.daemon.lan_address, bundle)
        assert isinstance(await link.handshake(), Authenticated)
        rid = request_id()
        cert = await link.request(Enroll(rid, "SN-0061", make_csr("SN-0061")[1]))
        assert isinstance(cert, Cert)
        await link.request(Confirm(rid, hashlib.sha256(cert.chain[0]).digest()))
        await link.request(Enroll(request_id(), "OUTSIDE-1", make_csr("OUTSIDE-1")[1]))

        def row() -> str:
            text = screen_text(app)
            return text.split("st-dash", 1)[1].splitlines()[0] if "st-dash" in text else ""

        # One certificate, then a refusal: the station is in error, its last refusal's code shown.
        await until(pilot, lambda: "OUTSIDE-1" in row() and "NOT_AUTHORISED" in row() and "error" in row(),
                    "the refusal in the grid")  # fmt: skip
        assert " 1 " in row()
        st = app.model.stations["st-dash"]
        assert (st.issued, st.refused, st.confirmed, st.connected) == (1, 1, 1, True)
        await pilot.press("3")  # the log: the issuance and the refusal with its reason
        await until(pilot, lambda: "OUTSIDE-1 NOT_AUTHORISED: device serial 'OUTSIDE-1' is not in" in screen_text(app),
                    "the refusal's reason in the log")  # fmt: skip
        text = screen_text(app)
        assert "issued" in text and "SN-0061" in text and "WO-1" in text
        assert "refused" in text and "NOT_AUTHORISED" in text
        await link.close()
        await until(pilot, lambda: app.model.stations["st-dash"].state == "disconnected", "the disconnect")


async def test_pause_and_resume_from_the_grid_as_the_person_logged_in(
    floor: Floor, app: DashboardApp
) -> None:
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "fixture-1" in app.model.stations, "the station listed")
        await _select(pilot, app.query_one(StationGrid), "fixture-1")
        await pilot.press("p")
        await _login(pilot)  # asked once, at the first action
        await until(pilot, lambda: "Pause station fixture-1" in screen_text(app), "the pause form")
        await fill(pilot, reason="jammed fixture")
        await until(pilot, lambda: floor.daemon.enroller is not None
                    and floor.daemon.enroller.service.pauses.get("fixture-1") is not None, "paused")  # fmt: skip
        await until(pilot, lambda: app.model.stations["fixture-1"].state == "paused", "shown paused")
        ((actor, data),) = _audit(floor, "station.pause")
        assert actor == "olga" and data["reason"] == "jammed fixture" and data["via"] == "console"
        # The paused station's requests are refused with their reason code, which the grid shows.
        assert floor.daemon.enroller is not None
        with pytest.raises(BirthlineError) as refused:
            await floor.daemon.enroller.service.issue(
                IssueRequest("SN-0062", make_csr("SN-0062")[1], station="fixture-1")
            )
        assert refused.value.code.name == "STATION_PAUSED"
        await until(pilot, lambda: "STATION_PAUSED" in screen_text(app).split("fixture-1", 1)[1].splitlines()[0],
                    "the refusal code in the grid")  # fmt: skip
        await pilot.press("p")  # logged in already: resumed at once
        await until(pilot, lambda: app.model.stations["fixture-1"].paused is None, "resumed")
        assert [a for a, _ in _audit(floor, "station.resume")] == ["olga"]
        assert "olga (operator)" in screen_text(app)


async def test_acknowledge_the_chosen_alarm(floor: Floor, app: DashboardApp) -> None:
    assert floor.daemon.core is not None
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.connected, "connected")
        floor.daemon.core.alarms.raise_alarm("test.dashboard", "the test's condition", "look at it",
                                             severity="critical")  # fmt: skip
        await until(pilot, lambda: "test.dashboard" in app.model.alarms, "the alarm listed")
        await pilot.press("2")
        await until(pilot, lambda: "What to do: look at it" in screen_text(app), "the alarm's advice")
        assert "1 critical" in screen_text(app)
        await _select(pilot, app.query_one(AlarmTable), "test.dashboard")
        await pilot.press("a")
        await _login(pilot)
        await until(
            pilot, lambda: app.model.alarms["test.dashboard"].acknowledged_by == "olga", "acknowledged"
        )
        (alarm,) = [a for a in floor.daemon.core.alarms.active() if a.cause == "test.dashboard"]
        assert alarm.acknowledged_by == "olga"
        ((actor, data),) = _audit(floor, "alarm.acknowledge")
        assert actor == "olga" and data["cause"] == "test.dashboard"


async def _work_orders(floor: Floor) -> None:
    d = floor.daemon
    assert d.core is not None
    alice = User("alice", Role.ADMINISTRATOR)
    for wo, activate in (("WO-7", True), ("WO-8", False)):
        spec = WorkOrderSpec(wo, "sensor", 5, ("L1",), serials=(f"{wo}-A",))
        await asyncio.to_thread(store.add_work_order, d.journal, d.core.audit, alice, spec, activate=activate)


async def test_activate_and_close_a_work_order_confirmed_by_a_supervisor(
    floor: Floor, app: DashboardApp
) -> None:
    await _work_orders(floor)
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "WO-8" in app.model.work_orders, "the work orders listed")
        await pilot.press("1")
        await _select(pilot, app.query_one(WorkOrderTable), "WO-8")
        await pilot.press("o")
        await _login(pilot)  # olga runs the line; sam, a supervisor, confirms
        await until(pilot, lambda: "Activate work order WO-8" in screen_text(app), "the confirmation form")
        await fill(pilot, user="sam", password=PW)
        await until(pilot, lambda: app.model.work_orders["WO-8"].state == "active", "WO-8 active")
        await _select(pilot, app.query_one(WorkOrderTable), "WO-7")
        await pilot.press("x")
        await until(pilot, lambda: "Close work order WO-7" in screen_text(app), "the confirmation form")
        await fill(pilot, user="sam", password=PW)
        await until(pilot, lambda: app.model.work_orders["WO-7"].state == "closed", "WO-7 closed")
        for event, wo in (("workorder.activate", "WO-8"), ("workorder.close", "WO-7")):
            ((actor, data),) = [
                e for e in _audit(floor, event) if e[1].get("work_order", e[1].get("id")) == wo
            ]
            assert actor == "sam" and data["session"] == "olga" and data["via"] == "console", (event, data)


async def test_a_role_below_is_refused_and_a_wrong_password_asked_again(
    floor: Floor, app: DashboardApp, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    await _work_orders(floor)
    wrong = "Hunter2-not-the-password"
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: "WO-7" in app.model.work_orders, "the work orders listed")
        await pilot.press("1")
        await _select(pilot, app.query_one(WorkOrderTable), "WO-7")
        await pilot.press("x")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), "the login form")
        await fill(pilot, user="olga", password=wrong)
        await until(pilot, lambda: "wrong name or password" in screen_text(app), "the login refused")
        assert isinstance(app.screen, FormScreen) and wrong not in screen_text(app)
        assert app.screen.query_one("#f-password").value == ""  # typed again, never kept
        await fill(pilot, password=PW)
        await until(pilot, lambda: "Close work order WO-7" in screen_text(app), "the confirmation form")
        await fill(pilot, user="olga", password=PW)  # an operator may not close a work order
        await until(
            pilot, lambda: "your role does not allow this" in screen_text(app), "refused for the role"
        )
        assert app.model.work_orders["WO-7"].state == "active"
        await pilot.press("escape")
    (refusal,) = [d for a, d in _audit(floor, "control.refused") if a == "olga"]
    assert refusal["action"] == "workorder.close"
    assert wrong not in caplog.text and PW not in caplog.text


async def test_scrap_and_rework_a_device_confirmed_by_a_supervisor(floor: Floor, app: DashboardApp) -> None:
    d = floor.daemon
    assert d.enroller is not None
    for serial in ("SN-0070", "SN-0071"):
        await d.enroller.service.issue(IssueRequest(serial, make_csr(serial)[1], station="fixture-1"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.stations.get("fixture-1") is not None
                    and app.model.stations["fixture-1"].last_device_serial == "SN-0071", "the last device")  # fmt: skip
        await _select(pilot, app.query_one(StationGrid), "fixture-1")
        await pilot.press("s")
        await _login(pilot)
        await until(pilot, lambda: "Scrap a device" in screen_text(app), "the scrap form")
        # The chosen station's last device is offered; the person may name another.
        assert app.screen.query_one("#f-device").value == "SN-0071"
        await fill(pilot, device="SN-0070", reason="dropped", user="sam", password=PW)
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), "scrapped")
        await pilot.press("r")
        await until(pilot, lambda: "Approve a rework" in screen_text(app), "the rework form")
        await fill(pilot, reason="bad flash", user="sam", password=PW)
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), "reworked")
    states = dict(d.journal.call(lambda: d.journal.conn.execute(
        "SELECT device_serial, state FROM issuance WHERE device_serial IN ('SN-0070', 'SN-0071')").fetchall()))  # fmt: skip
    assert states == {"SN-0070": "scrapped", "SN-0071": "reworked"}
    for event, serial, reason in (
        ("device.scrap", "SN-0070", "dropped"),
        ("device.rework", "SN-0071", "bad flash"),
    ):
        ((actor, data),) = _audit(floor, event)
        assert actor == "sam" and data["session"] == "olga" and data["device_serial"] == serial
        assert data["reason"] == reason


async def test_help_keys_and_the_mouse(floor: Floor, app: DashboardApp) -> None:
    """? opens the help and Escape closes it; a click on a tab shows its panel, a click on a row chooses it, a
    click on a form's button submits it."""
    async with app.run_test(size=SIZE) as pilot:
        await until(
            pilot, lambda: "fixture-1" in app.model.stations and "WO-1" in screen_text(app), "the line"
        )
        await pilot.press("question_mark")
        await until(pilot, lambda: "Station states" in screen_text(app), "the help")
        await pilot.press("escape")
        await until(pilot, lambda: "Station states" not in screen_text(app), "the help closed")
        await pilot.click("#tab-alarms")
        await until(pilot, lambda: "Acknowledged" in screen_text(app), "the alarms panel, clicked")
        await pilot.click("#tab-log")
        await until(pilot, lambda: "connected to the daemon" in screen_text(app), "the log panel, clicked")
        grid = app.query_one(StationGrid)
        row = grid._keys.index("fixture-1")
        await pilot.click(StationGrid, offset=(20, row + 1))  # below the header line
        assert grid.cursor_row == row
        await pilot.press("p")
        await until(pilot, lambda: isinstance(app.screen, FormScreen), "the login form")
        app.screen.query_one("#f-user", Input).value = "olga"
        app.screen.query_one("#f-password", Input).value = PW
        await pilot.click("#ok")
        await until(
            pilot, lambda: "Pause station fixture-1" in screen_text(app), "the pause form, after a click"
        )
        await pilot.click("#cancel")
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), "cancelled")
        assert (
            floor.daemon.enroller is not None
            and floor.daemon.enroller.service.pauses.get("fixture-1") is None
        )


async def test_a_hidden_log_holds_no_more_than_the_model_keeps(floor: Floor, app: DashboardApp) -> None:
    """At 80x24 the log is a tab, hidden while another is shown. A busy line must not pile its events up there:
    a hidden RichLog keeps every write aside, unbounded, until it is first shown (that grew the dashboard by
    about 20 MB a minute at 300 requests/s). The log is written while shown, and rewritten from the model's
    bounded log when it is shown again."""
    assert floor.daemon.enroller is not None
    service = floor.daemon.enroller.service
    csr = make_csr("x")[1]
    n = LOG_MAX + 300
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.model.connected, "connected")
        log = app.query_one(EventLog)
        for i in range(n):  # refused (outside the work order): an event each, cheap
            with pytest.raises(BirthlineError):
                await service.issue(IssueRequest(f"OUT-{i}", csr, station="fixture-1"))
        await until(pilot, lambda: app.model.stations["fixture-1"].refused >= n, "every refusal counted")
        await pilot.pause(0.3)
        assert len(log._deferred_renders) == 0 and len(log.lines) == 0  # nothing written while hidden
        await pilot.press("3")
        await until(pilot, lambda: f"OUT-{n - 1}" in screen_text(app), "the newest refusal, once shown")
        assert LOG_MAX - 10 <= len(log.lines) <= LOG_MAX


async def test_enter_on_the_reason_goes_to_the_password_not_the_prefilled_name(
    floor: Floor, app: DashboardApp
) -> None:
    """A supervisor logged in types the reason and Enter: the cursor is in the masked password field (the name is
    filled in already), so a password is never typed into the visible name field; a refusal never repeats the
    name as typed (it might be a password)."""
    d = floor.daemon
    assert d.enroller is not None
    await d.enroller.service.issue(IssueRequest("SN-0090", make_csr("SN-0090")[1], station="fixture-1"))
    async with app.run_test(size=SIZE) as pilot:
        await until(pilot, lambda: app.model.stations.get("fixture-1") is not None
                    and app.model.stations["fixture-1"].last_device_serial == "SN-0090", "the last device")  # fmt: skip
        await _select(pilot, app.query_one(StationGrid), "fixture-1")
        await pilot.press("r")
        await _login(pilot, "sam")
        await until(pilot, lambda: "Approve a rework" in screen_text(app), "the rework form")
        form = app.screen
        assert form.query_one("#f-user", Input).value == "sam"
        assert form.focused is form.query_one("#f-reason", Input)
        await pilot.press(*"bad flash", "enter")
        assert form.focused is form.query_one("#f-password", Input)
        # A password typed where the name goes is refused without being shown back.
        secret = "Sup3rSecretPW-typed-in-the-name"
        form.query_one("#f-user", Input).value = secret
        form.query_one("#f-password", Input).focus()
        await pilot.press(*"x", "enter")
        await until(pilot, lambda: "wrong name or password" in screen_text(app), "refused")
        form.query_one("#f-user", Input).value = "sam"
        form.query_one("#f-password", Input).focus()
        await pilot.pause()
        assert "wrong name or password" in screen_text(app) and secret not in screen_text(app)
        await pilot.press(*PW, "enter")
        await until(pilot, lambda: not isinstance(app.screen, FormScreen), "reworked")
    ((actor, data),) = _audit(floor, "device.rework")
    assert actor == "sam" and data["device_serial"] == "SN-0090" and data["reason"] == "bad flash"
