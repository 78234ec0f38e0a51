"""The control channel of a bench's helper process: it runs until its stdin closes (the bench closed it, or died)
or it gets SIGTERM / SIGINT, and answers each line "stats" on stdin with one JSON line on stdout."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Callable
from typing import Any


async def until_stdin_closes(stats: Callable[[], dict[str, Any]]) -> None:
    """Until stdin reaches EOF (the bench closed it, or died) or SIGTERM / SIGINT. Each line "stats" on stdin is
    answered with one JSON line of `stats()` on stdout."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    fd = sys.stdin.fileno()
    os.set_blocking(fd, False)
    pending = b""

    def readable() -> None:
        nonlocal pending
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            stop.set()
            return
        *lines, pending = (pending + data).split(b"\n")
        for line in lines:
            if line.strip() == b"stats":
                print(json.dumps(stats()), flush=True)

    loop.add_reader(fd, readable)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        loop.remove_reader(fd)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
