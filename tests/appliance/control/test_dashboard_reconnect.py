"""The daemon restarts under the dashboard (Pilot, a real daemon stopped and started again on the same state):
the screen says it is disconnected and keeps the last known line, the link connects again by itself, and the
session that the restart ended is asked for again at the next action, which then goes through."""

from __future__ import annotations

import json
from pathlib import Path

from appliance.daemon import Daemon
from console.dashboard.app import DashboardApp
from console.dashboard.link import Link
from console.dashboard.screens import FormScreen
from console.dashboard.widgets import StationGrid
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import PRODUCTION_PASSWORD
from tests.appliance.control.conftest import control_config
from tests.console.pilot import fill, screen_text, until


async def test_a_daemon_restart_is_shown_and_recovered_from(
    softhsm_token: SoftHsmToken, people_journal_template: Path, tmp_path: Path
) -> None:
    config = control_config(tmp_path / "state", softhsm_token, people_journal_template)
    app = DashboardApp(Link(config.control_socket, poll_s=0.2), refresh_s=0.05)
    async with app.run_test(size=(100, 30)) as pilot:
        await until(pilot, lambda: "connecting" in screen_text(app), "connecting, before the daemon runs")
        async with Daemon(config):
            await until(pilot, lambda: app.model.connected and "fixture-1" in screen_text(app), "connected")
            assert app.api is not None
            await app.api.login("olga", PRODUCTION_PASSWORD)
        await until(pilot, lambda: "DISCONNECTED" in screen_text(app), "the daemon's absence shown")
        assert "fixture-1" in screen_text(app) and app.screen.has_class("-stale")
        first = app.feed.connects  # type: ignore[attr-defined]
        async with Daemon(config) as daemon:
            await until(pilot, lambda: app.model.connected and "DISCONNECTED" not in screen_text(app),
                        "reconnected by itself")  # fmt: skip
            assert app.feed.connects == first + 1  # type: ignore[attr-defined]
            assert not app.screen.has_class("-stale")
            # The restart ended the session: the pause asks for the person again, then goes through.
            grid = app.query_one(StationGrid)
            grid.move_cursor(row=grid._keys.index("fixture-1"))
            await pilot.press("p")
            await until(pilot, lambda: "Pause station fixture-1" in screen_text(app), "the pause form")
            await fill(pilot, reason="after restart")
            await until(pilot, lambda: "Log in" in screen_text(app) and "Password" in screen_text(app),
                        "asked to log in again")  # fmt: skip
            await fill(pilot, user="olga", password=PRODUCTION_PASSWORD)
            await until(pilot, lambda: not isinstance(app.screen, FormScreen), "the forms closed")
            await until(pilot, lambda: app.model.stations["fixture-1"].state == "paused", "paused")
            j = daemon.journal
            rows = j.call(lambda: j.conn.execute(
                "SELECT actor, data FROM audit WHERE event='station.pause'").fetchall())  # fmt: skip
            assert [(a, json.loads(d)["reason"]) for a, d in rows] == [("olga", "after restart")]


async def test_with_every_event_stream_taken_the_status_is_shown_and_the_stream_taken_when_free(
    softhsm_token: SoftHsmToken, people_journal_template: Path, tmp_path: Path
) -> None:
    """The daemon answers but its event streams are all taken: the dashboard shows the line from the status
    document (polled), says `events: busy`, and follows the stream once one is free."""
    import asyncio
    import contextlib

    from console.client import ControlClient

    config = control_config(tmp_path / "state", softhsm_token, people_journal_template, max_subscribers=1)
    app = DashboardApp(Link(config.control_socket, poll_s=0.2), refresh_s=0.05)
    async with Daemon(config), ControlClient(config.control_socket) as other:
        taken = asyncio.Event()

        async def hold() -> None:
            async for _ in other.events():
                taken.set()

        holder = asyncio.create_task(hold())
        await taken.wait()
        async with app.run_test(size=(100, 30)) as pilot:
            await until(pilot, lambda: "events: busy" in screen_text(app) and "fixture-1" in screen_text(app),
                        "the line shown, the stream busy")  # fmt: skip
            assert "clock ok" in screen_text(app) and app.model.connected
            holder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await holder
            await until(
                pilot, lambda: app.model.connected and not app.model.events_busy, "the stream followed"
            )
            await until(pilot, lambda: "events: busy" not in screen_text(app), "the header says so")
