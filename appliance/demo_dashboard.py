"""`birthline demo --serve --dashboard`: the dashboard opened on the running demo, in this terminal.

The dashboard is its own process (`birthline dashboard --socket ...`), as in production: it talks to the demo's
daemon through the control socket only. While it owns the terminal the demo's log goes to DIR/demo.log (a log
line on the terminal would tear the dashboard's screen). Closing the dashboard stops nothing: the demo goes on
serving until Ctrl-C, as an appliance goes on issuing when its console closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def dashboard_command(socket: Path, user: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "appliance.cli.launch",
        "dashboard",
        "--socket",
        str(socket),
        "--user",
        user,
    ]


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    root = logging.getLogger()
    saved = root.handlers[:]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW, 0o600)
    with open(fd, "a", encoding="utf-8") as stream:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(
            saved[0].formatter if saved else logging.Formatter("%(levelname)s %(name)s: %(message)s")
        )
        root.handlers = [handler]
        try:
            yield
        finally:
            root.handlers = saved
            handler.close()


async def run_dashboard(socket: Path, user: str, log_file: Path, daemon_done: asyncio.Future[None]) -> bool:
    """Run the dashboard in this terminal. True when the person closed it; False when the daemon stopped first
    (the dashboard is then ended too)."""
    with _log_to(log_file):
        proc = await asyncio.create_subprocess_exec(*dashboard_command(socket, user))
        exited: asyncio.Future[Any] = asyncio.ensure_future(proc.wait())
        either: list[asyncio.Future[Any]] = [daemon_done, exited]
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if exited.done():
            return True
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(exited, 5.0)
        except TimeoutError:
            proc.kill()
            await proc.wait()
        return False
