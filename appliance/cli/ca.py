"""`birthline ca ...`: the CA hierarchy, keys in the HSM (README.md "Setting up an appliance").

Every change takes `--user` (an administrator) and is audited; `list` and `chain` read the journal only.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import names
from appliance.cli import argfiles, argtypes
from appliance.cli.argtypes import add_login_arguments

if TYPE_CHECKING:
    from appliance.ca import CaRecord

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]
# hsm.algorithms.KeyAlgorithm's values; the parser is built without importing the HSM layer (a test checks).
ALGORITHMS = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "ed25519")


def cmd_ca_init_root(args: argparse.Namespace) -> int:
    from appliance import ca as ca_mod
    from appliance.ca import identity
    from appliance.cli.session import actor, authorised
    from appliance.production.users import Permission
    from hsm.algorithms import KeyAlgorithm

    with authorised(args, Permission.CA_MANAGE) as s:
        core = s.core
        rec = ca_mod.create_root(
            core.journal, core.token, args.name, args.subject or identity.subject_for(core.journal, "root"),
            KeyAlgorithm(args.algorithm), path_len=args.path_len, validity_days=args.validity_days, audit=s.audit, actor=actor(s).name,
        )  # fmt: skip
        print(f"created root CA {rec.name!r}: {rec.subject} (key {rec.key_label} in the HSM)")
    return 0


def cmd_ca_init_issuing(args: argparse.Namespace) -> int:
    from appliance import ca as ca_mod
    from appliance.ca import identity
    from appliance.cli.session import actor, authorised
    from appliance.production.users import Permission
    from hsm.algorithms import KeyAlgorithm

    with authorised(args, Permission.CA_MANAGE) as s:
        core = s.core
        rec = ca_mod.create_issuing(
            core.journal, core.token, args.name, args.subject or identity.subject_for(core.journal, "issuing"),
            args.parent, KeyAlgorithm(args.algorithm), path_len=args.path_len, validity_days=args.validity_days, audit=s.audit, actor=actor(s).name,
        )  # fmt: skip
        print(f"created issuing CA {rec.name!r} under {rec.parent!r}: {rec.subject}")
    return 0


def cmd_ca_init_management(args: argparse.Namespace) -> int:
    from appliance import ca as ca_mod
    from appliance.ca import identity
    from appliance.cli.session import actor, authorised
    from appliance.production.users import Permission
    from hsm.algorithms import KeyAlgorithm

    with authorised(args, Permission.CA_MANAGE) as s:
        core = s.core
        rec = ca_mod.create_management(
            core.journal, core.token, args.name, args.subject or identity.subject_for(core.journal, "management"),
            KeyAlgorithm(args.algorithm), validity_days=args.validity_days, audit=s.audit, actor=actor(s).name,
        )  # fmt: skip
        print(f"created management CA {rec.name!r}: {rec.subject}")
    return 0


def cmd_ca_request(args: argparse.Namespace) -> int:
    from appliance import ca as ca_mod
    from appliance.cli.session import actor, authorised
    from appliance.production.users import Permission
    from hsm.algorithms import KeyAlgorithm

    with authorised(args, Permission.CA_MANAGE) as s:
        core = s.core
        rec, pem = ca_mod.create_csr_for_external_root(
            core.journal,
            core.token,
            args.name,
            args.subject,
            KeyAlgorithm(args.algorithm),
            role=args.role,
            audit=s.audit,
            actor=actor(s).name,
        )
    argfiles.write("--out", args.out, pem)
    print(f"{rec.role} CA {rec.name!r} awaits its certificate; CSR written to {args.out}")
    return 0


def cmd_ca_import(args: argparse.Namespace) -> int:
    from appliance import ca as ca_mod
    from appliance.cli.session import actor, authorised
    from appliance.production.users import Permission

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
    print(f"{rec.role} CA {rec.name!r} is active: {rec.subject}, chain of {len(rec.chain)}")
    return 0


def cmd_ca_list(args: argparse.Namespace) -> int:
    from appliance import ca as ca_mod
    from appliance.config import load_config
    from appliance.runtime import read_journal

    with read_journal(load_config(Path(args.config))) as journal:
        records = ca_mod.list_cas(journal)
    if args.json:
        print(json.dumps([_ca_json(r) for r in records], indent=2))
        return 0
    local = {x.name for x in records}
    children: dict[str | None, list[ca_mod.CaRecord]] = {}
    for r in records:
        children.setdefault(r.parent if r.parent in local else _external_root(r), []).append(r)

    def show(parent: str | None, depth: int) -> None:
        for r in children.get(parent, []):
            info = _ca_json(r)
            print(
                f"{'  ' * depth}{r.name} [{r.role}, {r.state}] {r.subject}  key={r.key_label} ({r.key_algorithm.value})"
                + (f"  serial={info['serial']} notAfter={info['not_after']}" if r.cert_der else "")
            )
            show(r.name, depth + 1)

    # A CA imported under a root this appliance does not hold (ca request/import) is shown under that root,
    # marked external: the anchor relying parties need, whose key is not in this HSM.
    for root in sorted(k for k in children if k is not None and k not in local):
        print(f"{root}  (external root: not in the HSM)")
        show(root, 1)
    show(None, 0)
    return 0


def _external_root(r: CaRecord) -> str | None:
    """The subject and validity of the self-signed root at the end of an imported CA's chain; None for a CA
    made here (its own root is a local record, or it is one)."""
    if not r.cert_der or not r.chain_der:
        return None
    root = r.chain[-1]
    return f"{root.subject.rfc4514_string()}  serial={root.serial_number:x} notAfter={root.not_valid_after_utc.isoformat()}"


def _ca_json(r: CaRecord) -> dict[str, object]:
    from cryptography import x509

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
        if r.chain_der:
            out["chain"] = [
                c.subject.rfc4514_string() for c in r.chain[1:]
            ]  # up to the root, which may be external
    return out


def cmd_ca_chain(args: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization

    from appliance import ca as ca_mod
    from appliance.config import load_config
    from appliance.runtime import read_journal

    with read_journal(load_config(Path(args.config))) as journal:
        rec = ca_mod.load_ca(journal, args.name)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in rec.chain)
    if args.out:
        argfiles.write("--out", args.out, pem)
    else:
        sys.stdout.write(pem.decode())
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    """Add `ca ...` to the `birthline` parser."""
    ca = sub.add_parser("ca", help="the CA hierarchy (keys in the HSM)").add_subparsers(
        dest="sub", required=True
    )
    sp = with_config(ca.add_parser("init-root", help="create a root CA on this appliance"))
    sp.add_argument("--name", default="root", type=argtypes.name(names.CA))
    sp.add_argument(
        "--subject", help='e.g. "/O=Acme/CN=Acme Device Root CA" (default: after the organisation of `init`)'
    )
    sp.add_argument("--algorithm", choices=ALGORITHMS, default="ec-p256")
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
    sp.add_argument("--algorithm", choices=ALGORITHMS, default="ec-p256")
    sp.add_argument("--path-len", type=int, default=0)
    sp.add_argument("--validity-days", type=int)
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_ca_init_issuing)
    sp = with_config(
        ca.add_parser("init-management", help="create the management CA (TLS, station credentials)")
    )
    sp.add_argument("--name", default="management", type=argtypes.name(names.CA))
    sp.add_argument("--subject")
    sp.add_argument("--algorithm", choices=ALGORITHMS, default="ec-p256")
    sp.add_argument("--validity-days", type=int, default=3650)
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_ca_init_management)
    sp = with_config(
        ca.add_parser(
            "request", help="external root: make an issuing (or management) CA's key, write its CSR"
        )
    )
    sp.add_argument("--name", default="issuing", type=argtypes.name(names.CA))
    sp.add_argument(
        "--role", choices=("issuing", "management"), default="issuing",
        help="management: the CA of the appliance's TLS and station certificates, under your root",
    )  # fmt: skip
    sp.add_argument("--subject", required=True)
    sp.add_argument("--algorithm", choices=ALGORITHMS, default="ec-p256")
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
