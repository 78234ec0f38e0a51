"""`birthline demo`: the demo on embedded defaults (README.md "What `make demo` does")."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo import run_demo

    return run_demo(
        Path(args.state), args.devices, serve=args.serve, port=args.port, gentle_rate=args.gentle_rate,
        dashboard=args.dashboard,
    )  # fmt: skip


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    """Add `demo` to the `birthline` parser."""
    sp = sub.add_parser(
        "demo", help="run the demo on embedded defaults (SoftHSM token, CA hierarchy, issuance)"
    )
    sp.add_argument("--state", default="demo-state", help="state directory (default ./demo-state)")
    sp.add_argument("--serve", action="store_true", help="then keep the appliance running; see DIR/demo.json")
    sp.add_argument(
        "--port", type=int, help="LAN listener port on 127.0.0.1 (default: 7450 with --serve, else any)"
    )
    sp.add_argument("--devices", type=int, default=100)
    sp.add_argument(
        "--gentle-rate", type=float, default=0.0, metavar="R",
        help="with --serve: simulated fixtures keep enrolling R devices/s on both stations (default 0: none)",
    )  # fmt: skip
    sp.add_argument(
        "--dashboard", action="store_true",
        help="serve, keep simulated fixtures enrolling (--gentle-rate, default 1/s) and open `birthline"
        " dashboard` on the running demo in this terminal; closing it leaves the demo serving until Ctrl-C",
    )  # fmt: skip
    sp.set_defaults(func=cmd_demo)
