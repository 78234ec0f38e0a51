"""`birthline issue` (one certificate by hand, through the core) and `birthline journal stats`."""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import names
from appliance.cli import argfiles, argtypes
from appliance.cli.argtypes import add_login_arguments

if TYPE_CHECKING:
    from appliance.cli.session import Session

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def cmd_issue(args: argparse.Namespace) -> int:
    """One certificate by hand, by a person (operator or supervisor) acting as a station: the station's line
    and work orders authorise it exactly as they would the fixture. The person's request and its answer are
    audited under their name; the core's own entries (intent, issued) follow as for any station."""
    import asyncio

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from appliance.cli.session import actor, authorised
    from appliance.daemon_lock import DaemonLock, DaemonRunning
    from appliance.errors import BirthlineError, IssuancePending
    from appliance.issuance.policy import IssueRequest
    from appliance.production.users import Permission
    from appliance.runtime import running_issuer

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
        # Crash recovery burns every intent in the journal, so only a process that issues alone may run it: the
        # daemon may be running with requests in flight, whose intents are its own. This command recovers (an
        # earlier `birthline issue` killed mid-way leaves its device busy otherwise) only while it holds the
        # daemon lock, which also keeps a daemon from starting beside it until it is done.
        lock = DaemonLock(s.core.config.appliance.state_dir, "`birthline issue`")
        try:
            lock.acquire()
            alone = True
        except DaemonRunning:
            alone = False
        try:
            async with running_issuer(s.core, prepare_workers=0, recover_intents=alone) as service:
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
        finally:
            lock.release()
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
    from appliance.config import load_config
    from appliance.production.reconcile import revocation_summary
    from appliance.runtime import read_journal

    with read_journal(load_config(Path(args.config))) as journal:
        counts = journal.counts()
        revoked = revocation_summary(journal)
        check = journal.integrity_check()
    # States are the issuance state machine's; a revoked certificate keeps its state there, so revocations
    # are counted beside them.
    print(json.dumps({"integrity": check, "states": counts, "revoked": revoked}, indent=2, sort_keys=True))
    return 0 if check == "ok" else 1


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    """Add `issue` and `journal ...` to the `birthline` parser."""
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
    with_config(
        jr.add_parser("stats", help="row counts per state, revocations, SQLite integrity")
    ).set_defaults(func=cmd_journal_stats)
