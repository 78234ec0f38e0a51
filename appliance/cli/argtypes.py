"""argparse types for names: a bad name on the command line is refused before anything is opened, in one line
that names the argument, the field and its rule (appliance.names holds the rules); and the login arguments.

Parsers are built with this module, so it imports nothing heavy: `birthline --help` must not pay for the
appliance (appliance/cli/main.py)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Protocol

from appliance import names


class _Rule(Protocol):
    def problem(self, value: object) -> str | None: ...


def name(rule: _Rule) -> Callable[[str], str]:
    """An argparse `type=` that accepts exactly what `rule` accepts."""

    def convert(value: str) -> str:
        problem = rule.problem(value)
        if problem is not None:
            raise argparse.ArgumentTypeError(problem)
        return value

    return convert


def add_login_arguments(sp: argparse.ArgumentParser, *, required: bool = False, who: str = "") -> None:
    """--user NAME and --password-stdin: who does a change (their password is asked for, never an argument)."""
    help_text = "who is doing this (their password is asked for)" + (f": {who}" if who else "")
    sp.add_argument("--user", required=required, type=name(names.USER), help=help_text)
    sp.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
