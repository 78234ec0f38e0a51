"""`birthline upstream status | sync [--once]` (docs/cmp.md "The forwarder").

`sync` runs the forwarder in this process until the outbox is drained (or one pass with --once), for a systemd
timer or a cron job. It is the daemon's own job: refused while the daemon runs (appliance/daemon_lock.py), and
it takes no person (nothing a person decides: it sends what the journal already holds). Exit status: 0 when every
open record went upstream and none failed in this run, 1 otherwise (records stay queued for the next run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from pathlib import Path

from appliance.config import Config, load_config
from appliance.outbox import queue_status
from appliance.runtime import read_journal

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def cmd_status(args: argparse.Namespace) -> int:
    config = _config(args)
    with read_journal(config) as journal:
        status = queue_status(journal, config.upstream)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
        return 0
    if status["standalone"]:
        print("upstream:      none: a standalone line ([upstream] url is not set); issuances queue nothing, and"
              " no limit applies")  # fmt: skip
    else:
        print(f"upstream:      {status['url']} ({status['mode']})")
    for kind, states in sorted(status["depth"].items()):
        print(f"  {kind:6} " + ", ".join(f"{state} {n}" for state, n in sorted(states.items())))
    ra = status["ra_requests"]
    if ra:
        print("RA mode:       " + ", ".join(f"{state} {n}" for state, n in sorted(ra.items())))
    age = status["oldest_open_age_s"]
    print(f"open records:  {status['open']}; oldest {'-' if age is None else age_text(age)}"
          + (" (kept for an upstream CA configured later)" if status["standalone"] and status["open"] else ""))  # fmt: skip
    if status["standalone"]:
        return 0
    print(f"last success:  {status['last_success'] or '-'}")
    err = status["last_error"]
    print(f"last error:    {'-' if err is None else err['at'] + ' ' + err['error']}")
    for state in ("parked", "failed"):
        for rec in status[state]:
            print(f"{state}:{' ' * (13 - len(state))}outbox {rec['id']} ({rec['kind']} {rec['cert_serial']})"
                  f" {rec['at'] or ''}: {rec['reason']}")  # fmt: skip
    lim = status["limits"]
    print(f"limits:        alarm at {lim['max_queue_size']} records / {lim['max_queue_age_s']:.0f} s;"
          f" issuance stops at {lim['hard_max_queue_size']} / {lim['hard_max_queue_age_s']:.0f} s")  # fmt: skip
    if status["issuance_stopped"]:
        print("ALARM: the queue is over its HARD limit: local issuance is stopped")
    elif status["alarm"]:
        print("ALARM: the queue is over its limit")
    return 0


def age_text(seconds: float) -> str:
    """An age as a person reads it: "42 s", "17 min", "5 h 3 min", "30 d 0 h"."""
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 2 * 86400:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def cmd_sync(args: argparse.Namespace) -> int:
    """The daemon's forwarder, by hand or from a timer while the daemon is stopped: refused while it runs."""
    from appliance.cmp.forwarder_setup import make_forwarder
    from appliance.daemon_lock import daemon_job
    from appliance.runtime import open_core

    config = _config(args)
    with daemon_job(config, "upstream sync"):
        if not config.upstream.enabled:  # a supported mode: a timer left in place is not an error
            print("standalone line ([upstream] url is not set): nothing to send")
            return 0
        with open_core(config) as core:
            forwarder = make_forwarder(core)

            async def run() -> bool:
                forwarder.acquire()
                try:
                    return await forwarder.drain(once=args.once, timeout_s=args.timeout)
                finally:
                    await forwarder.close()

            ok = asyncio.run(run())
            print(json.dumps(forwarder.stats, sort_keys=True))
    return 0 if ok else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    up = sub.add_parser("upstream", help="the upstream CA forwarder (CMP outbox)").add_subparsers(
        dest="sub", required=True
    )
    sp = with_config(
        up.add_parser("status", help="queue depth, oldest record, last success and error, limits")
    )
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_status)
    sp = with_config(up.add_parser("sync", help="forward the outbox now (for a timer or cron job)"))
    sp.add_argument("--once", action="store_true", help="one pass only")
    sp.add_argument("--timeout", type=float, default=600.0, help="stop after this many seconds (default 600)")
    sp.set_defaults(func=cmd_sync)
