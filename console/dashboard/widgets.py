"""The dashboard's views of the model: the summary bar, the station grid, work orders, alarms and the log.

Every string that came from the daemon is passed through `inert()` and shown as a plain rich Text: nothing a
station, a device or a person typed is ever read as markup or written to the terminal as a control sequence.
"""

from __future__ import annotations

import time
from typing import ClassVar, Final

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.coordinate import Coordinate
from textual.widgets import DataTable, RichLog, Sparkline, Static
from textual.widgets.data_table import RowKey

from console.dashboard.inert import inert
from console.dashboard.model import Alarm, LogEntry, Model, Station, WorkOrder

# How each station state looks: a symbol (so the state reads without colour) and a style.
STATE_LOOK: Final = {
    "issuing": ("●", "bold green"),
    "idle": ("○", "cyan"),
    "paused": ("‖", "bold yellow"),
    "error": ("✖", "bold red"),
    "disconnected": ("◌", "red"),
    "disabled": ("-", "dim"),
}
SEVERITY_STYLE: Final = {"critical": "bold red", "warning": "yellow"}
LOG_STYLE: Final = {"good": "green", "error": "red", "warning": "yellow", "info": ""}
LOG_MARK: Final = {"issued": "✔", "pending": "…", "refused": "✖", "station": "◆", "alarm": "!", "workorder": "▶",
                   "device": "▶", "dropped": "!", "link": "◆"}  # fmt: skip
BAR_WIDTH: Final = 12
CELL_PADDING: Final = 2  # a DataTable cell's padding, left and right
SCROLLBAR: Final = 2

# A table column: key, label, width; width 0 is the one flexible column, which takes what is left (at least
# FLEX_MIN). A table uses its detailed set of columns when they fit its width, else the compact set.
Column = tuple[str, str, int]
FLEX_MIN: Final = 12


def fit_columns(
    sets: tuple[tuple[Column, ...], ...], width: int, flex_min: int = FLEX_MIN
) -> tuple[tuple[Column, ...], bool]:
    """The most detailed column set that fits `width` cells, with its flexible column sized to fill it (at least
    `flex_min`); and whether that is the first (most detailed) set."""
    for i, columns in enumerate(sets):
        fixed = sum(w for _, _, w in columns) + CELL_PADDING * len(columns) + SCROLLBAR
        flex = width - fixed
        if flex >= flex_min or i == len(sets) - 1:
            sized = tuple((k, label, w or max(flex_min, flex)) for k, label, w in columns)
            return sized, i == 0
    raise AssertionError("unreachable")


def clock(t: float | None) -> str:
    """A daemon time as the local wall clock (HH:MM:SS)."""
    return "--:--:--" if t is None else time.strftime("%H:%M:%S", time.localtime(t))


def ago(t: float | None, now: float | None) -> str:
    return "-" if t is None or now is None else duration(now - t)


def duration(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.0f}s"
    if s < 3600:
        return f"{s / 60:.0f}m"
    if s < 86400:
        return f"{s / 3600:.0f}h"
    return f"{s / 86400:.0f}d"


def plain(value: object, style: str = "", limit: int = 128) -> Text:
    """Daemon-supplied text as an inert, single-line Text."""
    return Text(inert(value, limit), style=style, no_wrap=True, overflow="ellipsis")


def state_cell(station: Station) -> Text:
    mark, style = STATE_LOOK.get(station.state, ("?", ""))
    return Text(f"{mark} {inert(station.state, 16)}", style=style, no_wrap=True)


def bar(share: float, width: int = BAR_WIDTH, style: str = "green") -> Text:
    full = round(share * width)
    if share > 0 and full == 0:
        full = 1  # something was used: never show an empty bar for it
    text = Text("█" * full, style=style)
    text.append("░" * (width - full), style="dim")
    return text


class SummaryBar(Vertical):
    """Two lines: the link, the person and the line's states; the HSM, clock, upstream, alarms and the rate."""

    DEFAULT_CSS = """
    SummaryBar { height: 2; }
    SummaryBar Horizontal { height: 1; }
    SummaryBar #link { width: 1fr; }
    SummaryBar #who { width: auto; }
    SummaryBar #health { width: auto; }
    SummaryBar #rate { width: auto; padding: 0 1; }
    SummaryBar Sparkline { width: 1fr; max-width: 60; height: 1; min-width: 8; }
    """

    def compose(self) -> ComposeResult:
        with Horizontal():
            yield Static(id="link")
            yield Static(id="who")
        with Horizontal():
            yield Static(id="health")
            yield Static(id="rate")
            yield Sparkline([], id="spark")

    def show(self, model: Model, user: str | None, role: str | None) -> None:
        link = Text()
        if model.connected:
            link.append("● connected", style="bold green")
            if model.events_busy:
                link.append(" events: busy", style="bold yellow")
        elif not model.ever_connected:
            link.append("◌ connecting…", style="bold yellow")
        else:
            link.append("◌ DISCONNECTED", style="bold white on red")
        counts = model.counts_by_state()
        for state in ("issuing", "idle", "paused", "error", "disconnected", "disabled"):
            if counts.get(state):
                mark, style = STATE_LOOK[state]
                link.append("  ")
                link.append(f"{mark}{counts[state]} {state}", style=style)
        self.query_one("#link", Static).update(link)
        who = Text()
        if user:
            who.append(inert(user, 32), style="bold")
            who.append(f" ({inert(role, 16)})")
        else:
            who.append("not logged in", style="dim")
        self.query_one("#who", Static).update(who)

        s = model.summary
        health = Text()
        health.append("HSM ")
        health.append(inert(s.hsm_state, 16), style="green" if s.hsm_state == "ok" else "bold red")
        health.append(" │ clock ")
        if s.clock_trusted is None:
            health.append("unknown", style="dim")
        else:
            health.append(
                "ok" if s.clock_trusted else "NOT TRUSTED", style="green" if s.clock_trusted else "bold red"
            )
        health.append(f" {clock(s.time)}")
        health.append(" │ upstream ")
        if not s.upstream_enabled:
            health.append("off", style="dim")
        else:
            style = {"up": "green", "down": "bold red"}.get(s.upstream_link, "yellow")
            health.append(inert(s.upstream_link, 12), style=style)
            health.append(f" q{s.upstream_depth}", style="bold red" if s.upstream_stopped else "")
            if s.upstream_age_s:
                health.append(
                    f" {duration(s.upstream_age_s)} old", style="red" if s.upstream_over_limit else ""
                )
            if s.upstream_stopped:
                health.append(" ISSUANCE STOPPED", style="bold white on red")
        crit = sum(1 for a in model.alarms.values() if a.severity == "critical")
        warn = len(model.alarms) - crit
        health.append(" │ alarms ")
        if not model.alarms:
            health.append("0", style="green")
        else:
            if crit:
                health.append(f"{crit} critical", style="bold white on red")
            if crit and warn:
                health.append(" ")
            if warn:
                health.append(f"{warn} warning", style="bold yellow")
        self.query_one("#health", Static).update(health)
        rate = Text(f"│ {s.rate_per_s:.1f}/s")
        self.query_one("#rate", Static).update(rate)
        # No data is no bar (Textual draws a series of zeros as a full one).
        self.query_one("#spark", Sparkline).data = [float(x) for x in s.per_minute_last_hour]


class StationGrid(DataTable[Text]):
    """One row per station, by line: its state, what it last did and why it was last refused."""

    NARROW: Final = (("line", "Line", 7), ("station", "Station", 12), ("state", "State", 14),
                     ("issued", "Issued", 6), ("device", "Last device", 15), ("refusal", "Last refusal", 0))  # fmt: skip
    WIDE: Final = (("line", "Line", 8), ("station", "Station", 14), ("kind", "Kind", 6), ("state", "State", 14),
                   ("issued", "Issued", 7), ("refused", "Refused", 7), ("confirmed", "Confirmed", 9),
                   ("device", "Last device", 18), ("last", "Last cert", 9), ("refusal", "Last refusal", 0),
                   ("link", "Link", 22))  # fmt: skip

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self.wide = False
        self.columns_now: tuple[Column, ...] = self.NARROW
        self._keys: list[str] = []

    def selected(self, model: Model) -> Station | None:
        if not self._keys or self.cursor_row < 0 or self.cursor_row >= len(self._keys):
            return None
        return model.stations.get(self._keys[self.cursor_row])

    def rebuild(self, model: Model, width: int) -> None:
        keep = self._keys[self.cursor_row] if self._keys and 0 <= self.cursor_row < len(self._keys) else None
        self.columns_now, self.wide = fit_columns((self.WIDE, self.NARROW), width)
        self.clear(columns=True)
        for key, label, w in self.columns_now:
            self.add_column(label, key=key, width=w)
        self._keys = []
        previous_line: str | None = "\0"
        for st in model.station_order():
            line_text = inert(st.line, 64) if st.line != previous_line else ""
            previous_line = st.line
            self.add_row(*self._cells(st, model, line_text), key=st.name)
            self._keys.append(st.name)
        if keep in self._keys:
            self.move_cursor(row=self._keys.index(keep), animate=False)

    def _cells(self, st: Station, model: Model, line_text: str) -> list[Text]:
        line = Text(
            line_text if st.line is not None else "—", style="bold", no_wrap=True, overflow="ellipsis"
        )
        refusal = Text("", no_wrap=True, overflow="ellipsis")
        if self.wide and st.paused is not None and st.state == "paused":
            refusal = plain(f"paused by {st.paused.by}" + (f": {st.paused.reason}" if st.paused.reason else ""),
                            "yellow")  # fmt: skip
        elif st.last_refusal is not None:
            r = st.last_refusal
            refusal = plain(
                f"{r.code}: {r.reason}" if self.wide else r.code, "red" if st.state == "error" else ""
            )
        cells = {
            "line": line,
            "station": plain(st.name, "bold", 64),
            "kind": plain(st.kind, "", 8),
            "state": state_cell(st),
            "issued": Text(str(st.issued), justify="right"),
            "refused": Text(str(st.refused), justify="right", style="red" if st.refused else ""),
            "confirmed": Text(str(st.confirmed), justify="right"),
            "device": plain(st.last_device_serial),
            "last": Text(ago(st.last_issued_at, model.now), justify="right"),
            "refusal": refusal,
            "link": plain(st.last_link_error, "red") if st.last_link_error and not st.connected
            else plain(st.peer or ("" if st.connected else "not connected"), "dim"),
        }  # fmt: skip
        return [cells[key] for key, _, _ in self.columns_now]

    def update_stations(self, model: Model, names: set[str]) -> None:
        keys = [k for k, _, _ in self.columns_now]
        for name in names:
            st = model.stations.get(name)
            if st is None or name not in self._keys:
                continue
            index = self._keys.index(name)
            line_cell = self.get_cell_at(Coordinate(index, 0))
            for key, cell in zip(keys, self._cells(st, model, line_cell.plain), strict=True):
                if key != "line":
                    self.update_cell(RowKey(name), key, cell)


class WorkOrderTable(DataTable[Text]):
    """Draft and active work orders, and the latest closed ones: how much of each quota is used."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("o", "app.activate_order", "Activate"),
        Binding("x", "app.close_order", "Close"),
    ]

    NARROW: Final = (("id", "Work order", 0), ("state", "State", 6), ("bar", "Quota", BAR_WIDTH),
                     ("issued", "Issued/planned", 15), ("remaining", "Left", 7))  # fmt: skip
    WIDE: Final = (("id", "Work order", 0), ("product", "Product", 12), ("state", "State", 6),
                   ("bar", "Quota", BAR_WIDTH), ("issued", "Issued/planned", 15), ("confirmed", "Confirmed", 9),
                   ("remaining", "Left", 7))  # fmt: skip

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self._keys: list[str] = []

    def selected(self, model: Model) -> WorkOrder | None:
        if not self._keys or not 0 <= self.cursor_row < len(self._keys):
            return None
        return model.work_orders.get(self._keys[self.cursor_row])

    def rebuild(self, model: Model, width: int) -> None:
        keep = self._keys[self.cursor_row] if self._keys and 0 <= self.cursor_row < len(self._keys) else None
        columns, _ = fit_columns((self.WIDE, self.NARROW), width, flex_min=16)  # a work order id whole
        self.clear(columns=True)
        for key, label, w in columns:
            self.add_column(label, key=key, width=w)
        self._keys = []
        for wo in model.work_orders.values():
            state_style = {"active": "green", "draft": "yellow", "closed": "dim"}.get(wo.state, "")
            full = wo.planned > 0 and wo.remaining == 0
            cells = {
                "id": plain(wo.id, "bold" if wo.state == "active" else state_style, 64),
                "product": plain(wo.product, "", 64),
                "state": plain(wo.state, state_style, 8),
                "bar": bar(wo.done, style="red" if full else ("green" if wo.state == "active" else "dim")),
                "issued": Text(f"{wo.issued}/{wo.planned}", justify="right"),
                "confirmed": Text(str(wo.confirmed), justify="right"),
                "remaining": Text(str(wo.remaining), justify="right", style="bold red" if full else ""),
            }
            self.add_row(*(cells[k] for k, _, _ in columns), key=wo.id)
            self._keys.append(wo.id)
        if keep in self._keys:
            self.move_cursor(row=self._keys.index(keep), animate=False)


class AlarmTable(DataTable[Text]):
    """Open alarms, critical first: what is wrong; the advice of the selected one is shown below."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("a", "app.acknowledge", "Acknowledge")]

    COLUMNS: Final = (("severity", "Severity", 8), ("cause", "Cause", 0), ("since", "Since", 8),
                      ("count", "Seen", 5), ("ack", "Acknowledged", 14))  # fmt: skip

    def __init__(self, **kwargs: object) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)  # type: ignore[arg-type]
        self._keys: list[str] = []

    def selected(self, model: Model) -> Alarm | None:
        if not self._keys or not 0 <= self.cursor_row < len(self._keys):
            return None
        return model.alarms.get(self._keys[self.cursor_row])

    def rebuild(self, model: Model, width: int) -> None:
        keep = self._keys[self.cursor_row] if self._keys and 0 <= self.cursor_row < len(self._keys) else None
        self.clear(columns=True)
        for key, label, w in fit_columns((self.COLUMNS,), width)[0]:
            self.add_column(label, key=key, width=w)
        self._keys = []
        for a in model.alarm_order():
            style = SEVERITY_STYLE.get(a.severity, "")
            self.add_row(
                plain(a.severity, style, 10), plain(a.cause, style, 256), Text(clock(a.raised_at)),
                Text(str(a.count), justify="right"),
                plain(a.acknowledged_by, "green") if a.acknowledged_by else Text("no", style=style),
                key=a.cause,
            )  # fmt: skip
            self._keys.append(a.cause)
        if keep in self._keys:
            self.move_cursor(row=self._keys.index(keep), animate=False)


def alarm_detail(alarm: Alarm | None) -> Text:
    if alarm is None:
        return Text("No open alarm.", style="green")
    text = Text()
    text.append(inert(alarm.message, 400), style=SEVERITY_STYLE.get(alarm.severity, ""))
    text.append("\nWhat to do: ", style="bold")
    text.append(inert(alarm.advice, 600))
    return text


class EventLog(RichLog):
    """The latest issuances, refusals with their reasons, link, alarm and production events, newest last."""

    def add(self, entries: list[LogEntry], skipped: int) -> None:
        # Each line rendered whole, at its own width: the log may be hidden (another tab) or narrower when a line
        # is written; it scrolls sideways rather than keep a line cut to that moment's width.
        lines = [log_line(e) for e in entries]
        if skipped:
            lines.insert(
                0, Text(f"… {skipped} more events in this burst (the counts above include them)", style="dim")
            )
        for line in lines:
            self.write(line, width=max(self.min_width, line.cell_len))


def log_line(e: LogEntry) -> Text:
    style = LOG_STYLE.get(e.severity, "")
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(clock(e.time), style="dim")
    text.append(f" {LOG_MARK.get(e.kind, '·')} ", style=style)
    text.append(f"{inert(e.kind, 10):<9}", style=style)
    if e.station:
        text.append(f" {inert(e.station, 64):<12}", style="bold")
    if e.subject:
        text.append(f" {inert(e.subject, 128)}")
    if e.detail:
        text.append(f" {inert(e.detail, 400)}", style="" if e.severity in ("good", "info") else style)
    return text
