"""argparse types for names: a bad name on the command line is refused before anything is opened, in one line
that names the argument, the field and its rule (appliance.names holds the rules)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Protocol


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
