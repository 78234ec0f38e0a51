"""`birthline`: set up, operate and demonstrate the appliance.

Every command that touches state takes --config (default /etc/birthline/birthline.toml). Secrets are never
arguments: the HSM PIN comes from the file or credential the configuration names.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Final

DEFAULT_CONFIG_PATH: Final = "/etc/birthline/birthline.toml"

# Every top-level command, the module of appliance/cli that defines it, and the one-line help that module gives
# it. Only the module of the command being run is imported: an administrator runs dozens of commands, and the
# whole appliance (CMP's ASN.1 modules, aiohttp, the HSM layer) costs seconds to import where one read-only
# command needs a fraction of it. `birthline --help` imports none of them; a test checks this table against the
# modules' own parsers, so the two cannot drift.
COMMANDS: Final[dict[str, tuple[str, str]]] = {
    "init": ("commissioning", "create the state directory and journal; check the HSM login"),
    "config": ("commissioning", "configuration"),
    "hsm": ("commissioning", "the HSM token"),
    "tls": ("commissioning", "the appliance's TLS server certificate"),
    "ca": ("ca", "the CA hierarchy (keys in the HSM)"),
    "issue": ("issuing", "issue one birth certificate from a CSR (through the core)"),
    "journal": ("issuing", "the issuance journal"),
    "demo": ("demo", "run the demo on embedded defaults (SoftHSM token, CA hierarchy, issuance)"),
    "dashboard": ("dashboard", "the operator dashboard of a running appliance (docs/dashboard.md)"),
    "station-client": ("fixtures", "fixture side: talk to the appliance with a station bundle"),
    "simulate": ("fixtures", "run N simulated fixtures against a running appliance"),
    "audit": ("audit", "the tamper-evident audit log"),
    "revoke": ("revocation", "revoke certificates (supervisor); CRLs are regenerated"),
    "revocation": ("revocation", "the revocation store"),
    "crl": ("revocation", "certificate revocation lists"),
    "ocsp": ("revocation", "the OCSP responder"),
    "upstream": ("upstream", "the upstream CA forwarder (CMP outbox)"),
    "scep": ("scep", "the SCEP front end (docs/scep.md)"),
    "station": ("stations", "the station registry (test fixtures)"),
    "run": ("stations", "run the daemon in the foreground (stations, issuance)"),
    "user": ("production", "people and roles"),
    "tenant": ("production", "brand owners"),
    "product": ("production", "products: profile, issuing CA, key policy"),
    "line": ("production", "production lines and their stations"),
    "workorder": ("production", "work orders: quantity, allowlist, validity, lines"),
    "device": ("production", "rework and scrap (supervisor)"),
    "report": ("production", "reconciliation reports"),
    "export": ("production", "certificate exports"),
    "backup": (
        "backup",
        "archive the journal (online), the state, the SoftHSM token and the configuration; never a PIN",
    ),
    "restore": (
        "backup",
        "restore a backup onto a fresh state directory, checking its manifest (--check: only check)",
    ),
}


def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sp.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="configuration file (TOML)")
    return sp


def _command(argv: Sequence[str]) -> str | None:
    """The command named in argv: the first word that is not an option (the top level's options take no
    value)."""
    for word in argv:
        if not word.startswith("-"):
            return word
    return None


def build_parser(command: str | None = None, *, everything: bool = False) -> argparse.ArgumentParser:
    """The parser with the full definition of `command`'s module (of every module with everything=True); the
    other commands are listed by name and help only, which is all the top level shows of them."""
    p = argparse.ArgumentParser(prog="birthline", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = p.add_subparsers(dest="command", required=True)
    modules = dict.fromkeys(m for m, _ in COMMANDS.values()) if everything else {}
    if command in COMMANDS:
        modules[COMMANDS[command][0]] = None
    for module in modules:
        importlib.import_module(f"appliance.cli.{module}").register(sub, with_config)
    for name, (_, help_text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=help_text)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = build_parser(_command(argv)).parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (exit 2) or the help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    import logging

    from appliance.errors import BirthlineError, IssuanceFailed, IssuanceRefused

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except BirthlineError as exc:
        # A refusal of the issuance pipeline keeps its reason code, the one a station shows (station-protocol.md
        # section 8); any other error is its message alone, which says what is wrong and what to do.
        text = str(exc) if isinstance(exc, IssuanceRefused | IssuanceFailed) else exc.message
        print(f"birthline: {text}", file=sys.stderr)
        return 2
    except OSError as exc:
        # The environment, not the code: a state directory we may not enter, a full disk, a device that went
        # away. One line, like every other refusal; --verbose keeps the traceback for a bug report.
        if args.verbose:
            raise
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"birthline: {where}{exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        # An HSM error can only come from a command that imported the HSM layer: looked up, not imported here.
        hsm_errors = sys.modules.get("hsm.errors")
        if hsm_errors is not None and isinstance(exc, hsm_errors.HsmError):
            print(f"birthline: hsm: {exc.message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
