"""`birthline audit verify|export|checkpoint|head|public-key`: the auditor's commands.

verify, export, head and public-key read the journal file only (no HSM login), so an auditor can run them with
read access to the state directory; `verify --file` needs no appliance at all. checkpoint signs in the HSM, as a
person (an auditor or administrator), and may run beside the daemon.

verify exits 0 when every entry is covered by a checkpoint signature (INTACT), 3 when nothing is wrong but the
last entries are covered by none (UNSIGNED TAIL: a live appliance between checkpoints, or something appended
since the last one), 1 when a problem was found (NOT INTACT), 2 when it could not check (bad input).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from appliance.audit import (
    AuditLog,
    Head,
    ensure_audit_key,
    export,
    head_record,
    load_public_key,
    read_head,
    verify,
)
from appliance.audit.claims import REASON_ON_DEMAND
from appliance.audit.log import AUDIT_KEY_LABEL, AuditError
from appliance.audit.verify import INTACT, NOT_INTACT, UNSIGNED_TAIL, PublicKeyPin
from appliance.cli import argfiles
from appliance.cli.session import actor, add_login_arguments, authorised
from appliance.config import Config, load_config
from appliance.errors import BirthlineError, ReasonCode
from appliance.issuance.journal import Journal
from appliance.production.users import Permission

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]

VERIFY_EXIT = {INTACT: 0, NOT_INTACT: 1, UNSIGNED_TAIL: 3}


def _config(args: argparse.Namespace) -> Config:
    return load_config(Path(args.config))


@contextlib.contextmanager
def _journal(args: argparse.Namespace) -> Iterator[Journal]:
    """The journal named by the configuration, without the HSM, read-only (a forensic copy on read-only media
    verifies; nothing is created or changed); refuse one that is not there."""
    path = _config(args).journal.path
    if not path.exists():
        raise AuditError(f"no journal at {path}", {"path": str(path)})
    with Journal(path, read_only=True) as journal:
        yield journal


@contextlib.contextmanager
def _usage(what: str) -> Iterator[None]:
    """Unreadable or malformed auditor input: exit 2 through main(), never 1 (which means "not intact")."""
    try:
        yield
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise BirthlineError(f"{what}: {exc}", ReasonCode.BAD_REQUEST) from exc


def _hex32(value: str, option: str) -> bytes:
    with _usage(option):
        digest = bytes.fromhex(value)
        if len(digest) != 32:
            raise ValueError("expected 64 hex digits")
    return digest


def _expected_head(args: argparse.Namespace) -> Head | None:
    if args.head is not None:
        with _usage(f"--head {args.head}"):
            return read_head(Path(args.head))
    if args.head_seq is None and args.head_hash is None:
        return None
    if args.head_seq is None or args.head_hash is None:
        raise BirthlineError("--head-seq and --head-hash go together", ReasonCode.BAD_REQUEST)
    return (args.head_seq, _hex32(args.head_hash, "--head-hash"))


def _pin(args: argparse.Namespace) -> PublicKeyPin | None:
    if args.public_key is not None:
        with _usage(f"--public-key {args.public_key}"):
            return load_public_key(Path(args.public_key).read_bytes())
    if args.public_key_sha256 is not None:
        return _hex32(args.public_key_sha256, "--public-key-sha256")
    return None


def cmd_verify(args: argparse.Namespace) -> int:
    expected, pin = _expected_head(args), _pin(args)
    since = args.since_checkpoint
    if since is not None and (since < 1 or (expected is not None and expected[0] < since)):
        raise BirthlineError(
            f"--since-checkpoint {since}: the seq of a checkpoint (1 or more), at or before the expected head",
            ReasonCode.BAD_REQUEST,
        )
    if args.file is not None:
        if not Path(args.file).is_file():
            raise BirthlineError(f"--file {args.file}: no such file", ReasonCode.BAD_REQUEST)
        with _usage(f"--file {args.file}"):
            report = verify(
                Path(args.file),
                expected_head=expected,
                public_key=pin,
                since_checkpoint=args.since_checkpoint,
            )
    else:
        with _journal(args) as journal:
            report = verify(
                journal, expected_head=expected, public_key=pin, since_checkpoint=args.since_checkpoint
            )
    if args.json:
        print(
            json.dumps(
                {
                    "source": report.source,
                    "status": report.status,
                    "intact": report.intact,
                    "ok": report.ok,
                    "entries": report.entries,
                    "head": {"seq": report.head[0], "hash": report.head[1].hex()},
                    "checkpoints": report.checkpoints,
                    "last_good_checkpoint": report.last_good_checkpoint,
                    "claims": report.claims,
                    "chained_since": report.chained_since,
                    "signed_through": report.signed_through,
                    "unsigned": None
                    if report.unsigned is None
                    else {
                        "first": report.unsigned[0],
                        "last": report.unsigned[1],
                        "span_s": report.unsigned_span_s,
                    },
                    "policy": report.policy,
                    "public_keys_sha256": report.key_fingerprints,
                    "pinned": report.pinned,
                    "since_checkpoint": report.since_checkpoint,
                    "problems": [
                        {"seq": p.seq, "kind": p.kind, "message": p.message} for p in report.problems
                    ],
                    "warnings": report.warnings,
                },
                indent=2,
                sort_keys=True,
            )
        )
    else:
        print(report.text())
    return VERIFY_EXIT[report.status]


def cmd_export(args: argparse.Namespace) -> int:
    with _journal(args) as journal:
        head = export(journal, Path(args.out))
    print(f"exported {head['seq']} entries to {args.out}; head {head['hash']}", file=sys.stderr)
    print(json.dumps(head, sort_keys=True))
    return 0


def cmd_head(args: argparse.Namespace) -> int:
    with _journal(args) as journal:
        head = head_record(journal)
    text = json.dumps(head, sort_keys=True) + "\n"
    if args.out:
        argfiles.write("--out", args.out, text.encode("utf-8"))
    sys.stdout.write(text)
    return 0


def cmd_public_key(args: argparse.Namespace) -> int:
    with _journal(args) as journal:
        keys = AuditLog(journal).public_keys()
    if args.label not in keys:
        raise AuditError(f"no audit key {args.label!r} recorded yet: run `birthline audit checkpoint` first")
    pem = load_public_key(keys[args.label]).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    if args.out:  # the file alone: the key is not printed as well
        argfiles.write("--out", args.out, pem)
        print(f"audit key {args.label!r}: public key written to {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(pem.decode())
    return 0


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """A person signs the log now (their login is the entry before the claim): how an auditor gets a signature
    over everything up to this moment on a live appliance, beside the daemon's own interval."""
    with authorised(args, Permission.AUDIT_CHECKPOINT) as s:
        core = s.core
        cp = core.audit.checkpoint(ensure_audit_key(core.token), actor=actor(s).name, reason=REASON_ON_DEMAND)
        head: dict[str, Any] = head_record(core.journal)
    print(f"signed the audit log through entry {cp.seq} with HSM key {cp.key_label!r}", file=sys.stderr)
    print(json.dumps(head, sort_keys=True))
    return 0


def register(sub: Any, with_config: WithConfig) -> None:
    """Add `audit ...` to the `birthline` parser."""
    audit = sub.add_parser("audit", help="the tamper-evident audit log").add_subparsers(
        dest="sub", required=True
    )

    sp = with_config(
        audit.add_parser(
            "verify",
            help="recompute the hash chain and check checkpoints: exit 0 intact, 3 unsigned tail, 1 problems",
        )
    )
    head = sp.add_mutually_exclusive_group()
    head.add_argument("--head", help="a head record kept earlier (`audit head` output, or an export)")
    head.add_argument("--head-seq", type=int, help="the seq of the head kept earlier (with --head-hash)")
    sp.add_argument("--head-hash", help="the hash (hex) of the head kept earlier (with --head-seq)")
    key = sp.add_mutually_exclusive_group()
    key.add_argument("--public-key", help="the auditor's copy of the audit public key (PEM or DER)")
    key.add_argument("--public-key-sha256", help="or its SHA-256 fingerprint (of the SPKI DER), hex")
    sp.add_argument(
        "--file", help="verify this export (JSON Lines) instead of the journal; needs no appliance"
    )
    sp.add_argument(
        "--since-checkpoint",
        type=int,
        metavar="SEQ",
        help="incremental: start from the checkpoint at SEQ that an earlier verify found good (its last good"
        " checkpoint), verified again; entries before it are NOT checked. The default checks from genesis",
    )
    sp.add_argument("--json", action="store_true", help="machine-readable report")
    sp.set_defaults(func=cmd_verify)

    sp = with_config(audit.add_parser("export", help="write the log as JSON Lines for an auditor"))
    sp.add_argument("--out", required=True, help="the export file (written atomically)")
    sp.set_defaults(func=cmd_export)

    sp = with_config(
        audit.add_parser(
            "checkpoint", help="sign the log now with the audit key in the HSM (an auditor or administrator)"
        )
    )
    add_login_arguments(sp)
    sp.set_defaults(func=cmd_checkpoint)

    sp = with_config(audit.add_parser("head", help="print the current head record for an auditor to keep"))
    sp.add_argument("--out", help="also write it to this file")
    sp.set_defaults(func=cmd_head)

    sp = with_config(audit.add_parser("public-key", help="print the recorded audit public key (PEM) to pin"))
    sp.add_argument("--label", default=AUDIT_KEY_LABEL)
    sp.add_argument("--out", help="write it to this file instead of printing it")
    sp.set_defaults(func=cmd_public_key)
