"""`birthline backup` and `birthline restore` (appliance/backup.py; docs/operations.md "Backup and restore")."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

WithConfig = Callable[[argparse.ArgumentParser], argparse.ArgumentParser]


def cmd_backup(args: argparse.Namespace) -> int:
    from appliance.backup import backup

    result = backup(Path(args.config), Path(args.out))
    size = result.archive.stat().st_size
    print(
        f"{result.archive}: {len(result.members)} files, {size} bytes (0600; it holds station keys: keep it safe)"
    )
    for m in result.members:
        if m.kind == "sqlite":
            print(f"  {m.path}: online snapshot, sha256 {m.sha256}")
    for path, why in result.excluded:
        print(f"  left out: {path} ({why})")
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    from appliance.backup import restore, verify

    if args.check:
        manifest = verify(Path(args.archive))
        if args.json:
            print(json.dumps(manifest, indent=2, sort_keys=True))
        else:
            print(f"{args.archive}: OK: {len(manifest['files'])} files match the manifest's sha256 digests")
            print(f"  taken {manifest['created']} of {manifest['source']['state_dir']}, journal schema"
                  f" {manifest['journal_schema']}")  # fmt: skip
        return 0
    state = Path(args.state_dir) if args.state_dir else None
    owner = None
    if args.owner:
        import pwd

        from appliance.backup import BackupError

        try:
            entry = pwd.getpwnam(args.owner)
        except KeyError:
            raise BackupError(
                f"--owner {args.owner}: no such user (create the daemon's user first)"
            ) from None
        owner = (entry.pw_uid, entry.pw_gid)
    result = restore(Path(args.archive), Path(args.config), state, force=args.force, owner=owner)
    print(f"restored {result.members} files into {result.state_dir}; configuration {result.config}")
    for aside in result.moved_aside:
        print(f"  moved aside: {aside}")
    if args.owner:
        print(f"  owned by {args.owner}")
    if result.pin_file is not None:
        print(
            f"the HSM PIN is not in a backup: put it in {result.pin_file} (one line, 0600, the daemon's user)"
        )
    elif result.pin_credential is not None:
        print(f"the HSM PIN is not in a backup: provide the systemd credential {result.pin_credential!r}")
    print(
        f"next: birthline config check --config {result.config}; birthline audit verify --config {result.config}"
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], with_config: WithConfig) -> None:
    sp = with_config(
        sub.add_parser(
            "backup",
            help="archive the journal (online), the state, the SoftHSM token and the configuration; never a PIN",
        )
    )
    sp.add_argument(
        "--out", required=True, help="the archive to write (a new file outside the state directory)"
    )
    sp.set_defaults(func=cmd_backup)

    sp = with_config(
        sub.add_parser(
            "restore",
            help="restore a backup onto a fresh state directory, checking its manifest (--check: only check)",
        )
    )
    sp.add_argument("archive", help="an archive `birthline backup` wrote")
    sp.add_argument("--state-dir", help="where to restore the state (default: where the backup was taken)")
    sp.add_argument("--force", action="store_true", help="move a non-empty state directory or config aside")
    sp.add_argument("--owner", metavar="USER", help="give the restored files to this user (the daemon's)")
    sp.add_argument(
        "--check", action="store_true", help="only check the archive: manifest, digests, databases"
    )
    sp.add_argument("--json", action="store_true", help="with --check: print the manifest")
    sp.set_defaults(func=cmd_restore)
