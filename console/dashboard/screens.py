"""The dashboard's dialogs: a form (logging in, pausing, confirming a privileged action, scrap and rework) and
the help screen.

A form does its own work: `submit(values)` talks to the daemon and answers an error to show (the form stays
open, its password fields emptied, so the person can correct and try again) or None (the form closes). A
password is only ever in a masked Input and the values handed to `submit`; it is never shown, logged or kept.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static

from console.dashboard.inert import inert

Submit = Callable[[dict[str, str]], Awaitable[str | None]]


@dataclass(frozen=True)
class Field:
    name: str
    label: str
    value: str = ""
    password: bool = False
    required: bool = True
    max_length: int = 128
    placeholder: str = ""


class FormScreen(ModalScreen[bool]):
    """A few labelled inputs; Enter moves to the next empty one and submits when none is left; Escape cancels."""

    DEFAULT_CSS = """
    FormScreen { align: center middle; }
    FormScreen > Vertical { width: 72; max-width: 100%; height: auto; max-height: 100%;
                            border: thick $accent; background: $surface; padding: 0 1; }
    FormScreen .title { text-style: bold; width: 100%; }
    FormScreen .explain { color: $text-muted; width: 100%; }
    FormScreen .label { margin-top: 1; }
    FormScreen Input { width: 100%; background: $boost; }
    FormScreen #error { color: $error; width: 100%; height: auto; }
    FormScreen Horizontal { height: auto; align: right middle; margin-top: 1; }
    FormScreen Button { margin-left: 2; min-width: 10; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, title: str | Text, explain: str | Text, fields: Sequence[Field], submit: Submit,
                 ok: str = "OK") -> None:  # fmt: skip
        super().__init__()
        self.title_text = title if isinstance(title, Text) else Text(title)
        self.explain_text = explain if isinstance(explain, Text) else Text(explain)
        self.fields = list(fields)
        self.submit = submit
        self.ok = ok
        self.busy = False

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(self.title_text, classes="title")
            if self.explain_text.plain:
                yield Static(self.explain_text, classes="explain")
            for f in self.fields:
                yield Label(f.label, classes="label")
                yield Input(value=f.value, password=f.password, max_length=f.max_length, id=f"f-{f.name}",
                            placeholder=f.placeholder, compact=True)  # fmt: skip
            yield Static("", id="error")
            with Horizontal():
                yield Button("Cancel", id="cancel", compact=True)
                yield Button(self.ok, id="ok", variant="primary", compact=True)

    def on_mount(self) -> None:
        first_empty = next((f for f in self.fields if not f.value), self.fields[0] if self.fields else None)
        if first_empty is not None:
            self.query_one(f"#f-{first_empty.name}", Input).focus()

    def values(self) -> dict[str, str]:
        return {f.name: self.query_one(f"#f-{f.name}", Input).value for f in self.fields}

    @on(Input.Submitted)
    def _enter(self, event: Input.Submitted) -> None:
        """Enter goes to the next empty field (a pre-filled name is skipped: the cursor lands in the password
        field, never in a visible one the person did not mean to type into); from the last, it submits."""
        inputs = list(self.query(Input))
        after = inputs[inputs.index(event.input) + 1 :]
        empty = next((i for i in after if not i.value), None)
        if empty is not None:
            empty.focus()
        else:
            self._go()

    @on(Button.Pressed, "#ok")
    def _ok(self) -> None:
        self._go()

    @on(Button.Pressed, "#cancel")
    def action_cancel(self) -> None:
        if not self.busy:
            self.dismiss(False)

    def _go(self) -> None:
        if self.busy:
            return
        values = self.values()
        missing = [f.label for f in self.fields if f.required and not values[f.name].strip()]
        if missing:
            self.show_error(f"{missing[0]}: required")
            return
        self.busy = True
        self.show_error("…")
        self.run_worker(self._submit(values), exclusive=True, group="form")

    async def _submit(self, values: dict[str, str]) -> None:
        try:
            error = await self.submit(values)
        finally:
            self.busy = False
            for f in self.fields:  # a password is typed again, never kept in the form
                if f.password:
                    self.query_one(f"#f-{f.name}", Input).value = ""
        if error is None:
            self.dismiss(True)
            return
        self.show_error(error)
        retry = next((f for f in self.fields if f.password), None)
        if retry is not None:
            self.query_one(f"#f-{retry.name}", Input).focus()

    def show_error(self, message: str) -> None:
        self.query_one("#error", Static).update(Text(inert(message, 400)))


HELP = """\
[b]Birthline dashboard[/b]: the line as the daemon sees it, live.
[dim]Esc closes, ↑ ↓ scroll.[/dim] Closing the dashboard never stops issuance.
A mouse works too: click a row, a tab, a button.

[b]Keys[/b]
  [b]Tab[/b]        the station grid, then the panel below (Shift+Tab back)
  [b]↑ ↓[/b]        choose a row          [b]1 2 3[/b]  work orders, alarms, log
  [b]p[/b]          pause or resume the chosen station (asks for a reason)
  [b]a[/b]          acknowledge the chosen alarm
  [b]o[/b] / [b]x[/b]      activate / close the chosen work order (supervisor confirms)
  [b]s[/b] / [b]r[/b]      scrap a device / approve its rework    (supervisor confirms)
  [b]l[/b]          log in (once for the session) or out
  [b]?[/b]          this help        [b]q[/b]  quit
An action asks you to log in first; a supervisor's action asks for a
supervisor's name and password each time. Passwords are never shown.

[b]Station states[/b]
  [green]● issuing[/]       a request in progress, or a certificate in the last 10 s
  [cyan]○ idle[/]          connected, nothing asked lately
  [yellow]‖ paused[/]        paused from a console: refused STATION_PAUSED
  [red]✖ error[/]         its last answer (within a minute) was a refusal
  [red]◌ disconnected[/]  no TLS connection, or its serial port is not open
  [dim]- disabled[/]      taken out of service by an administrator

[b]The screen[/b]
  Top: the link to the daemon, who is logged in, stations per state;
  the HSM, the daemon's clock, the upstream CA (link, queue depth, oldest
  record), open alarms, certificates per second now and, as a sparkline,
  per minute over the last hour.
  Grid: a row per station, by line: its state, certificates issued since
  the daemon started, the last device it asked for, its last refusal.
  Work orders: quota used (bar), issued of planned, units left.
  Alarms: what is wrong and, below, what to do.
  Log: issuances, refusals with their reasons, pauses, alarms, work order
  and device actions.
  Text from stations and devices is shown escaped: ESC appears as \\x1b.
"""


class HelpScreen(ModalScreen[None]):
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > VerticalScroll { width: 82; max-width: 100%; height: auto; max-height: 100%;
                                  border: thick $accent; background: $surface; padding: 0 1; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,q,question_mark,f1", "close", "Close"),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(HELP)

    def action_close(self) -> None:
        self.dismiss(None)
