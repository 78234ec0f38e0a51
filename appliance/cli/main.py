"""`birthline`: set up, operate and demonstrate the appliance.

Every command that touches state takes --config (default /etc/birthline/birthline.toml). Secrets are never
arguments: the HSM PIN comes from the file or credential the configuration names.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance import ca as ca_mod
from appliance import names
from appliance.audit.log import ensure_audit_key
from appliance.cli import argfiles, argtypes
from appliance.cli import audit as audit_cli
from appliance.cli import production as production_cli
from appliance.cli import revocation as revocation_cli
from appliance.cli import stations as stations_cli
from appliance.cli import upstream as upstream_cli
from appliance.cli.session import Session, actor, add_login_arguments, authorised
from appliance.config import DEFAULT_CONFIG_PATH, Config, config_warnings, load_config
from appliance.daemon_lock import daemon_job
from appliance.errors import BirthlineError, IssuancePending
from appliance.issuance.policy import IssueRequest
from appliance.production.users import Permission
from appliance.runtime import open_core, read_journal, running_issuer
from hsm.algorithms import KeyAlgorithm
from hsm.errors import HsmError


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def cmd_config_check(args: argparse.Namespace) -> int:
    cfg = _config(args)
    print(f"{cfg.source}: OK ({len(cfg.profiles)} profiles: {', '.join(sorted(cfg.profiles))})")
    for warning in config_warnings(cfg):
        print(f"warning: {warning}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Setting up the state directory is the appliance's own job (before any person exists): no login, and
    refused while the daemon runs (it would replace the TLS credential under the running listener)."""
    cfg = _config(args)
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


def cmd_ca_init_root(args: argparse.Namespace) -> int:
    with authorised(args, Permission.CA_MANAGE) as s:
        core = s.core
        rec = ca_mod.create_root(
            core.journal, core.token, args.name, args.subject or ca_mod.hierarchy.default_subject("root"),
            KeyAlgorithm(args.algorithm), path_len=args.path_len, validity_days=args.validity_days, audit=s.audit, actor=actor(s).name,
        )  # fmt: skip
        print(f"created root CA {rec.name!r}: {rec.subject} (key {rec.key_label} in the HSM)")
    return 0


def cmd_ca_init_issuing(args: argparse.Namespace) -> int:
    with authorised(args, Permission.CA_MANAGE) as s:
        core = s.core
        rec = ca_mod.create_issuing(
            core.journal, core.token, args.name, args.subject or ca_mod.hierarchy.default_subject("issuing"),
            args.parent, KeyAlgorithm(args.algorithm), path_len=args.path_len, validity_days=args.validity_days, audit=s.audit, actor=actor(s).name,
        )  # fmt: skip
        print(f"created issuing CA {rec.name!r} under {rec.parent!r}: {rec.subject}")
    return 0


def cmd_ca_init_management(args: argparse.Namespace) -> int:
    with authorised(args, Permission.CA_MANAGE) as s:
        core = s.core
        rec = ca_mod.create_management(
            core.journal, core.token, args.name, args.subject or ca_mod.hierarchy.default_subject("management"),
            KeyAlgorithm(args.algorithm), validity_days=args.validity_days, audit=s.audit, actor=actor(s).name,
        )  # fmt: skip
        print(f"created management CA {rec.name!r}: {rec.subject}")
    return 0


def cmd_ca_request(args: argparse.Namespace) -> int:
    with authorised(args, Permission.CA_MANAGE) as s:
        core = s.core
        rec, pem = ca_mod.create_csr_for_external_root(
            core.journal,
            core.token,
            args.name,
            args.subject,
            KeyAlgorithm(args.algorithm),
            audit=s.audit,
            actor=actor(s).name,
        )
    argfiles.write("--out", args.out, pem)
    print(f"issuing CA {rec.name!r} awaits its certificate; CSR written to {args.out}")
    return 0


def cmd_ca_import(args: argparse.Namespace) -> int:
    cert = argfiles.read_bytes("--cert", args.cert)
    chain = argfiles.read_bytes("--chain", args.chain)
    with authorised(args, Permission.CA_MANAGE) as s:
        core = s.core
        rec = ca_mod.import_ca_certificate(
            core.journal,
            core.token,
            args.name,
            cert,
            chain,
            audit=s.audit,
            actor=actor(s).name,
        )
    print(f"issuing CA {rec.name!r} is active: {rec.subject}, chain of {len(rec.chain)}")
    return 0


def cmd_ca_list(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        records = ca_mod.list_cas(journal)
    if args.json:
        print(json.dumps([_ca_json(r) for r in records], indent=2))
        return 0
    children: dict[str | None, list[ca_mod.CaRecord]] = {}
    for r in records:
        children.setdefault(r.parent if r.parent in {x.name for x in records} else None, []).append(r)

    def show(parent: str | None, depth: int) -> None:
        for r in children.get(parent, []):
            info = _ca_json(r)
            print(
                f"{'  ' * depth}{r.name} [{r.role}, {r.state}] {r.subject}  key={r.key_label} ({r.key_algorithm.value})"
                + (f"  serial={info['serial']} notAfter={info['not_after']}" if r.cert_der else "")
            )
            show(r.name, depth + 1)

    show(None, 0)
    return 0


def _ca_json(r: ca_mod.CaRecord) -> dict[str, object]:
    out: dict[str, object] = {
        "name": r.name, "role": r.role, "state": r.state, "subject": r.subject, "parent": r.parent,
        "key_label": r.key_label, "key_algorithm": r.key_algorithm.value,
    }  # fmt: skip
    if r.cert_der:
        c = r.certificate
        bc = c.extensions.get_extension_for_class(x509.BasicConstraints).value
        out.update(
            serial=format(c.serial_number, "x"),
            issuer=c.issuer.rfc4514_string(),
            not_after=c.not_valid_after_utc.isoformat(),
            path_len=bc.path_length,
        )
    return out


def cmd_ca_chain(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        rec = ca_mod.load_ca(journal, args.name)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in rec.chain)
    if args.out:
        argfiles.write("--out", args.out, pem)
    else:
        sys.stdout.write(pem.decode())
    return 0


def cmd_issue(args: argparse.Namespace) -> int:
    """One certificate by hand, by a person (operator or supervisor) acting as a station: the station's line
    and work orders authorise it exactly as they would the fixture. The person's request and its answer are
    audited under their name; the core's own entries (intent, issued) follow as for any station."""
    csr = argfiles.read_bytes("--csr", args.csr)
    request = IssueRequest(
        args.serial, csr, station=args.station, request_id=args.request_id or "", profile=args.profile,
        front_end="cli",
    )  # fmt: skip
    asked = {
        "station": args.station, "device_serial": args.serial, "profile": args.profile,
        "request_id": request.request_id, "csr_sha256": hashlib.sha256(csr).hexdigest(),
    }  # fmt: skip

    async def run(s: Session) -> int:
        person = actor(s).name
        s.audit.record(person, "issue.requested", asked)
        try:
            async with running_issuer(s.core, prepare_workers=0) as service:
                result = await service.issue(request)
        except IssuancePending as exc:
            s.audit.record(
                person, "issue.answered", {**asked, "outcome": "pending", "ra_request": exc.request}
            )
            # RA mode: recorded and counted; the same command prints the certificate once it is there.
            print(f"pending: {exc.message} (RA request {exc.request}); run the same command again"
                  " once the upstream CA has issued it", file=sys.stderr)  # fmt: skip
            return 3
        except BirthlineError as exc:
            s.audit.record(person, "issue.answered", {**asked, "outcome": "refused", "code": exc.code.name})
            raise
        s.audit.record(person, "issue.answered", {
            **asked, "outcome": "reused" if result.reused else "issued", "cert_serial": result.cert_serial,
        })  # fmt: skip
        pem = result.certificate_pem + b"".join(
            x509.load_der_x509_certificate(c).public_bytes(serialization.Encoding.PEM) for c in result.chain
        )
        if args.out:
            argfiles.write("--out", args.out, pem)
        else:
            sys.stdout.write(pem.decode())
        print(
            f"{'reused' if result.reused else 'issued'} {result.cert_serial} for device {result.device_serial}",
            file=sys.stderr,
        )
        return 0

    with authorised(args, Permission.ISSUE) as s:
        return asyncio.run(run(s))


def cmd_journal_stats(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        counts = journal.counts()
        check = journal.integrity_check()
    print(json.dumps({"integrity": check, "states": counts}, indent=2, sort_keys=True))
    return 0 if check == "ok" else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance.demo import run_demo

    return run_demo(
        Path(args.state), args.devices, serve=args.serve, port=args.port, gentle_rate=args.gentle_rate,
        dashboard=args.dashboard,
    )  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="birthline", description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("-v", "--verbose", action="store_true", help="log debug detail to stderr")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="configuration file (TOML)")
        return sp

    algs = [a.value for a in KeyAlgorithm]
    with_config(
        sub.add_parser("init", help="create the state directory and journal; check the HSM login")
    ).set_defaults(func=cmd_init)
    cfg = sub.add_parser("config", help="configuration").add_subparsers(dest="sub", required=True)
    with_config(
        cfg.add_parser("check", help="validate the configuration, listing every problem")
    ).set_defaults(func=cmd_config_check)

    ca = sub.add_parser("ca", help="the CA hierarchy (keys in the HSM)").add_subparsers(
        dest="sub", required=True
    )
    sp = with_config(ca.add_parser("init-root", help="create a root CA on this appliance"))
    sp.add_argument("--name", default="root", type=argtypes.name(names.CA))
    sp.add_argument("--subject", help='e.g. "/O=Acme/CN=Acme Device Root CA"')
    sp.add_argument("--algorithm", choices=algs, default="ec-p256")
    sp.add_argument("--path-len", type=int, default=1)
    sp.add_argument(
        "--validity-days", type=int, help="default: no expiry (99991231235959Z, RFC 5280 4.1.2.5)"
    )
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_ca_init_root)
    sp = with_config(ca.add_parser("init-issuing", help="create an issuing (birth) CA signed by a local CA"))
    sp.add_argument("--name", default="issuing", type=argtypes.name(names.CA))
    sp.add_argument("--parent", default="root", type=argtypes.name(names.CA))
    sp.add_argument("--subject")
    sp.add_argument("--algorithm", choices=algs, default="ec-p256")
    sp.add_argument("--path-len", type=int, default=0)
    sp.add_argument("--validity-days", type=int)
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_ca_init_issuing)
    sp = with_config(
        ca.add_parser("init-management", help="create the management CA (TLS, station credentials)")
    )
    sp.add_argument("--name", default="management", type=argtypes.name(names.CA))
    sp.add_argument("--subject")
    sp.add_argument("--algorithm", choices=algs, default="ec-p256")
    sp.add_argument("--validity-days", type=int, default=3650)
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_ca_init_management)
    sp = with_config(ca.add_parser("request", help="external root: make the issuing key and write its CSR"))
    sp.add_argument("--name", default="issuing", type=argtypes.name(names.CA))
    sp.add_argument("--subject", required=True)
    sp.add_argument("--algorithm", choices=algs, default="ec-p256")
    sp.add_argument("--out", required=True, help="where to write the PEM CSR")
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_ca_request)
    sp = with_config(
        ca.add_parser("import", help="external root: import the signed CA certificate and chain")
    )
    sp.add_argument("--name", default="issuing", type=argtypes.name(names.CA))
    sp.add_argument("--cert", required=True, help="the CA certificate (PEM or DER)")
    sp.add_argument("--chain", required=True, help="PEM: the signing CA up to the root")
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_ca_import)
    sp = with_config(ca.add_parser("list", help="show the hierarchy"))
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_ca_list)
    sp = with_config(ca.add_parser("chain", help="write a CA's chain as PEM (the CA first, root last)"))
    sp.add_argument("--name", default="issuing", type=argtypes.name(names.CA))
    sp.add_argument("--out")
    sp.set_defaults(func=cmd_ca_chain)

    sp = with_config(
        sub.add_parser("issue", help="issue one birth certificate from a CSR (through the core)")
    )
    sp.add_argument(
        "--serial", required=True, type=argtypes.name(names.DEVICE_SERIAL), help="the device serial number"
    )
    sp.add_argument("--csr", required=True, help="PKCS#10 request, PEM or DER")
    sp.add_argument("--profile", type=argtypes.name(names.PROFILE))
    sp.add_argument(
        "--station",
        required=True,
        type=argtypes.name(names.STATION),
        help="act as this registered station: its line's active work order must allow the serial",
    )
    sp.add_argument(
        "--request-id", help="idempotency key; a retry with the same device and key gets the same cert"
    )
    sp.add_argument("--out", help="write certificate + chain (PEM) here instead of stdout")
    add_login_arguments(sp, required=True, who="an operator or supervisor")
    sp.set_defaults(func=cmd_issue)

    jr = sub.add_parser("journal", help="the issuance journal").add_subparsers(dest="sub", required=True)
    with_config(jr.add_parser("stats", help="row counts per state and SQLite integrity")).set_defaults(
        func=cmd_journal_stats
    )

    sp = sub.add_parser(
        "demo", help="run the demo on embedded defaults (SoftHSM token, CA hierarchy, issuance)"
    )
    sp.add_argument("--state", default="demo-state", help="state directory (default ./demo-state)")
    sp.add_argument("--serve", action="store_true", help="then keep the appliance running; see DIR/demo.json")
    sp.add_argument(
        "--port", type=int, help="LAN listener port on 127.0.0.1 (default: 7450 with --serve, else any)"
    )
    sp.add_argument("--devices", type=int, default=100)
    sp.add_argument(
        "--gentle-rate", type=float, default=0.0, metavar="R",
        help="with --serve: simulated fixtures keep enrolling R devices/s on both stations (default 0: none)",
    )  # fmt: skip
    sp.add_argument(
        "--dashboard", action="store_true",
        help="serve, keep simulated fixtures enrolling (--gentle-rate, default 1/s) and open `birthline"
        " dashboard` on the running demo in this terminal; closing it leaves the demo serving until Ctrl-C",
    )  # fmt: skip
    sp.set_defaults(func=cmd_demo)
    from console.dashboard import cli as dashboard_cli

    sp = sub.add_parser("dashboard", help="the operator dashboard of a running appliance (docs/dashboard.md)")
    dashboard_cli.add_arguments(sp)
    sp.set_defaults(func=dashboard_cli.run)
    from appliance.cli import fixtures

    fixtures.register(sub, with_config)  # station-client, simulate (fixture side)
    audit_cli.register(sub, with_config)  # audit verify|export|checkpoint|head|public-key
    revocation_cli.register(sub, with_config)  # revoke, revocation list, crl, ocsp
    upstream_cli.register(sub, with_config)  # upstream status|sync
    stations_cli.register(
        sub, with_config
    )  # station add|list|disable|enable|rotate-key, run (appliance side)
    production_cli.register(
        sub, with_config
    )  # user, tenant, product, line, workorder, device, report, export
    return p


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error (exit 2) or the help (exit 0)
        return exc.code if isinstance(exc.code, int) else 2
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except BirthlineError as exc:
        print(f"birthline: {exc}", file=sys.stderr)
        return 2
    except HsmError as exc:
        print(f"birthline: hsm: {exc.message}", file=sys.stderr)
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


if __name__ == "__main__":
    sys.exit(main())
