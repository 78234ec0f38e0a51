"""`birthline dashboard [--config FILE] [--socket PATH] [--user NAME]`: open the dashboard in this terminal.

`--screenshot FILE.svg` runs it without a terminal at `--size` (default 80x24), waits for the daemon's first
status document and `--after` seconds of events, shows `--show` (a panel or the help) as its key would, saves
the screen as SVG and exits (docs/dashboard.md's pictures are made so).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from console.locate import DEFAULT_CONFIG, control_socket

# --show: what the screenshot shows below the station grid (the key an operator would press for it).
SHOW = {"line": "", "alarms": "2", "log": "3", "help": "question_mark"}


def build_parser(prog: str = "birthline dashboard") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="The operator dashboard of a running appliance.")
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="the appliance's configuration file (TOML)")
    p.add_argument("--socket", help="the control socket (default: [control] socket of the configuration)")
    p.add_argument("--user", help="the name the login asks for first (the password is always typed)")
    p.add_argument(
        "--screenshot", metavar="FILE", help="save the screen as SVG and exit (no terminal needed)"
    )
    p.add_argument("--size", default="80x24", help="with --screenshot: COLUMNSxLINES (default 80x24)")
    p.add_argument("--after", type=float, default=3.0, help="with --screenshot: seconds to wait (default 3)")
    p.add_argument("--wait", type=float, default=30.0,
                   help="with --screenshot: give up (exit 1) after this many seconds without the daemon's status"
                   " (default 30)")  # fmt: skip
    p.add_argument("--show", choices=SHOW, default="line",
                   help="with --screenshot: the screen as it opens (line: the grid and work orders), the alarms or"
                   " the log below the grid, or the help")  # fmt: skip


def run(args: argparse.Namespace) -> int:
    try:
        socket = Path(args.socket) if args.socket else control_socket(Path(args.config))
    except (OSError, ValueError) as exc:
        print(f"birthline dashboard: --config: {exc}", file=sys.stderr)
        return 2
    size = re.fullmatch(r"(\d{2,4})x(\d{2,4})", args.size or "")
    if size is None:
        print("birthline dashboard: --size: COLUMNSxLINES, e.g. 80x24", file=sys.stderr)
        return 2
    # Textual loads here, after the arguments are known to be usable.
    from console.dashboard.app import DashboardApp
    from console.dashboard.link import Link

    shot = (Path(args.screenshot).resolve(), args.after, SHOW[args.show]) if args.screenshot else None
    app = DashboardApp(Link(socket), user=args.user, screenshot=shot, screenshot_wait_s=args.wait)
    if shot is not None:
        app.run(headless=True, size=(int(size[1]), int(size[2])))
    else:
        app.run()
    return app.return_code or 0


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))
