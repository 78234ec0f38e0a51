"""`birthline dashboard`: the operator console (console/dashboard, docs/dashboard.md). It talks to the daemon
only through the control socket, so registering it imports nothing of the appliance."""

from __future__ import annotations

import argparse
from collections.abc import Callable

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    """Add `dashboard` to the `birthline` parser (it has its own --config default)."""
    from console.dashboard import cli as dashboard_cli

    sp = sub.add_parser("dashboard", help="the operator dashboard of a running appliance (docs/dashboard.md)")
    dashboard_cli.add_arguments(sp)
    sp.set_defaults(func=dashboard_cli.run)
