"""Escape injection: a station name and a device serial carrying terminal escape sequences and Rich/Textual
markup reach the dashboard's screen inert, through a real daemon: in Textual's own rendering (Pilot) and in a
real terminal (tmux), where an escape that got through would retitle the pane or clear the screen."""

from __future__ import annotations

import asyncio
import re
import shlex
import sys
import time
from collections.abc import AsyncIterator

import pytest

from appliance.errors import BirthlineError
from appliance.issuance.policy import IssueRequest
from console.dashboard.app import DashboardApp
from console.dashboard.link import Link
from tests.appliance.conftest import make_csr
from tests.appliance.control.conftest import Floor
from tests.console.pilot import screen_text, until
from tests.console.terminal import Terminal, needs_tmux

# What a hostile station or device would send: retitle the terminal, clear it, blink, and markup that would
# style the text or, as a Textual action, quit the dashboard if it were ever read as markup.
STATION = "\x1b]0;pwned\x07ST-[bold red]EVIL[/]\x1b[2J"
SERIAL = "DEV-\x1b[5m[@click=app.quit]Q[/]\x1b]0;owned\x07\u202eZ"
STATION_SHOWN = "\\x1b]0;pwned\\x07ST-[bold red]EVIL[/]\\x1b[2J"
SERIAL_SHOWN = "DEV-\\x1b[5m[@click=app.quit]Q[/]\\x1b]0;owned\\x07\\u202eZ"


async def _hostile_station(floor: Floor) -> None:
    """A station whose registry row carries the name (as a journal written before names were checked, or edited
    by hand, would), on line L1."""
    d = floor.daemon
    d.journal.call(d.journal.transaction, lambda conn: conn.execute(
        "INSERT INTO stations (name, kind, key, created_at, line) VALUES (?, 'lan', ?, ?, 'L1')",
        (STATION, bytes(32), time.time())), "hostile station")  # fmt: skip
    await d.refresh()


async def _hostile_device(floor: Floor) -> None:
    """A device serial carrying escapes, asked for by that station through the issuance core as a CMP client's
    requested subject would ask it (refused: it is no PrintableString)."""
    assert floor.daemon.enroller is not None
    with pytest.raises(BirthlineError):
        await floor.daemon.enroller.service.issue(IssueRequest(SERIAL, make_csr("x")[1], station=STATION))


@pytest.fixture
async def hostile_floor(floor: Floor) -> AsyncIterator[Floor]:
    await _hostile_station(floor)
    yield floor


def _lines_with(text: str, needle: str) -> list[str]:
    return [line for line in text.splitlines() if needle in line]


async def test_hostile_names_reach_the_screen_inert(hostile_floor: Floor) -> None:
    app = DashboardApp(Link(hostile_floor.socket, poll_s=0.2), refresh_s=0.05)
    async with app.run_test(size=(130, 30)) as pilot:
        await until(pilot, lambda: STATION_SHOWN[:9] in screen_text(app), "the hostile station listed")
        await pilot.press("3")  # the log, the whole width
        await _hostile_device(hostile_floor)
        await until(pilot, lambda: _lines_with(screen_text(app), SERIAL_SHOWN), "the refusal in the log")
        text = screen_text(app)
        assert "\\x1b" in text and "\\x07" in text and "\\u202e" in text  # spelled out
        assert not {"\x1b", "\x07", "\u202e"} & set(text)  # none raw
        assert app.is_running  # "[@click=app.quit]" was shown, not acted on
        # The log line shows both whole; the grid row both cut to their columns, escaped.
        (logged,) = _lines_with(text, SERIAL_SHOWN)
        assert "refused" in logged and STATION_SHOWN in logged and "BAD_DEV" in logged
        (row,) = [line for line in _lines_with(text, STATION_SHOWN[:9]) if "disconnected" in line]
        assert SERIAL_SHOWN[:9] in row and "BAD_DEVICE_SERIAL" in row


@needs_tmux
@pytest.mark.slow
async def test_hostile_names_in_a_real_terminal_change_nothing_but_the_text(hostile_floor: Floor) -> None:
    cmd = f"exec {shlex.quote(sys.executable)} -m appliance.cli.launch dashboard --socket {hostile_floor.socket}"
    term = Terminal(cmd, width=200, height=40)
    try:
        title = await asyncio.to_thread(term.title)
        await asyncio.to_thread(term.wait_for, lambda s: STATION_SHOWN[:9] in s, "the hostile station", 60)
        await _hostile_device(hostile_floor)
        await asyncio.to_thread(
            term.wait_for, lambda s: SERIAL_SHOWN[:9] in s and "BAD_DEVICE_SERIAL" in s,
            "the hostile device serial shown escaped", 60,
        )  # fmt: skip
        await asyncio.sleep(1.0)  # another refresh or two: an escape that got through would have acted by now
        assert (
            await asyncio.to_thread(term.title) == title
        )  # the OSC title sequences did not retitle the pane
        screen = await asyncio.to_thread(term.screen)
        assert "Line" in screen and "fixture-1" in screen  # "\x1b[2J" cleared nothing
        raw = await asyncio.to_thread(term.raw_screen)
        # tmux re-renders what it interpreted: only colour/attribute sequences, and blink (SGR 5) never.
        assert not re.search(r"\x1b\[[0-9;]*\b5m", raw) and "\x1b]" not in raw
    finally:
        term.close()
