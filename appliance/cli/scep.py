"""`birthline scep challenge add | list | revoke` (docs/scep.md "Challenge passwords").

A supervisor (or an administrator) makes a challenge password for one device or for the devices of one work
order, on one SCEP label; the change is audited under their name. The password is shown once: on standard
output alone (so a script can take it: `CH=$(birthline scep challenge add ...)`), or written to `--out` (0600);
only its SHA-256 is kept.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from appliance import names
from appliance.cli import argfiles, argtypes
from appliance.cli.session import actor, add_login_arguments, authorised
from appliance.config import Config, load_config
from appliance.files import PRIVATE
from appliance.production.model import ProductionError, iso
from appliance.production.users import Permission
from appliance.runtime import read_journal
from appliance.scep import challenges

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
_DURATION = re.compile(r"(\d{1,6})([smhd]?)")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(value: str) -> float:
    """`90`, `90s`, `30m`, `12h`, `7d`."""
    match = _DURATION.fullmatch(value.strip())
    if match is None:
        raise argparse.ArgumentTypeError("a duration: a number with s, m, h or d (7d, 12h, 3600)")
    return float(int(match.group(1)) * _UNIT[match.group(2)])


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def cmd_add(args: argparse.Namespace) -> int:
    config = _config(args)
    if args.label not in config.scep.labels:
        known = ", ".join(sorted(config.scep.labels)) or "none configured"
        raise ProductionError(f"--label {args.label}: no such label in [scep.labels] ({known})")
    if args.out:
        # Before the challenge exists: its password is shown once, so a file that cannot take it (or already
        # holds another one) must stop the command while there is nothing to lose.
        argfiles.new_file("--out", args.out)
    with authorised(args, Permission.WORK_ORDER) as s:
        found, secret = challenges.add(
            s.core.journal, s.audit, actor(s), args.label, device_serial=args.device, work_order=args.work_order,
            valid_s=args.valid_for,
        )  # fmt: skip
    whom = " and ".join(
        part
        for part in (
            f"device {found.device_serial}" if found.device_serial else "",
            f"work order {found.work_order}" if found.work_order else "",
        )
        if part
    )
    print(f"challenge {found.id} on label {found.label} for {whom}, valid until {iso(found.expires_at)}",
          file=sys.stderr)  # fmt: skip
    if args.out:
        argfiles.write("--out", args.out, secret.encode() + b"\n", mode=PRIVATE, replace=False)
        print(f"the challenge password is in {args.out} (0600)", file=sys.stderr)
    else:
        print(secret)
    return 0


def _row(c: challenges.Challenge, now: float) -> dict[str, object]:
    return {
        "id": c.id, "label": c.label, "kind": c.kind, "device_serial": c.device_serial, "work_order": c.work_order,
        "state": c.state(now), "created_by": c.created_by, "created_at": iso(c.created_at),
        "expires_at": iso(c.expires_at), "revoked_by": c.revoked_by, "revoked_at": iso(c.revoked_at),
        "uses": c.uses, "first_used_at": iso(c.first_used_at), "last_used_at": iso(c.last_used_at),
    }  # fmt: skip


def cmd_list(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        found = [c for c in challenges.list_challenges(journal) if args.label in (None, c.label)]
    now = time.time()
    if args.json:
        print(json.dumps([_row(c, now) for c in found], indent=2, sort_keys=True))
        return 0
    for c in found:
        whom = c.device_serial or f"work order {c.work_order}"
        if c.device_serial and c.work_order:
            whom += f" (work order {c.work_order})"
        print(f"{c.id:>5}  {c.label:<16} {c.state(now):<8} {whom}; by {c.created_by}, until {iso(c.expires_at)},"
              f" used {c.uses} time(s)")  # fmt: skip
    return 0


def cmd_revoke(args: argparse.Namespace) -> int:
    with authorised(args, Permission.WORK_ORDER) as s:
        found = challenges.revoke(s.core.journal, s.audit, actor(s), args.id)
    print(f"challenge {found.id} on label {found.label} revoked")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    scep = sub.add_parser("scep", help="the SCEP front end (docs/scep.md)").add_subparsers(
        dest="sub", required=True
    )
    ch = scep.add_parser("challenge", help="challenge passwords for SCEP devices").add_subparsers(
        dest="action", required=True
    )
    sp = with_config(
        ch.add_parser("add", help="make a challenge password (shown once) for a device or a work order")
    )
    sp.add_argument(
        "--label", required=True, type=argtypes.name(names.SCEP_LABEL), help="the SCEP label it is for"
    )
    sp.add_argument(
        "--device", type=argtypes.name(names.DEVICE_SERIAL), help="one device: one-time, for its key"
    )
    sp.add_argument("--work-order", type=argtypes.name(names.WORK_ORDER_ID),
                    help="any device of this work order (alone), or with --device: that device within it")  # fmt: skip
    sp.add_argument("--valid-for", type=duration, default=challenges.DEFAULT_VALID_S,
                    help="how long it may be used: 7d (default), 12h, 3600 ...")  # fmt: skip
    sp.add_argument("--out", help="write the password to this file (0600) instead of standard output")
    add_login_arguments(sp, required=True, who="a supervisor or an administrator")
    sp.set_defaults(func=cmd_add)
    sp = with_config(ch.add_parser("list", help="the challenges (never their passwords) and their state"))
    sp.add_argument("--label", type=argtypes.name(names.SCEP_LABEL))
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_list)
    sp = with_config(ch.add_parser("revoke", help="stop a challenge from being used"))
    sp.add_argument("id", type=int)
    add_login_arguments(sp, required=True, who="a supervisor or an administrator")
    sp.set_defaults(func=cmd_revoke)
