"""Commissioning an appliance: `birthline init` and `birthline config check` (README.md "Setting up an
appliance")."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from appliance.cli.argtypes import add_login_arguments

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def cmd_config_check(args: argparse.Namespace) -> int:
    """The file, then (unless --no-hsm) what the appliance needs of the HSM, in order: the PIN source, the
    module, the token, one login. The first failure ends the command with what to do."""
    from appliance.config import config_warnings, load_config

    cfg = load_config(Path(args.config))
    print(f"{cfg.source}: OK ({len(cfg.profiles)} profiles: {', '.join(sorted(cfg.profiles))})")
    for warning in config_warnings(cfg):
        print(f"warning: {warning}")
    if args.no_hsm:
        return 0
    from hsm.commission import CHECKS

    for check in CHECKS:
        found = check(cfg.hsm)
        print(f"{found.what}: {found.found}")
    return 0


def cmd_hsm_init_token(args: argparse.Namespace) -> int:
    """A new token for the configuration's [hsm]: its label, module and PIN file (SoftHSM: and its softhsm_conf,
    written if missing). The user PIN is the PIN file's if it exists, else asked for (or generated with
    --generate) and written there; the SO PIN likewise with --so-pin-file. Before `birthline init`: there is no
    journal to audit it in yet."""
    import getpass
    import secrets

    from appliance.config import load_config
    from appliance.errors import BirthlineError
    from appliance.files import write_private
    from hsm.commission import give_to, init_token, refuse_existing_label, write_softhsm_conf
    from hsm.config import HsmConfig
    from hsm.pin import read_pin

    cfg = load_config(Path(args.config))
    hsm = cfg.hsm
    if hsm.pin_file is None:
        raise BirthlineError(
            "hsm init-token writes the user PIN to [hsm] pin_file; with pin_credential, initialise the token with"
            " the HSM's own tool and put the PIN in the credential (docs/configuration.md, [hsm])"
        )
    owner = _owner(args.owner) if args.owner else None
    if hsm.softhsm_conf is not None:
        write_softhsm_conf(Path(hsm.softhsm_conf))
    # Before any PIN file is written: a refusal leaves every file as it was.
    refuse_existing_label(hsm)

    def pin(path: Path | None, what: str) -> tuple[str, Path | None]:
        """The PIN from its file, or a new one (generated or typed twice) and the file to write it to."""
        if path is not None and (path.exists() or path.is_symlink()):
            return read_pin(HsmConfig(module="", token_label="", pin_file=str(path))), None
        if args.generate:
            return secrets.token_urlsafe(24), path
        if not sys.stdin.isatty():  # a prompt, or nothing: a PIN is never read from a pipe
            raise BirthlineError(
                f"{what}: no terminal to ask on: give --generate, or write it to a file first"
            )
        first = getpass.getpass(f"new {what}: ")
        if getpass.getpass(f"again, {what}: ") != first:
            raise BirthlineError(f"the two {what}s differ")
        return first, path

    so_file = Path(args.so_pin_file) if args.so_pin_file else None
    if args.generate and so_file is None:
        raise BirthlineError(
            "--generate needs --so-pin-file FILE to keep the SO PIN (it resets a locked user PIN)"
        )
    user_pin, new_user_file = pin(Path(hsm.pin_file), "user PIN")
    so_pin, new_so_file = pin(so_file, "SO PIN")
    # Written before the token is made: a token whose PIN was lost would have to be thrown away.
    for path, value in ((new_user_file, user_pin), (new_so_file, so_pin)):
        if path is not None:
            write_private(path, value.encode() + b"\n")
    slot = init_token(hsm, so_pin, user_pin)
    del user_pin, so_pin
    if owner is not None:
        for path in give_to(hsm, owner[0], owner[1]):
            print(f"{path}: owned by {args.owner}")
    print(f"token {hsm.token_label!r} initialised in slot {slot} of {hsm.module}")
    print(f"user PIN: {hsm.pin_file} (0600){'' if new_user_file else ', as it was'}")
    if so_file is not None:
        print(
            f"SO PIN: {so_file} (0600){'' if new_so_file else ', as it was'}: keep it offline; it resets the user PIN"
        )
    print("next: `birthline config check`, then `birthline init`")
    return 0


def _owner(name: str) -> tuple[int, int]:
    import pwd

    from appliance.errors import BirthlineError

    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise BirthlineError(f"--owner {name}: no such user (create the daemon's user first)") from None
    return entry.pw_uid, entry.pw_gid


def cmd_init(args: argparse.Namespace) -> int:
    """Setting up the state directory is the appliance's own job (before any person exists): no login, and
    refused while the daemon runs (it would replace the TLS credential under the running listener). The first
    run records the organisation the appliance's CAs are named after, and makes the management CA."""
    from appliance.audit.log import ensure_audit_key
    from appliance.ca import identity
    from appliance.cli import stations as stations_cli
    from appliance.config import load_config
    from appliance.daemon_lock import daemon_job
    from appliance.runtime import open_core

    cfg = load_config(Path(args.config))
    given = args.organisation
    # Every argument is checked before anything is created or recorded: a refused `init` records nothing.
    if given is not None:
        identity.check_organisation(given)
    if args.management_subject is not None:
        from appliance.ca.hierarchy import parse_subject

        identity.check_subject(parse_subject(args.management_subject), given_by="--management-subject")
    with daemon_job(cfg, "init"), open_core(cfg) as core:
        print(f"state directory {cfg.appliance.state_dir}")
        print(f"journal {core.journal.path}: {core.journal.integrity_check()}")
        print(f"HSM token {cfg.hsm.token_label!r}: logged in, {len(core.token.list_keys())} key(s)")
        recorded = identity.organisation(core.journal)
        if given is None and recorded is None:
            given = _ask_organisation()
        org = identity.check_organisation(given) if given else (recorded or "")
        if recorded is not None and org != recorded:
            identity.record(core.journal, org, audit=core.audit, actor="init")  # refuses, writing nothing
        # Recorded once the management CA and the TLS credential are made: a failed `init` records nothing.
        stations_cli.init_stations(core, management_subject=args.management_subject, organisation=org)
        org = identity.record(core.journal, org, audit=core.audit, actor="init")
        print(f"organisation {org!r}: the appliance's CAs are named after it")
        # The audit key exists from the start, so the auditor can pin its public key at commissioning.
        cp = core.audit.checkpoint(ensure_audit_key(core.token))
        print(
            f"audit log: head {cp.seq} checkpointed with HSM key {cp.key_label!r}; `birthline audit public-key`"
        )
    return 0


def _ask_organisation() -> str:
    from appliance.ca.identity import IdentityError

    if not sys.stdin.isatty():
        raise IdentityError(
            "the organisation the appliance's CAs are named after: give --organisation NAME (e.g. 'Acme Devices')"
        )
    return input("organisation the appliance's CAs are named after (O=), e.g. Acme Devices: ")


def cmd_tls_reissue(args: argparse.Namespace) -> int:
    """A new TLS server key and certificate for the configured names, by an administrator, audited
    (tls.reissued). A running daemon keeps serving the one it loaded until it restarts."""
    from appliance import stations_registry as reg
    from appliance.cli.session import actor, authorised
    from appliance.daemon_lock import running
    from appliance.production.users import Permission

    with authorised(args, Permission.CA_MANAGE) as s:
        cfg = s.core.config
        names = reg.server_names(cfg.appliance.names, cfg.stations.lan_address)
        files = reg.reissue_tls_server(
            s.core.journal, s.core.token, cfg.stations.tls_dir, cfg.stations.management_ca, names,
            audit=s.audit, actor=actor(s).name,
        )  # fmt: skip
    print(f"TLS server certificate {files.cert} reissued for {', '.join(names)}")
    holder = running(cfg.appliance.state_dir)
    if holder is not None:
        print(f"the running daemon ({holder}) serves it after a restart (systemctl restart birthline)")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    """Add `init` and `config ...` to the `birthline` parser."""
    sp = with_config(
        sub.add_parser("init", help="create the state directory and journal; check the HSM login")
    )
    sp.add_argument(
        "--organisation",
        help="the organisation the appliance's CAs are named after (O=); asked for when not given; recorded once",
    )
    sp.add_argument(
        "--management-subject",
        help="the management CA's name (default: O=<organisation>, CN=<organisation> Management CA)",
    )
    sp.set_defaults(func=cmd_init)
    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="sub", required=True)
    sp = with_config(
        cfg.add_parser(
            "check",
            help="validate the configuration, listing every problem; then the PIN source, the HSM module, the"
            " token and one login (run it as the daemon's user)",
        )
    )
    sp.add_argument("--no-hsm", action="store_true", help="check the file only (no HSM here)")
    sp.set_defaults(func=cmd_config_check)
    hsm = sub.add_parser("hsm", help="the HSM token").add_subparsers(dest="sub", required=True)
    sp = with_config(
        hsm.add_parser(
            "init-token",
            help="initialise a new token ([hsm] token_label) in a free slot: SoftHSM, or a module with C_InitToken",
        )
    )
    sp.add_argument(
        "--so-pin-file",
        help="the SO PIN: read from this file (0600) if it exists, else written there (new, 0600)",
    )
    sp.add_argument(
        "--generate",
        action="store_true",
        help="random PINs for those whose file does not exist yet (else they are asked for on the terminal)",
    )
    sp.add_argument(
        "--owner",
        metavar="USER",
        help="the daemon's user: made owner of the user PIN file and (SoftHSM) of softhsm_conf and its token"
        " directory, so that the daemon and `config check` run as that user (the SO PIN file stays as written)",
    )
    sp.set_defaults(func=cmd_hsm_init_token)
    tls = sub.add_parser("tls", help="the appliance's TLS server certificate").add_subparsers(
        dest="sub", required=True
    )
    sp = with_config(
        tls.add_parser(
            "reissue",
            help="a new TLS server certificate for [appliance] names (an administrator; audited)",
        )
    )
    add_login_arguments(sp, required=True, who="an administrator")
    sp.set_defaults(func=cmd_tls_reissue)
