"""Commissioning an appliance: `birthline init` and `birthline config check` (README.md "Setting up an
appliance")."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def cmd_config_check(args: argparse.Namespace) -> int:
    from appliance.config import load_config

    cfg = load_config(Path(args.config))
    print(f"{cfg.source}: OK ({len(cfg.profiles)} profiles: {', '.join(sorted(cfg.profiles))})")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Setting up the state directory is the appliance's own job (before any person exists): no login, and
    refused while the daemon runs (it would replace the TLS credential under the running listener)."""
    from appliance.audit.log import ensure_audit_key
    from appliance.cli import stations as stations_cli
    from appliance.config import load_config
    from appliance.daemon_lock import daemon_job
    from appliance.runtime import open_core

    cfg = load_config(Path(args.config))
    with daemon_job(cfg, "init"), open_core(cfg) as core:
        print(f"state directory {cfg.appliance.state_dir}")
        print(f"journal {core.journal.path}: {core.journal.integrity_check()}")
        print(f"HSM token {cfg.hsm.token_label!r}: logged in, {len(core.token.list_keys())} key(s)")
        stations_cli.init_stations(core)
        # The audit key exists from the start, so the auditor can pin its public key at commissioning.
        cp = core.audit.checkpoint(ensure_audit_key(core.token))
        print(
            f"audit log: head {cp.seq} checkpointed with HSM key {cp.key_label!r}; `birthline audit public-key`"
        )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    """Add `init` and `config ...` to the `birthline` parser."""
    with_config(
        sub.add_parser("init", help="create the state directory and journal; check the HSM login")
    ).set_defaults(func=cmd_init)
    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="sub", required=True)
    with_config(
        cfg.add_parser("check", help="validate the configuration, listing every problem")
    ).set_defaults(func=cmd_config_check)
