"""The `birthline` command's entry point.

`birthline dashboard ...` goes straight to the dashboard (console.dashboard.cli), which never loads the
appliance core, cryptography or the HSM layer: it starts in the time Textual takes to import. Every other
command (and `birthline -v dashboard`) goes through appliance.cli.main, which knows `dashboard` too.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["dashboard"]:
        from console.dashboard.cli import main as dashboard

        return dashboard(args[1:])
    from appliance.cli.main import main as full

    return full(args)


if __name__ == "__main__":
    sys.exit(main())
