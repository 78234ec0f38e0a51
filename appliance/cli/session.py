"""Logging a person in for a CLI command that changes state: shared by every command group.

The password is read from the terminal (getpass) or, for automation, one line per password from standard input
with `--password-stdin`; never from argv or the environment. The login is audited (users.login).
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from appliance.audit.log import AuditLog
from appliance.cli.argtypes import add_login_arguments
from appliance.config import load_config
from appliance.production import users
from appliance.production.model import ProductionError
from appliance.production.users import Permission, User
from appliance.runtime import Core, open_core

__all__ = ["Passwords", "Session", "actor", "add_login_arguments", "authorised", "session"]


class Passwords:
    """Passwords from the terminal, or one per line from stdin (--password-stdin): never argv or env."""

    def __init__(self, from_stdin: bool) -> None:
        self.from_stdin = from_stdin

    def read(self, prompt: str) -> str:
        if self.from_stdin:
            line = sys.stdin.readline()
            if not line:
                raise ProductionError(
                    f"--password-stdin: no line on standard input for: {prompt.rstrip(': ')}"
                )
            return line.rstrip("\r\n")
        try:
            return getpass.getpass(prompt)
        except EOFError:  # no terminal, and standard input is empty or closed
            raise ProductionError(
                f"{prompt.rstrip(': ')}: none given (no terminal, nothing on standard input;"
                " use --password-stdin)"
            ) from None

    def new(self, who: str) -> str:
        first = self.read(f"new password or PIN for {who}: ")
        if not self.from_stdin and self.read(f"again, for {who}: ") != first:
            raise ProductionError("the two passwords differ")
        return first


@dataclass
class Session:
    core: Core
    audit: AuditLog
    user: User | None
    passwords: Passwords


@contextmanager
def session(args: argparse.Namespace, *, login: bool = True) -> Iterator[Session]:
    with open_core(load_config(Path(args.config))) as core:
        audit = AuditLog(core.journal)
        pw = Passwords(bool(getattr(args, "password_stdin", False)))
        user = None
        if login:
            if not args.user:
                raise ProductionError("this command changes production state: give --user NAME")
            user = users.login(core.journal, audit, args.user, pw.read(f"password for {args.user}: "))
        yield Session(core, audit, user, pw)


def actor(s: Session) -> User:
    assert s.user is not None
    return s.user


@contextmanager
def authorised(args: argparse.Namespace, permission: Permission) -> Iterator[Session]:
    """Open the core, log the person in and check they hold `permission`."""
    with session(args) as s:
        actor(s).require(permission)
        yield s
