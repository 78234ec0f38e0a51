"""Snapshots of the dashboard's main screens at 80x24 and 160x48 (pytest-textual-snapshot: each SVG under
__snapshots__/ was looked at and accepted; `pytest --snapshot-update` writes new ones after a deliberate change).

The line on them is a recording of the served demo (tests/console/data/demo-line.json: a status document and
the events around it, taken with the control API while demo-lan was paused), replayed into the model exactly
as the link feeds it: a fixed picture, times shown in UTC.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from textual.pilot import Pilot

from console.client import ControlClient
from console.dashboard.app import DashboardApp
from console.dashboard.model import Model

RECORDING = Path(__file__).parent / "data" / "demo-line.json"
SnapCompare = Callable[..., bool]


class RecordedFeed:
    """The demo's recorded line, fed into the model once; `disconnect` then ends the link with that reason."""

    api: ControlClient | None = None

    def __init__(self, disconnect: str | None = None) -> None:
        self.data: dict[str, Any] = json.loads(RECORDING.read_text())
        self.disconnect = disconnect

    async def run(self, model: Model, changed: Callable[[], None]) -> None:
        hello, *events = self.data["events"]
        model.load_status(self.data["status"])
        model.set_connected(0.0, wall=hello["time"])  # a fixed time for the link line: the snapshot is stable
        for event in events:  # as the stream delivers them
            model.apply(event)
        if self.disconnect is not None:
            model.set_disconnected(self.disconnect, 0.0, wall=model.last_event_time)
        changed()
        await asyncio.Event().wait()


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


async def _shown(pilot: Pilot[None]) -> None:
    app = pilot.app
    assert isinstance(app, DashboardApp)
    while not app.model.ever_connected or app.refreshes == 0:
        await pilot.pause(0.05)
    app.refresh_view()
    await pilot.pause()


def _app(**kw: Any) -> DashboardApp:
    return DashboardApp(RecordedFeed(**kw))


def test_line_at_80x24(snap_compare: SnapCompare) -> None:
    """The station grid, the summary lines and the work orders: what fits a small terminal."""
    assert snap_compare(_app(), terminal_size=(80, 24), run_before=_shown)


def test_alarms_at_80x24(snap_compare: SnapCompare) -> None:
    """2: the open alarms, the chosen one's message and advice below."""
    assert snap_compare(_app(), terminal_size=(80, 24), run_before=_shown, press=["2"])


def test_log_at_80x24(snap_compare: SnapCompare) -> None:
    """3: the latest issuances and refusals with their reasons (the pause of demo-lan, its refusals)."""
    assert snap_compare(_app(), terminal_size=(80, 24), run_before=_shown, press=["3"])


def test_line_at_160x48(snap_compare: SnapCompare) -> None:
    """A large terminal: every panel at once, and more columns (kind, refused, confirmed, link, reasons)."""
    assert snap_compare(_app(), terminal_size=(160, 48), run_before=_shown)


def test_disconnected_at_80x24(snap_compare: SnapCompare) -> None:
    """The daemon went away: the link says so, the last known line stays, dimmed."""
    app = _app(disconnect="the daemon does not answer on /var/lib/birthline/control.sock")
    assert snap_compare(app, terminal_size=(80, 24), run_before=_shown)


def test_help_at_80x24(snap_compare: SnapCompare) -> None:
    assert snap_compare(_app(), terminal_size=(80, 24), run_before=_shown, press=["question_mark"])


def test_help_at_160x48(snap_compare: SnapCompare) -> None:
    assert snap_compare(_app(), terminal_size=(160, 48), run_before=_shown, press=["question_mark"])
