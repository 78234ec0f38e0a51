"""`birthline station ...` (the station registry) and `birthline run` (the daemon in the foreground).

Station secrets never appear on the command line, in the config or on stdout: `add` and `rotate-key` write
them to a credential directory (files 0600) for provisioning the fixture.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

from appliance import ca as ca_mod
from appliance import names
from appliance import stations_registry as reg
from appliance.ca import identity
from appliance.cli import argtypes
from appliance.cli.session import actor, add_login_arguments, authorised
from appliance.config import Config, load_config
from appliance.daemon_lock import DaemonRunning, daemon_job
from appliance.issuance.pauses import PauseError, StationPauses
from appliance.production.model import ProductionError
from appliance.production.users import Permission
from appliance.runtime import Core, read_journal

REASON_MAX = 200  # as the control API's station.pause

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def init_stations(
    core: Core, *, management_subject: str | None = None, organisation: str | None = None
) -> None:
    """`birthline init`: the management CA and the appliance's TLS server credential, if missing. The CA is
    named `management_subject`, else after `organisation` (not recorded yet), else after the recorded one."""
    cfg = core.config.stations
    names = reg.server_names(core.config.appliance.names, cfg.lan_address)
    subject = management_subject or (
        identity.default_subject("management", organisation) if organisation else None
    )
    ca = reg.ensure_management_ca(
        core.journal, core.token, cfg.management_ca, audit=core.audit, actor="init", subject=subject
    )  # fmt: skip
    files = reg.ensure_tls_server(
        core.journal, core.token, cfg.tls_dir, cfg.management_ca, names=names, audit=core.audit, actor="init"
    )
    print(f"management CA {cfg.management_ca!r}: {ca.subject}")
    wanted = (
        ca_mod.hierarchy.parse_subject(management_subject).rfc4514_string() if management_subject else None
    )
    if wanted is not None and ca.subject != wanted:
        print(f"  (it existed already: --management-subject {management_subject!r} was not used)")
    if identity.is_demo_name(ca.subject):
        print("  warning: it carries the demo's name (made by an earlier `birthline init`): make another with"
              " `birthline ca init-management --name NAME`, set [stations] management_ca to it, run"
              " `birthline init` and rotate the LAN stations' keys")  # fmt: skip
    served = reg.served_names(files)
    print(f"TLS server certificate {files.cert} (key {files.key}, 0600) for {', '.join(served)}")
    if set(served) != set(names):
        print(
            f"  it does not carry the configured names ({', '.join(names)}): `birthline tls reissue --user ADMIN`"
        )


def lan_host(cfg: Config) -> str | None:
    """Where a LAN fixture reaches the appliance, for its bundle (station.json "host"): the first configured
    name with the listener's port, else the listener's own address unless it is a wildcard."""
    address = cfg.stations.lan_address
    if address is None:
        return None
    host, port = address
    if cfg.appliance.names:
        host = cfg.appliance.names[0]
    elif host in ("", "0.0.0.0", "::"):  # noqa: S104 - compared against, never bound
        return None
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def cmd_station_add(args: argparse.Namespace) -> int:
    kind = "serial" if args.serial else "lan"
    out = reg.check_bundle_dir(Path(args.out))
    with authorised(args, Permission.STATION_MANAGE) as s:
        cfg = s.core.config
        creds = reg.add_station(
            s.core.journal, s.core.token, args.name, kind, port=args.serial, baud=args.baud,
            management_ca=cfg.stations.management_ca, audit=s.audit, actor=actor(s).name,
        )  # fmt: skip
    reg.write_bundle(creds, out, lan_host=lan_host(cfg))
    print(
        f"added {kind} station {args.name!r}; credentials for the fixture written to {out} (keep them secret)"
    )
    return 0


def cmd_station_list(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        records = reg.list_stations(journal)
    if args.json:
        print(json.dumps([r.public() for r in records], indent=2))
        return 0
    if not records:
        print("no stations registered")
    for r in records:
        where = (
            f"{r.port} @ {r.baud}" if r.kind == "serial" else f"tls {(r.tls_fingerprint or b'').hex()[:16]}"
        )
        when = dt.datetime.fromtimestamp(r.rotated_at or r.created_at, dt.UTC).strftime("%Y-%m-%d %H:%M")
        print(
            f"{r.name:<24} {r.kind:<6} {'enabled' if r.enabled else 'DISABLED':<9} {where}  key since {when}"
        )
    return 0


def _set_enabled(args: argparse.Namespace, enabled: bool) -> int:
    with authorised(args, Permission.STATION_DISABLE) as s:
        reg.set_enabled(s.core.journal, args.name, enabled, audit=s.audit, actor=actor(s).name)
    print(f"station {args.name!r} {'enabled' if enabled else 'disabled'}")
    return 0


def cmd_station_disable(args: argparse.Namespace) -> int:
    return _set_enabled(args, False)


def cmd_station_enable(args: argparse.Namespace) -> int:
    return _set_enabled(args, True)


def _reason(value: str) -> str:
    if len(value) > REASON_MAX or any(not ch.isprintable() for ch in value):
        raise argparse.ArgumentTypeError(f"at most {REASON_MAX} printable characters")
    return value


def _pause(args: argparse.Namespace, pause: bool) -> int:
    """Pause or resume a station while no daemon runs. A running daemon holds the pauses in memory (its issuance
    core reads them on every request): while it runs, its console does it (docs/control-api.md)."""
    verb = "pause" if pause else "resume"
    config = _config(args)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(daemon_job(config, f"station {verb}"))
        except DaemonRunning as exc:
            raise DaemonRunning(
                f"the daemon runs ({exc.holder}): {verb} station {args.name!r} on its console"
                f" (`birthline dashboard`, or the control API's station.{verb})",
                exc.holder,
            ) from None
        with authorised(args, Permission.STATION_PAUSE) as s:
            pauses = StationPauses(s.core.journal)
            who = actor(s).name
            try:
                if pause:
                    reason = args.reason or "paused with the CLI"
                    asyncio.run(pauses.pause(args.name, who, reason, s.audit, via="cli"))
                else:
                    asyncio.run(pauses.resume(args.name, who, s.audit, via="cli"))
            except PauseError as exc:
                raise ProductionError(str(exc)) from None
    print(f"station {args.name!r} {'paused' if pause else 'resumed'}")
    return 0


def cmd_station_pause(args: argparse.Namespace) -> int:
    return _pause(args, True)


def cmd_station_resume(args: argparse.Namespace) -> int:
    return _pause(args, False)


def cmd_station_rotate(args: argparse.Namespace) -> int:
    out = reg.check_bundle_dir(Path(args.out))
    with authorised(args, Permission.STATION_MANAGE) as s:
        cfg = s.core.config
        creds = reg.rotate_key(
            s.core.journal, s.core.token, args.name, management_ca=cfg.stations.management_ca,
            audit=s.audit, actor=actor(s).name,
        )  # fmt: skip
    reg.write_bundle(creds, out, lan_host=lan_host(cfg))
    print(f"station {args.name!r} has new credentials in {out}; the old ones no longer work")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    import logging

    from appliance.daemon import run_daemon

    if not args.verbose:
        logging.getLogger().setLevel(logging.INFO)
    return run_daemon(_config(args))


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    st = sub.add_parser("station", help="the station registry (test fixtures)").add_subparsers(
        dest="sub", required=True
    )
    sp = with_config(
        st.add_parser("add", help="register a station and write its credentials for the fixture")
    )
    sp.add_argument(
        "--name", required=True, type=argtypes.name(names.STATION), help=f"station name: {names.STATION.rule}"
    )
    kind = sp.add_mutually_exclusive_group(required=True)
    kind.add_argument(
        "--serial",
        metavar="PORT",
        type=argtypes.name(names.SERIAL_PORT),
        help="serial port the station is bound to (/dev/serial/by-path/...)",
    )
    kind.add_argument("--lan", action="store_true", help="a LAN station (TLS client certificate)")
    sp.add_argument("--baud", type=int, help="serial only (default 115200)")
    sp.add_argument("--out", required=True, help="directory for the credential bundle (created, files 0600)")
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_station_add)
    sp = with_config(st.add_parser("list", help="list registered stations (never their keys)"))
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_station_list)
    sp = with_config(
        st.add_parser("disable", help="refuse a station from now on (a running daemon drops it)")
    )
    sp.add_argument("--name", required=True, type=argtypes.name(names.STATION))
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_station_disable)
    sp = with_config(st.add_parser("enable", help="accept a disabled station again"))
    sp.add_argument("--name", required=True, type=argtypes.name(names.STATION))
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_station_enable)
    sp = with_config(
        st.add_parser(
            "pause", help="refuse a station's requests STATION_PAUSED (no daemon running: else the console)"
        )
    )
    sp.add_argument("--name", required=True, type=argtypes.name(names.STATION))
    sp.add_argument("--reason", type=_reason, default="", help=f"why (at most {REASON_MAX} characters)")
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_station_pause)
    sp = with_config(
        st.add_parser("resume", help="end a station's pause (no daemon running: else the console)")
    )
    sp.add_argument("--name", required=True, type=argtypes.name(names.STATION))
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_station_resume)
    sp = with_config(
        st.add_parser("rotate-key", help="new station secret (and TLS certificate); old ones stop")
    )
    sp.add_argument("--name", required=True, type=argtypes.name(names.STATION))
    sp.add_argument("--out", required=True, help="directory for the new credential bundle")
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_station_rotate)
    with_config(
        sub.add_parser("run", help="run the daemon in the foreground (stations, issuance)")
    ).set_defaults(func=cmd_run)
