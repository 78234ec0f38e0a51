"""`birthline dashboard`: the operator's screen of a running appliance (docs/dashboard.md).

Its own process, talking only to the control API (docs/control-api.md): it reads the status document and the
event stream into a Model, redraws what changed a few times a second, and sends the few actions people take.
Closing it, or it crashing, changes nothing for issuance. When the daemon goes away the screen says so and the
link connects again by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, ClassVar, Final

from rich.text import Text
from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.css.query import NoMatches
from textual.widgets import DataTable, Footer, Static, Tab, Tabs

from console import wire
from console.client import ControlClient, ControlError, ControlUnavailable, Credentials
from console.dashboard.inert import inert
from console.dashboard.link import Feed
from console.dashboard.model import Model
from console.dashboard.screens import Field, FormScreen, HelpScreen
from console.dashboard.widgets import (
    AlarmTable,
    EventLog,
    StationGrid,
    SummaryBar,
    WorkOrderTable,
    alarm_detail,
)

REFRESH_S: Final = 0.2  # the screen follows the model at most this late
SCREENSHOT_WAIT_S: Final = 30.0  # --screenshot gives up after this long without the daemon's status
WIDE: Final = 140  # columns from which every panel is shown at once, with more detail
PANELS: Final = ("orders", "alarms", "log")

ERROR_TEXT: Final = {
    wire.ERR_LOGIN_FAILED: "wrong name or password, or the account is locked or disabled",
    wire.ERR_FORBIDDEN: "your role does not allow this",
    wire.ERR_UNAUTHENTICATED: "not logged in (the session ended)",
}


def explain(exc: ControlError) -> str:
    """A refusal as one line for the person at the screen (the daemon's message is shown inert)."""
    if isinstance(exc, ControlUnavailable):
        return "not connected to the daemon: try again once the dashboard shows it connected"
    known = ERROR_TEXT.get(exc.code)
    return f"{known} ({exc.message})" if known else f"{exc.code}: {exc.message}"


class DashboardApp(App[None]):
    TITLE = "Birthline"
    ENABLE_COMMAND_PALETTE = False
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (WIDE, "-wide")]  # noqa: RUF012 - as Textual declares it
    CSS = """
    Screen { layout: vertical; }
    StationGrid { height: auto; max-height: 50%; min-height: 3; }
    Tabs { height: 2; }
    #lower { height: 1fr; }
    #left { width: 1fr; }
    #orders-panel, #alarms-panel, #log-panel { height: 1fr; width: 1fr; }
    WorkOrderTable, AlarmTable { height: 1fr; }
    #advice { height: auto; max-height: 7; padding: 0 1; border-top: solid $primary-darken-2; }
    AlarmTable { min-height: 3; }
    EventLog { height: 1fr; overflow-x: hidden; }
    #lower.-orders #alarms-panel, #lower.-orders #log-panel { display: none; }
    #lower.-alarms #orders-panel, #lower.-alarms #log-panel { display: none; }
    #lower.-log #left { display: none; }
    Screen.-wide Tabs { display: none; }
    Screen.-wide StationGrid { max-height: 45%; }
    Screen.-wide #lower #left { display: block; }
    Screen.-wide #lower #orders-panel { display: block; height: 1fr; }
    Screen.-wide #lower #alarms-panel { display: block; height: 1fr; }
    Screen.-wide #lower #log-panel { display: block; width: 1fr; border-left: solid $primary-darken-2; }
    .panel-title { display: none; height: 1; text-style: bold; background: $primary-darken-2; padding: 0 1; }
    Screen.-wide .panel-title { display: block; }
    Screen.-stale StationGrid, Screen.-stale #lower { text-opacity: 60%; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("p", "pause", "Pause/resume"),
        # Acting on the chosen alarm or work order works from anywhere; the footer shows these keys while their
        # table has the focus (their own bindings).
        Binding("a", "acknowledge", "Acknowledge", show=False),
        Binding("o", "activate_order", "Activate", show=False),
        Binding("x", "close_order", "Close", show=False),
        Binding("question_mark,f1", "help", "Help"),
        Binding("l", "login", "Log in/out"),
        Binding("s", "scrap", "Scrap"),
        Binding("r", "rework", "Rework"),
        Binding("1", "panel('orders')", "Work orders", show=False),
        Binding("2", "panel('alarms')", "Alarms", show=False),
        Binding("3", "panel('log')", "Log", show=False),
        Binding("q", "quit", "Quit"),
        Binding("ctrl+c", "quit", "Quit", show=False, priority=True),
    ]

    def __init__(
        self, feed: Feed, *, user: str | None = None, refresh_s: float = REFRESH_S,
        screenshot: tuple[Path, float, str] | None = None, screenshot_wait_s: float = SCREENSHOT_WAIT_S,
    ) -> None:  # fmt: skip
        super().__init__()
        self.feed = feed
        self.model = Model()
        self.default_user = user
        self.refresh_s = refresh_s
        self.screenshot = screenshot
        self.screenshot_wait_s = screenshot_wait_s
        self._dirty = True
        self._view_size: tuple[int, int] | None = None
        self._panel = "orders"
        self._log_behind = False  # the log panel was hidden while entries came: rewrite it when shown
        self.refreshes = 0  # how many times the view was brought up to date (tests, the bench)

    # -- layout ---------------------------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield SummaryBar()
        yield StationGrid(id="stations")
        tabs = Tabs(*(Tab(label, id=f"tab-{p}") for p, label in zip(PANELS, ("1 Work orders", "2 Alarms", "3 Log"),
                                                                       strict=True)))  # fmt: skip
        tabs.can_focus = False
        yield tabs
        with Horizontal(id="lower", classes="-orders"):
            with Vertical(id="left"):
                with Vertical(id="orders-panel"):
                    yield Static("Work orders", classes="panel-title")
                    yield WorkOrderTable(id="orders")
                with Vertical(id="alarms-panel"):
                    yield Static("Alarms", classes="panel-title", id="alarms-title")
                    yield AlarmTable(id="alarms")
                    yield Static(id="advice")
            with Vertical(id="log-panel"):
                yield Static("Log", classes="panel-title")
                yield EventLog(id="log", max_lines=500, markup=False, wrap=False, auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        self.run_worker(
            self.feed.run(self.model, self._changed), name="link", group="link", exit_on_error=True
        )
        self.set_interval(self.refresh_s, self.refresh_view)
        self.query_one(StationGrid).focus()
        if self.screenshot is not None:
            self.run_worker(self._shoot(*self.screenshot), name="screenshot")

    def _changed(self) -> None:
        self._dirty = True

    # -- following the model --------------------------------------------------------------------------------------
    def refresh_view(self) -> None:
        """Bring every widget up to date with the model (called every refresh_s; cheap when nothing changed)."""
        try:
            self._refresh_view()
        except NoMatches:  # the app is closing: its widgets are already gone, the timer not yet
            return

    def _refresh_view(self) -> None:
        size = (self.size.width, self.size.height)
        relayout = size != self._view_size
        if not self._dirty and not relayout:
            return
        self._dirty = False
        self._view_size = size
        wide = size[0] >= WIDE
        m = self.model
        structure, stations, orders, alarms, _summary = m.take_changes()
        grid = self.query_one(StationGrid)
        if structure or relayout:
            grid.rebuild(m, size[0])
        elif stations:
            grid.update_stations(m, stations)
        half = size[0] // 2 if wide else size[0]  # #left's share of a wide screen
        if orders or relayout:
            self.query_one(WorkOrderTable).rebuild(m, half)
        if alarms or relayout:
            self.query_one(AlarmTable).rebuild(m, half)
            self._show_advice()
            count = len(m.alarms)
            label = f"2 Alarms ({count})" if count else "2 Alarms"
            self.query_one("#tab-alarms", Tab).label = label
            self.query_one("#alarms-title", Static).update(f"Alarms ({count})" if count else "Alarms")
        self._follow_log(relayout)
        session = self.api.user if self.api is not None else None
        self.query_one(SummaryBar).show(
            m, session.get("user") if session else None, session.get("role") if session else None
        )
        self.default_screen.set_class(not m.connected and m.ever_connected, "-stale")
        self.refreshes += 1

    def _follow_log(self, relayout: bool) -> None:
        """Write the model's new log entries to the log, while it is shown. A hidden RichLog (another tab) keeps
        every write aside until it is first shown, without its max_lines bound: so while it is hidden nothing is
        written, and once it is shown again it is rewritten from the model's log (LOG_MAX entries)."""
        m = self.model
        new, skipped = m.take_log()
        log = self.query_one(EventLog)
        shown = self._panel == "log" or bool(self._view_size and self._view_size[0] >= WIDE)
        if not shown:
            self._log_behind = self._log_behind or bool(new or skipped)
            return
        if self._log_behind or relayout:
            log.clear()
            log.add(list(m.log), 0)
            self._log_behind = False
        elif new or skipped:
            log.add(new, skipped)

    def _show_advice(self) -> None:
        self.query_one("#advice", Static).update(
            alarm_detail(self.query_one(AlarmTable).selected(self.model))
        )

    @on(DataTable.RowHighlighted, "#alarms")
    def _alarm_highlighted(self) -> None:
        self._show_advice()

    @on(Tabs.TabActivated)
    def _tab(self, event: Tabs.TabActivated) -> None:
        panel = (event.tab.id or "").removeprefix("tab-")
        if panel in PANELS:
            self._select_panel(panel)

    def _select_panel(self, panel: str) -> None:
        self._panel = panel
        self._dirty = True  # the log, if it is the one now shown, catches up at the next refresh
        lower = self.query_one("#lower")
        for p in PANELS:
            lower.set_class(p == panel, f"-{p}")

    def action_panel(self, panel: str) -> None:
        self.query_one(Tabs).active = f"tab-{panel}"
        self._select_panel(panel)
        self.query_one(f"#lower #{panel}").focus()

    def action_help(self) -> None:
        self.push_screen(HelpScreen())

    async def action_quit(self) -> None:
        api = self.api
        if api is not None and api.token is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(2.0):
                    await api.logout()  # end the console session rather than leave it open for its lifetime
        self.exit()

    async def _shoot(self, path: Path, after: float, key: str) -> None:
        """--screenshot: wait for the first status document and `after` seconds of events, press `key`, save the
        screen as SVG, exit."""
        try:
            async with asyncio.timeout(self.screenshot_wait_s):
                while not self.model.connected:
                    await asyncio.sleep(0.1)
        except TimeoutError:
            why = self.model.link_note or "no status document"
            self.exit(return_code=1, message=f"birthline dashboard: --screenshot: the daemon did not answer within"
                      f" {self.screenshot_wait_s:g} s ({inert(why, 300)}); no screenshot saved")  # fmt: skip
            return
        await asyncio.sleep(after)
        if key:
            self.simulate_key(key)
        self._dirty = True
        await asyncio.sleep(0.2)
        self.refresh_view()
        # Let everything settle (the footer follows the focus a moment later), then save.
        await asyncio.sleep(1.0)
        self.save_screenshot(path.name, str(path.parent))
        self.exit()

    # -- the person ------------------------------------------------------------------------------------------------
    @property
    def api(self) -> ControlClient | None:
        return self.feed.api

    async def _logged_in(self) -> bool:
        """True once a person is logged in for this session (asking now if nobody is)."""
        api = self.api
        if api is None:
            self.notify("This dashboard is read-only (no daemon).", severity="warning", markup=False)
            return False
        if api.token is not None:
            return True

        async def login(values: dict[str, str]) -> str | None:
            try:
                await api.login(values["user"], values["password"])
            except ControlError as exc:
                return explain(exc)
            self._dirty = True
            return None

        form = FormScreen(
            "Log in", "Actions are authorised and audited under your name. You log in once for this session.",
            [Field("user", "User", self.default_user or "", max_length=64), Field("password", "Password", password=True)],
            login, ok="Log in",
        )  # fmt: skip
        logged_in: bool = await self.push_screen_wait(form)
        return logged_in

    @work(exclusive=True, group="action")
    async def action_login(self) -> None:
        api = self.api
        if api is not None and api.token is not None:
            who = (api.user or {}).get("user", "")
            await api.logout()
            self._dirty = True
            self.notify(Text(f"{inert(who, 64)} logged out").plain, markup=False)
            return
        await self._logged_in()

    async def _act(self, call: Callable[[ControlClient], Awaitable[Any]], done: str) -> str | None:
        """Run an action; answers the error to show, or None. A session the daemon no longer knows (it restarted)
        is forgotten and the person is asked to log in again; then the action is tried once more."""
        api = self.api
        assert api is not None
        for attempt in (1, 2):
            try:
                await call(api)
            except ControlError as exc:
                if exc.code == wire.ERR_UNAUTHENTICATED and attempt == 1:
                    api.token = None
                    api.user = None
                    self._dirty = True
                    self.notify("Your session has ended (the daemon restarted?): log in again.",
                                severity="warning", markup=False)  # fmt: skip
                    if await self._logged_in():
                        continue
                return explain(exc)
            self.notify(done, markup=False)
            self._dirty = True
            return None
        return None

    async def _simple(self, call: Callable[[ControlClient], Awaitable[Any]], done: str) -> None:
        error = await self._act(call, done)
        if error is not None:
            self.notify(inert(error, 400), severity="error", markup=False)

    # -- actions ---------------------------------------------------------------------------------------------------
    @work(exclusive=True, group="action")
    async def action_pause(self) -> None:
        station = self.query_one(StationGrid).selected(self.model)
        if station is None:
            self.notify("Choose a station in the grid first.", markup=False)
            return
        if not await self._logged_in():
            return
        name = station.name
        shown = inert(name, 64)
        if station.paused is not None:
            await self._simple(lambda api: api.resume_station(name), f"Station {shown} resumed")
            return

        async def pause(values: dict[str, str]) -> str | None:
            return await self._act(lambda api: api.pause_station(name, values["reason"].strip()),
                                   f"Station {shown} paused: its requests are refused until resumed")  # fmt: skip

        await self.push_screen_wait(FormScreen(
            Text(f"Pause station {shown}"),
            "Its requests are refused (STATION_PAUSED) until someone resumes it. Requests being signed finish.",
            [Field("reason", "Reason (optional, shown to the station)", required=False, max_length=200)],
            pause, ok="Pause",
        ))  # fmt: skip

    @work(exclusive=True, group="action")
    async def action_acknowledge(self) -> None:
        alarm = self.query_one(AlarmTable).selected(self.model)
        if alarm is None:
            self.notify("Choose an alarm first (2: alarms).", markup=False)
            return
        if not await self._logged_in():
            return
        cause = alarm.cause
        await self._simple(lambda api: api.acknowledge_alarm(cause),
                           f"Alarm {inert(cause, 64)} acknowledged; it stays until its condition clears")  # fmt: skip

    def _confirm_fields(self, extra: list[Field] | None = None) -> list[Field]:
        me = (self.api.user or {}) if self.api is not None else {}
        who = str(me.get("user", "")) if me.get("role") in ("supervisor", "administrator") else ""
        return [*(extra or []), Field("user", "Supervisor", who, max_length=64),
                Field("password", "Supervisor's password", password=True)]  # fmt: skip

    async def _privileged(self, title: str, explain_text: str, extra: list[Field],
                          call: Callable[[ControlClient, dict[str, str], Credentials], Awaitable[Any]],
                          done: Callable[[dict[str, str]], str], ok: str) -> None:  # fmt: skip
        if not await self._logged_in():
            return

        async def submit(values: dict[str, str]) -> str | None:
            creds = Credentials(values["user"], values["password"])
            return await self._act(lambda api: call(api, values, creds), done(values))

        await self.push_screen_wait(
            FormScreen(Text(title), explain_text, self._confirm_fields(extra), submit, ok)
        )

    @work(exclusive=True, group="action")
    async def action_activate_order(self) -> None:
        order = self.query_one(WorkOrderTable).selected(self.model)
        if order is None:
            self.notify("Choose a work order first (1: work orders).", markup=False)
            return
        wo = order.id
        await self._privileged(
            f"Activate work order {inert(wo, 64)}", "Its lines may then issue within its quota. A supervisor confirms.",
            [], lambda api, _v, c: api.activate_work_order(wo, confirm=c),
            lambda _v: f"Work order {inert(wo, 64)} activated", "Activate",
        )  # fmt: skip

    @work(exclusive=True, group="action")
    async def action_close_order(self) -> None:
        order = self.query_one(WorkOrderTable).selected(self.model)
        if order is None:
            self.notify("Choose a work order first (1: work orders).", markup=False)
            return
        wo = order.id
        await self._privileged(
            f"Close work order {inert(wo, 64)}",
            f"Closing is final: no more certificates under it ({order.issued} of {order.planned} issued). "
            "A supervisor confirms.",
            [], lambda api, _v, c: api.close_work_order(wo, confirm=c),
            lambda _v: f"Work order {inert(wo, 64)} closed", "Close it",
        )  # fmt: skip

    def _device_fields(self) -> list[Field]:
        station = self.query_one(StationGrid).selected(self.model)
        serial = station.last_device_serial if station is not None and station.last_device_serial else ""
        return [
            Field("device", "Device serial", serial, max_length=64),
            Field("reason", "Reason", max_length=200),
        ]

    @work(exclusive=True, group="action")
    async def action_scrap(self) -> None:
        await self._privileged(
            "Scrap a device", "Its certificate is revoked and the device may never be certified again. "
            "A supervisor confirms.", self._device_fields(),
            lambda api, v, c: api.scrap_device(v["device"].strip(), v["reason"].strip(), confirm=c),
            lambda v: f"Device {inert(v['device'], 64)} scrapped", "Scrap",
        )  # fmt: skip

    @work(exclusive=True, group="action")
    async def action_rework(self) -> None:
        await self._privileged(
            "Approve a rework", "Its certificate is revoked and the device may enrol once more with a new key. "
            "A supervisor confirms.", self._device_fields(),
            lambda api, v, c: api.rework_device(v["device"].strip(), v["reason"].strip(), confirm=c),
            lambda v: f"Rework of device {inert(v['device'], 64)} approved", "Approve",
        )  # fmt: skip
