"""`birthline revoke | crl | ocsp` (docs/revocation.md).

`revoke` takes `--user NAME` (a supervisor); the password is read from the terminal (getpass) or, with
`--password-stdin`, one line from standard input. Never from argv or the environment. After a revocation the
CRLs of the CAs concerned are regenerated at once; a running daemon's OCSP responder sees the change within
its poll interval (va.poll_s).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from appliance import names
from appliance.audit.log import AuditLog
from appliance.ca import load_ca
from appliance.cli import argfiles, argtypes
from appliance.cli.session import session
from appliance.config import Config, load_config
from appliance.daemon_lock import daemon_job
from appliance.runtime import open_core, read_journal
from appliance.va.crl import DEFAULT_CRL_VALIDITY_S, CrlInfo, generate_crl, load_crl
from appliance.va.revocation import Reason, RevocationError, list_revocations, normalise_serial, revoke
from appliance.va.service import VaSettings
from appliance.va.status import lookup_status

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


def va_settings(config: Config) -> VaSettings:
    """The VA settings of the configuration ([va] table), or the defaults while it has none."""
    return config.va.settings


def _parse_time(text: str | None) -> float | None:
    if text is None:
        return None
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise RevocationError(f"not an ISO 8601 time: {text!r}") from exc
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def cmd_revoke(args: argparse.Namespace) -> int:
    reason = Reason.parse(args.reason)
    config = _config(args)
    with session(args) as s:
        core, audit, actor = s.core, s.audit, s.user
        assert actor is not None
        result = revoke(
            core.journal, audit, actor, device_serial=args.device, cert_serial=args.cert_serial,
            work_order=args.work_order, reason=reason, invalidity_date=_parse_time(args.invalidity_date),
        )  # fmt: skip
        crls = [
            generate_crl(
                core.journal,
                core.token,
                audit,
                ca,
                validity_s=va_settings(config).crl_validity_s,
                actor=actor.name,
            )
            for ca in sorted(result.cas)
        ]
    if args.json:
        print(json.dumps({
            "revoked": [r.as_dict() for r in result.revoked], "raised": [r.as_dict() for r in result.raised],
            "already": [r.as_dict() for r in result.already], "in_flight": list(result.in_flight),
            "crls": [{"ca": c.ca, "crl_number": c.number} for c in crls],
        }, indent=2, sort_keys=True))  # fmt: skip
        return 0
    for r in result.revoked:
        print(f"revoked {r.cert_serial} (device {r.device_serial}, CA {r.ca}): {r.reason.value}")
    for r in result.raised:
        print(f"reason raised to keyCompromise: {r.cert_serial} (device {r.device_serial})")
    for r in result.already:
        print(
            f"already revoked: {r.cert_serial} (device {r.device_serial}) {r.reason.value} {_iso(r.revoked_at)}"
        )
    for serial in result.in_flight:
        print(f"NOT revoked, being issued right now: {serial}; run the command again", file=sys.stderr)
    for c in crls:
        print(f"CRL {c.number} of {c.ca} published ({c.revoked_count} entries)")
    return 3 if result.in_flight else 0


def _write_crl(info: CrlInfo, out: str | None, pem: bool) -> None:
    data = info.pem if pem else info.der
    if out:
        argfiles.write("--out", out, data)
    elif pem:
        sys.stdout.write(data.decode())


def _default_ca(args: argparse.Namespace, config: Config) -> str:
    return str(args.ca or config.issuance.issuing_ca)


def cmd_crl_generate(args: argparse.Namespace) -> int:
    """The CRL publisher's job, by hand while the daemon is stopped (the daemon re-signs on every revocation
    and at half the validity); audited as the appliance's, like the publisher's own."""
    config = _config(args)
    with daemon_job(config, "crl generate"), open_core(config) as core:
        info = generate_crl(
            core.journal, core.token, AuditLog(core.journal), _default_ca(args, config),
            validity_s=args.validity_hours * 3600 if args.validity_hours else va_settings(config).crl_validity_s,
            actor="appliance",
        )  # fmt: skip
    _write_crl(info, args.out, args.pem)
    print(f"CRL {info.number} of {info.ca}: {info.revoked_count} entries, next update {_iso(info.next_update)}",
          file=sys.stderr if (args.pem and not args.out) else sys.stdout)  # fmt: skip
    return 0


def cmd_crl_show(args: argparse.Namespace) -> int:
    config = _config(args)
    ca = _default_ca(args, config)
    with read_journal(config) as journal:
        info = load_crl(journal, ca)
    if info is None:
        raise RevocationError(f"no CRL has been generated for {ca!r} yet (birthline crl generate)")
    if args.out or args.pem:
        _write_crl(info, args.out, args.pem)
        return 0
    crl = x509.load_der_x509_crl(info.der)
    print(f"CA {info.ca}  CRL number {info.number}  this update {_iso(info.this_update)}"
          f"  next update {_iso(info.next_update)}  entries {len(crl)}")  # fmt: skip
    for entry in crl:
        reason = "unspecified"
        with contextlib.suppress(x509.ExtensionNotFound):
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason.value
        print(f"  {entry.serial_number:x}  {entry.revocation_date_utc.isoformat()}  {reason}")
    return 0


def cmd_revocation_list(args: argparse.Namespace) -> int:
    with read_journal(_config(args)) as journal:
        found = list_revocations(journal, args.ca)
    if args.json:
        print(json.dumps([r.as_dict() for r in found], indent=2, sort_keys=True))
        return 0
    for r in found:
        print(f"{r.cert_serial}  {r.device_serial:<24} {r.ca:<12} {r.reason.value:<22} {_iso(r.revoked_at)}"
              f"  {r.source.value}:{r.actor}")  # fmt: skip
    return 0


def cmd_ocsp_status(args: argparse.Namespace) -> int:
    """What the responder answers for a certificate (from the journal; nothing is signed)."""
    config = _config(args)
    ca = _default_ca(args, config)
    serial = normalise_serial(args.cert_serial)
    with read_journal(config) as journal:
        load_ca(journal, ca)
        never = va_settings(config).never_issued
        status = journal.call(lambda: lookup_status(journal.conn, ca, int(serial, 16), never))
    out: dict[str, Any] = {"ca": ca, "cert_serial": serial, "status": status.kind, "why": status.why}
    if status.kind == "revoked":
        out["reason"] = (
            "certificateHold (non-issued)"
            if status.non_issued
            else (status.reason or Reason.UNSPECIFIED).value
        )
        out["revoked_at"] = "1970-01-01T00:00:00Z" if status.non_issued else _iso(status.revoked_at or 0.0)
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    else:
        print(" ".join(f"{k}={v}" for k, v in out.items()))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    reasons = ", ".join(r.value for r in Reason)
    sp = with_config(sub.add_parser("revoke", help="revoke certificates (supervisor); CRLs are regenerated"))
    which = sp.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--device", type=argtypes.name(names.DEVICE_SERIAL), help="every certificate of this device serial"
    )
    which.add_argument("--cert-serial", help="the certificate with this serial (hex)")
    which.add_argument(
        "--work-order",
        type=argtypes.name(names.WORK_ORDER_ID),
        help="every certificate issued under this work order",
    )
    sp.add_argument("--reason", required=True, help=f"RFC 5280 reason: {reasons}")
    sp.add_argument(
        "--invalidity-date", help="ISO 8601: when the key is known or suspected to have been compromised"
    )
    sp.add_argument(
        "--user",
        required=True,
        type=argtypes.name(names.USER),
        help="your user name (you are asked for your password)",
    )
    sp.add_argument("--password-stdin", action="store_true", help="read the password from stdin (automation)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_revoke)

    rl = sub.add_parser("revocation", help="the revocation store").add_subparsers(dest="sub", required=True)
    sp = with_config(rl.add_parser("list", help="revoked certificates"))
    sp.add_argument("--ca", type=argtypes.name(names.CA))
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_revocation_list)

    crl = sub.add_parser("crl", help="certificate revocation lists").add_subparsers(dest="sub", required=True)
    sp = with_config(crl.add_parser("generate", help="sign and publish a new CRL now (in the HSM)"))
    sp.add_argument("--ca", type=argtypes.name(names.CA), help="issuing CA (default: issuance.issuing_ca)")
    sp.add_argument("--out", help="also write it here (DER, or PEM with --pem)")
    sp.add_argument("--pem", action="store_true")
    sp.add_argument(
        "--validity-hours", type=float, help=f"nextUpdate (default {DEFAULT_CRL_VALIDITY_S / 3600:.0f} h)"
    )
    sp.set_defaults(func=cmd_crl_generate)
    sp = with_config(crl.add_parser("show", help="the latest published CRL"))
    sp.add_argument("--ca", type=argtypes.name(names.CA), help="issuing CA (default: issuance.issuing_ca)")
    sp.add_argument("--out", help="write it here (DER, or PEM with --pem) instead of listing it")
    sp.add_argument("--pem", action="store_true")
    sp.set_defaults(func=cmd_crl_show)

    oc = sub.add_parser("ocsp", help="the OCSP responder").add_subparsers(dest="sub", required=True)
    sp = with_config(oc.add_parser("status", help="what the responder answers for a certificate serial"))
    sp.add_argument("--cert-serial", required=True)
    sp.add_argument("--ca", type=argtypes.name(names.CA), help="issuing CA (default: issuance.issuing_ca)")
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=cmd_ocsp_status)
