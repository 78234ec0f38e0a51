"""Helpers for driving the dashboard with Textual's Pilot: what the screen shows, waiting for it, filling a
form. (The tests that run it against a real daemon are in tests/appliance/control/test_dashboard_*.py, beside
the daemon's fixtures.)"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable

from rich.console import Console
from textual.app import App
from textual.pilot import Pilot
from textual.widgets import Input

__all__ = ["fill", "screen_text", "until"]


def screen_text(app: App[object]) -> str:
    """What the screen shows, as plain text (the same render export_screenshot() turns into an SVG)."""
    width, height = app.size
    console = Console(width=width, height=height, file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", record=True, legacy_windows=False, safe_box=False)  # fmt: skip
    console.print(app.screen._compositor.render_update(full=True, screen_stack=app._background_screens))
    return console.export_text(styles=False)


async def until(
    pilot: Pilot[object], condition: Callable[[], object], what: str, timeout: float = 30.0
) -> None:
    """Wait (a deadlock guard, not a timing assertion) until `condition()` holds."""
    try:
        async with asyncio.timeout(timeout):
            while not condition():
                await pilot.pause(0.05)
    except TimeoutError:
        raise AssertionError(f"never: {what}\n{screen_text(pilot.app)}") from None


async def fill(pilot: Pilot[object], **values: str) -> None:
    """Type into the open form's fields (by name) and submit it with Enter from the last one."""
    screen = pilot.app.screen
    for name, value in values.items():
        field = screen.query_one(f"#f-{name}", Input)
        field.focus()
        field.value = value
    await pilot.pause()
    last = list(screen.query(Input))[-1]
    last.focus()
    await pilot.press("enter")
