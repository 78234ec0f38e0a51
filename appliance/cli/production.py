"""`birthline user | tenant | product | line | workorder | device | report | export` (docs/production.md).

Commands that change production state take `--user NAME`; the password is read from the terminal (getpass)
or, for automation, one line per password from standard input with `--password-stdin`. Never from argv or the
environment. The command checks the person's role and the change is audited under their name.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

from appliance import names
from appliance.cli import argfiles, argtypes
from appliance.cli.session import actor, session
from appliance.config import Config, load_config
from appliance.production import reconcile, store, users
from appliance.production.allowlist import AllowlistError, SerialRange, check_serial, compile_pattern
from appliance.production.model import ISSUANCE_MODES, ProductionError, WorkOrderSpec, iso, parse_time
from appliance.production.users import Role
from appliance.runtime import read_journal

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def _dump(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


# -- users ---------------------------------------------------------------------------------------------------------------
def cmd_user_add(args: argparse.Namespace) -> int:
    if args.bootstrap:
        with session(args, login=False) as s:
            users.bootstrap(s.core.journal, s.audit, args.name, s.passwords.new(args.name))
        print(f"created the first administrator {args.name!r}")
        return 0
    if not args.role:
        raise ProductionError("give --role (operator, supervisor, administrator, auditor)")
    with session(args) as s:
        users.add_user(
            s.core.journal, s.audit, actor(s), args.name, Role(args.role), s.passwords.new(args.name)
        )
    print(f"added {args.role} {args.name!r}")
    return 0


def cmd_user_list(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        listed = users.list_users(journal)
    if args.json:
        _dump([{"name": u.name, "role": u.role, "enabled": u.enabled, "locked_until": iso(u.locked_until)}
               for u in listed])  # fmt: skip
        return 0
    for u in listed:
        state = "enabled" if u.enabled else "DISABLED"
        print(
            f"{u.name:<24} {u.role:<14} {state}"
            + (f"  locked until {iso(u.locked_until)}" if u.locked_until else "")
        )
    return 0


def cmd_user_enable(args: argparse.Namespace, enabled: bool) -> int:
    with session(args) as s:
        users.set_enabled(s.core.journal, s.audit, actor(s), args.name, enabled)
    print(f"user {args.name!r} {'enabled' if enabled else 'disabled'}")
    return 0


def cmd_user_passwd(args: argparse.Namespace) -> int:
    with session(args) as s:
        target = args.name or actor(s).name
        users.set_password(s.core.journal, s.audit, actor(s), target, s.passwords.new(target))
    print(f"password of {target!r} changed")
    return 0


# -- tenants, products, lines ------------------------------------------------------------------------------------------
def cmd_tenant_add(args: argparse.Namespace) -> int:
    with session(args) as s:
        store.add_tenant(s.core.journal, s.audit, actor(s), args.name, args.display_name or "")
    print(f"added tenant {args.name!r}")
    return 0


def cmd_tenant_list(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        tenants = store.list_tenants(journal)
    if args.json:
        _dump([{"name": t.name, "display_name": t.display_name} for t in tenants])
    for t in [] if args.json else tenants:
        print(f"{t.name:<24} {t.display_name}")
    return 0


def cmd_product_add(args: argparse.Namespace) -> int:
    with session(args) as s:
        profile = s.core.config.profiles.get(args.profile)
        if profile is None:
            raise ProductionError(f"no profile named {args.profile!r} in the configuration")
        store.add_product(
            s.core.journal, s.audit, actor(s), args.name, tenant=args.tenant, profile=profile,
            ca=args.ca or s.core.config.issuance.issuing_ca, key_algorithms=args.key_algorithm or (),
            issuance_mode=args.issuance_mode, revoke_on_update=args.key_update == "revoke",
        )  # fmt: skip
    print(f"added product {args.name!r} ({args.issuance_mode} issuance, key update: {args.key_update} old)")
    return 0


def cmd_product_key_update(args: argparse.Namespace) -> int:
    with session(args) as s:
        store.set_product_key_update(
            s.core.journal, s.audit, actor(s), args.name, args.key_update == "revoke"
        )
    print(f"product {args.name!r}: a key update {'revokes' if args.key_update == 'revoke' else 'keeps'} the old"
          " certificate")  # fmt: skip
    return 0


def cmd_product_mode(args: argparse.Namespace) -> int:
    with session(args) as s:
        store.set_product_mode(s.core.journal, s.audit, actor(s), args.name, args.issuance_mode)
    print(f"product {args.name!r}: {args.issuance_mode} issuance")
    return 0


def cmd_product_list(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        products = store.list_products(journal)
    if args.json:
        _dump([{"name": p.name, "tenant": p.tenant, "profile": p.profile, "ca": p.ca,
                "key_algorithms": sorted(p.key_algorithms), "issuance_mode": p.issuance_mode,
                "key_update": "revoke" if p.revoke_on_update else "keep"}
               for p in products])  # fmt: skip
    for p in [] if args.json else products:
        keys = ",".join(sorted(p.key_algorithms))
        print(f"{p.name:<24} tenant={p.tenant} profile={p.profile} ca={p.ca} keys={keys} mode={p.issuance_mode}"
              f" key_update={'revoke' if p.revoke_on_update else 'keep'}")  # fmt: skip
    return 0


def cmd_line_add(args: argparse.Namespace) -> int:
    with session(args) as s:
        store.add_line(s.core.journal, s.audit, actor(s), args.name, args.description or "")
    print(f"added line {args.name!r}")
    return 0


def cmd_line_list(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        lines = store.list_lines(journal)
    if args.json:
        _dump(
            [{"name": ln.name, "description": ln.description, "stations": list(ln.stations)} for ln in lines]
        )
    for ln in [] if args.json else lines:
        print(f"{ln.name:<24} stations: {', '.join(ln.stations) or '-'}  {ln.description}")
    return 0


def cmd_line_assign(args: argparse.Namespace) -> int:
    line = None if args.line == "none" else args.line
    with session(args) as s:
        store.assign_station(s.core.journal, s.audit, actor(s), args.station, line)
    print(
        f"station {args.station!r} is now on line {line!r}"
        if line
        else f"station {args.station!r} has no line"
    )
    return 0


# -- work orders ---------------------------------------------------------------------------------------------------------
def _spec(args: argparse.Namespace) -> WorkOrderSpec:
    problems = []
    serials = list(args.serial or [])
    if args.serials_file:
        text = argfiles.read_text("--serials-file", args.serials_file)
        serials += [ln.strip() for ln in text.splitlines() if ln.strip()]
    ranges = []
    try:
        for s in serials:
            check_serial(s)
        ranges = [SerialRange.parse(r) for r in args.range or []]
        if args.pattern:
            compile_pattern(args.pattern)
    except AllowlistError as exc:
        problems.append(str(exc))
    if not serials and not ranges and not args.pattern:
        problems.append("give an allowlist: --serial, --serials-file, --range and/or --pattern")
    try:
        vf = parse_time(args.valid_from) if args.valid_from else None
        vt = parse_time(args.valid_to) if args.valid_to else None
    except ValueError as exc:
        raise ProductionError(str(exc)) from None
    if problems:
        raise ProductionError("; ".join(problems))
    return WorkOrderSpec(
        args.id, args.product, args.quantity, tuple(args.line or ()), tuple(serials), tuple(ranges),
        args.pattern, vf, vt,
    )  # fmt: skip


def cmd_wo_add(args: argparse.Namespace) -> int:
    spec = _spec(args)
    with session(args) as s:
        store.add_work_order(s.core.journal, s.audit, actor(s), spec, activate=args.activate)
    print(f"added work order {spec.id!r} ({'active' if args.activate else 'draft'})")
    return 0


def cmd_wo_import(args: argparse.Namespace) -> int:
    path = Path(args.file)
    fmt = args.format or ("json" if path.suffix.lower() == ".json" else "csv")
    text = argfiles.read_text("FILE", path)
    with session(args) as s:
        ids = store.import_work_orders(
            s.core.journal, s.audit, actor(s), text, fmt, source=path.name, activate=args.activate
        )
    print(f"imported {len(ids)} work order(s): {', '.join(ids)}")
    return 0


def cmd_wo_state(args: argparse.Namespace, state: str) -> int:
    with session(args) as s:
        fn = store.activate_work_order if state == "active" else store.close_work_order
        fn(s.core.journal, s.audit, actor(s), args.id)
    print(f"work order {args.id!r} is {state}")
    return 0


def cmd_wo_assign_line(args: argparse.Namespace) -> int:
    with session(args) as s:
        store.assign_work_order_line(
            s.core.journal, s.audit, actor(s), args.id, args.line, remove=args.remove
        )
    print(f"work order {args.id!r}: line {args.line!r} {'removed' if args.remove else 'assigned'}")
    return 0


def cmd_wo_list(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        orders = store.list_work_orders(journal, args.state)
    if args.json:
        _dump([o.public() for o in orders])
    for o in [] if args.json else orders:
        print(
            f"{o.id:<20} {o.state:<7} {o.product:<20} {o.consumed}/{o.quantity}  lines: {', '.join(o.lines) or '-'}"
        )
    return 0


def cmd_wo_show(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        o = store.get_work_order(journal, args.id)
    data = o.public()
    if args.json:
        _dump(data)
    for k, v in [] if args.json else data.items():
        print(f"{k:<12} {v}")
    return 0


# -- rework, scrap -------------------------------------------------------------------------------------------------------
def cmd_device(args: argparse.Namespace, what: str) -> int:
    with session(args) as s:
        fn = store.rework if what == "rework" else store.scrap
        fn(s.core.journal, s.audit, actor(s), args.serial, args.reason, ca=s.core.config.issuance.issuing_ca)
    if what == "rework":
        print(f"device {args.serial!r}: rework authorised; the next request with a new key will be issued")
    else:
        print(
            f"device {args.serial!r} scrapped; its certificate is revoked (cessationOfOperation) on the next CRL and OCSP"
        )
    return 0


# -- reconciliation ------------------------------------------------------------------------------------------------------
def cmd_report(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        rep = reconcile.report(journal, args.id)
    if args.json:
        _dump(rep.public())
        return 0 if rep.consistent else 1
    for k, v in rep.public().items():
        shown = ", ".join(f"{r} {n}" for r, n in v.items()) or "-" if isinstance(v, dict) else v
        print(f"{k.replace('_', ' '):<22} {'-' if shown is None else shown}")
    return 0 if rep.consistent else 1


def cmd_export(args: argparse.Namespace) -> int:
    if not args.csv and not args.pem:
        raise ProductionError("give --csv FILE and/or --pem FILE")
    with read_journal(_config(args)) as journal:
        certs = reconcile.certificates(journal, args.id)
    if args.csv:
        argfiles.write("--csv", args.csv, reconcile.export_csv(certs).encode("utf-8"))
    if args.pem:
        argfiles.write("--pem", args.pem, reconcile.export_pem(certs))
    revoked = sum(c.revoked for c in certs)
    print(
        f"exported {len(certs)} certificate(s) of work order {args.id!r}: {revoked} revoked"
        + (" (in the CSV with reason and time; left out of the PEM list)" if revoked else "")
    )
    return 0


# -- registration --------------------------------------------------------------------------------------------------------
def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    def changing(sp: argparse.ArgumentParser, *, required: bool = True) -> argparse.ArgumentParser:
        with_config(sp)
        sp.add_argument(
            "--user",
            required=required,
            type=argtypes.name(names.USER),
            help="your user name (you are asked for your password)",
        )
        sp.add_argument(
            "--password-stdin",
            action="store_true",
            help="read password(s) from stdin, one per line (automation)",
        )
        return sp

    def listing(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        with_config(sp)
        sp.add_argument("--json", action="store_true")
        return sp

    us = sub.add_parser("user", help="people and roles").add_subparsers(dest="sub", required=True)
    sp = changing(
        us.add_parser("add", help="add a person (administrator), or --bootstrap the first one"),
        required=False,
    )
    sp.add_argument("name", type=argtypes.name(names.USER))
    sp.add_argument("--role", choices=[r.value for r in Role])
    sp.add_argument(
        "--bootstrap", action="store_true", help="create the first administrator (no users exist yet)"
    )
    sp.set_defaults(func=cmd_user_add)
    listing(us.add_parser("list", help="list accounts")).set_defaults(func=cmd_user_list)
    sp = changing(us.add_parser("disable", help="disable an account (administrator)"))
    sp.add_argument("name", type=argtypes.name(names.USER))
    sp.set_defaults(func=lambda a: cmd_user_enable(a, False))
    sp = changing(us.add_parser("enable", help="enable an account (administrator)"))
    sp.add_argument("name", type=argtypes.name(names.USER))
    sp.set_defaults(func=lambda a: cmd_user_enable(a, True))
    sp = changing(us.add_parser("passwd", help="change your password (or, as administrator, anyone's)"))
    sp.add_argument("name", nargs="?", type=argtypes.name(names.USER))
    sp.set_defaults(func=cmd_user_passwd)

    te = sub.add_parser("tenant", help="brand owners").add_subparsers(dest="sub", required=True)
    sp = changing(te.add_parser("add", help="add a tenant (administrator)"))
    sp.add_argument("name", type=argtypes.name(names.TENANT))
    sp.add_argument("--display-name", type=argtypes.name(names.DISPLAY_NAME))
    sp.set_defaults(func=cmd_tenant_add)
    listing(te.add_parser("list")).set_defaults(func=cmd_tenant_list)

    pr = sub.add_parser("product", help="products: profile, issuing CA, key policy").add_subparsers(
        dest="sub", required=True
    )
    sp = changing(pr.add_parser("add", help="add a product (administrator)"))
    sp.add_argument("name", type=argtypes.name(names.PRODUCT))
    sp.add_argument("--tenant", required=True, type=argtypes.name(names.TENANT))
    sp.add_argument("--profile", required=True, type=argtypes.name(names.PROFILE))
    sp.add_argument("--ca", type=argtypes.name(names.CA), help="issuing CA (default: issuance.issuing_ca)")
    sp.add_argument(
        "--key-algorithm", action="append", help="allowed key algorithm (repeat); default: the profile's"
    )
    sp.add_argument("--issuance-mode", choices=ISSUANCE_MODES, default="local",
                    help="local: this appliance's issuing CA signs (default); upstream: RA mode, the upstream CA"
                    " issues and stations are told PENDING until it has")  # fmt: skip
    sp.add_argument("--key-update", choices=("keep", "revoke"), default="keep",
                    help="what a key update (CMP kur) does to the certificate it replaces once the new one is"
                    " confirmed: keep it valid until it expires (default) or revoke it (superseded)")  # fmt: skip
    sp.set_defaults(func=cmd_product_add)
    sp = changing(pr.add_parser(
        "key-update", help="whether a key update revokes the certificate it replaces (administrator)"))  # fmt: skip
    sp.add_argument("name", type=argtypes.name(names.PRODUCT))
    sp.add_argument("key_update", choices=("keep", "revoke"))
    sp.set_defaults(func=cmd_product_key_update)
    sp = changing(
        pr.add_parser("mode", help="switch a product between local and upstream issuance (administrator)")
    )
    sp.add_argument("name", type=argtypes.name(names.PRODUCT))
    sp.add_argument("issuance_mode", choices=ISSUANCE_MODES)
    sp.set_defaults(func=cmd_product_mode)
    listing(pr.add_parser("list")).set_defaults(func=cmd_product_list)

    ln = sub.add_parser("line", help="production lines and their stations").add_subparsers(
        dest="sub", required=True
    )
    sp = changing(ln.add_parser("add", help="add a line (administrator)"))
    sp.add_argument("name", type=argtypes.name(names.LINE))
    sp.add_argument("--description", type=argtypes.name(names.DESCRIPTION))
    sp.set_defaults(func=cmd_line_add)
    listing(ln.add_parser("list")).set_defaults(func=cmd_line_list)
    sp = changing(ln.add_parser("assign-station", help="put a station on a line ('none': off every line)"))
    sp.add_argument("line", type=argtypes.name(names.LINE))
    sp.add_argument("station", type=argtypes.name(names.STATION))
    sp.set_defaults(func=cmd_line_assign)

    wo = sub.add_parser("workorder", help="work orders: quantity, allowlist, validity, lines").add_subparsers(
        dest="sub", required=True
    )
    sp = changing(wo.add_parser("add", help="add a work order (draft unless --activate)"))
    sp.add_argument("id", type=argtypes.name(names.WORK_ORDER_ID))
    sp.add_argument("--product", required=True, type=argtypes.name(names.PRODUCT))
    sp.add_argument("--quantity", type=int, required=True)
    sp.add_argument("--line", action="append", type=argtypes.name(names.LINE), help="assigned line (repeat)")
    sp.add_argument(
        "--serial",
        action="append",
        type=argtypes.name(names.DEVICE_SERIAL),
        help="an allowed device serial (repeat)",
    )
    sp.add_argument("--serials-file", help="allowed device serials, one per line")
    sp.add_argument("--range", action="append", help="PREFIX[FIRST-LAST], e.g. ACME-[000001-000500] (repeat)")
    sp.add_argument("--pattern", help="regular expression the whole serial must match (restricted, see docs)")
    sp.add_argument("--valid-from", help="ISO 8601, e.g. 2025-03-01T06:00:00Z")
    sp.add_argument("--valid-to", help="ISO 8601 (exclusive)")
    sp.add_argument("--activate", action="store_true")
    sp.set_defaults(func=cmd_wo_add)
    sp = changing(wo.add_parser("import", help="import an MES file (CSV or JSON), all or nothing"))
    sp.add_argument("file")
    sp.add_argument("--format", choices=["csv", "json"], help="default: from the file name")
    sp.add_argument("--activate", action="store_true")
    sp.set_defaults(func=cmd_wo_import)
    sp = changing(wo.add_parser("activate"))
    sp.add_argument("id", type=argtypes.name(names.WORK_ORDER_ID))
    sp.set_defaults(func=lambda a: cmd_wo_state(a, "active"))
    sp = changing(wo.add_parser("close"))
    sp.add_argument("id", type=argtypes.name(names.WORK_ORDER_ID))
    sp.set_defaults(func=lambda a: cmd_wo_state(a, "closed"))
    sp = changing(wo.add_parser("assign-line", help="assign (or --remove) a line"))
    sp.add_argument("id", type=argtypes.name(names.WORK_ORDER_ID))
    sp.add_argument("line", type=argtypes.name(names.LINE))
    sp.add_argument("--remove", action="store_true")
    sp.set_defaults(func=cmd_wo_assign_line)
    sp = listing(wo.add_parser("list"))
    sp.add_argument("--state", choices=["draft", "active", "closed"])
    sp.set_defaults(func=cmd_wo_list)
    sp = listing(wo.add_parser("show"))
    sp.add_argument("id", type=argtypes.name(names.WORK_ORDER_ID))
    sp.set_defaults(func=cmd_wo_show)

    dv = sub.add_parser("device", help="rework and scrap (supervisor)").add_subparsers(
        dest="sub", required=True
    )
    for what, text in (
        ("rework", "authorise one new key for an issued device"),
        ("scrap", "record a destroyed device; its certificate is revoked (cessationOfOperation)"),
    ):
        sp = changing(dv.add_parser(what, help=text))
        sp.add_argument("serial", type=argtypes.name(names.DEVICE_SERIAL), help="the device serial")
        sp.add_argument("--reason", required=True, type=argtypes.name(names.REASON))
        sp.set_defaults(func=lambda a, w=what: cmd_device(a, w))

    rp = sub.add_parser("report", help="reconciliation reports").add_subparsers(dest="sub", required=True)
    sp = listing(rp.add_parser("workorder", help="planned, issued, confirmed, pending, scrapped, remaining"))
    sp.add_argument("id", type=argtypes.name(names.WORK_ORDER_ID))
    sp.set_defaults(func=cmd_report)
    ex = sub.add_parser("export", help="certificate exports").add_subparsers(dest="sub", required=True)
    sp = with_config(ex.add_parser("workorder", help="every certificate of a work order: CSV and PEM bundle"))
    sp.add_argument("id", type=argtypes.name(names.WORK_ORDER_ID))
    sp.add_argument("--csv", help="write the CSV list here")
    sp.add_argument("--pem", help="write the PEM bundle here")
    sp.set_defaults(func=cmd_export)
