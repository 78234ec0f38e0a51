"""Run by test_http_listener (python -m tests.appliance.emfile_listener): a bounded HTTP listener in a process
whose descriptor limit is set far below the listener's cap, so a flood makes accept() fail with EMFILE.

Prints the port, then waits for a line on stdin and prints a JSON report. Logs go to stderr.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import resource
import sys

from aiohttp import web

from appliance.alarms import Alarms
from appliance.connections import AcceptErrors, HttpLimits
from appliance.httplisten import HttpListener


async def hello(request: web.Request) -> web.Response:
    return web.Response(text="hello")


async def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    alarms = Alarms()
    errors = AcceptErrors(alarms, quiet_s=2.0)  # two of asyncio's accept retries without a failure
    errors.install()
    app = web.Application()
    app.router.add_get("/hello", hello)
    limits = HttpLimits(max_connections=1000, max_connections_per_peer=1000, header_timeout_s=120,
                        body_timeout_s=120, idle_timeout_s=120)  # fmt: skip
    async with HttpListener(app, "127.0.0.1", 0, limits=limits, name="emfile", alarms=alarms,
                            accept_errors=errors) as server:  # fmt: skip
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 16, hard))
        print(server.address[1], flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        report = {
            "accept_errors": errors.count,
            "alarm_active": alarms.get(AcceptErrors.CAUSE) is not None,
            "accepted": server.gate.counters["accepted"],
        }
        print(json.dumps(report), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
