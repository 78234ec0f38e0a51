"""Issue 10 item 10: commands that only read open the journal read-only, so a forensic copy verifies.

We run as root, and permission bits do not stop root. Two checks that do not depend on them:
- the copies sit in a directory made immutable with `chattr +i` (files and directory): no process, root
  included, can write there or create the -shm index SQLite wants beside a WAL database;
- on a live journal, /proc/self/fdinfo shows the database file opened read-only (O_RDONLY), and a write
  through the read-only connection is refused by SQLite.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.audit.log import AuditLog, ensure_audit_key
from appliance.cli.main import main
from appliance.issuance.journal import Journal
from appliance.production import store
from appliance.production.users import Role, User
from hsm.softhsm import SoftHsmToken
from hsm.token import Token

ALICE = User("alice", Role.ADMINISTRATOR)


@contextlib.contextmanager
def immutable(*paths: Path) -> Iterator[None]:
    done = subprocess.run(["chattr", "+i", *map(str, paths)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not available here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", *map(str, paths)], check=True)


def _config(tmp_path: Path, state: Path, softhsm_token: SoftHsmToken) -> Path:
    cfg = softhsm_token.hsm_config()
    path = tmp_path / f"{state.name}.toml"
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n'
    )
    return path


@pytest.fixture
def live(production_journal_template: Path, tmp_path: Path, hsm_token: Token) -> Iterator[Journal]:
    """A journal open for writing with transactions still in its WAL (nothing checkpointed yet), its audit log
    signed to the end as a stopped appliance leaves it (so verify can say INTACT)."""
    state = tmp_path / "live"
    state.mkdir(mode=0o700)
    shutil.copy(production_journal_template, state / "journal.sqlite")
    with Journal(state / "journal.sqlite") as journal:
        journal.call(lambda: journal.conn.execute("PRAGMA wal_autocheckpoint=0"))
        audit = AuditLog(journal)
        store.add_tenant(journal, audit, ALICE, "forensic", "only in the WAL")
        audit.checkpoint(ensure_audit_key(hsm_token))
        assert (state / "journal.sqlite-wal").stat().st_size > 0
        yield journal


@pytest.mark.parametrize(
    "files", [("",), ("", "-wal"), ("", "-wal", "-shm")], ids=["db", "db+wal", "db+wal+shm"]
)
def test_a_forensic_copy_on_immutable_media_verifies_and_reports(
    live: Journal,
    tmp_path: Path,
    softhsm_token: SoftHsmToken,
    files: tuple[str, ...],
    capsys: pytest.CaptureFixture[str],
) -> None:
    copy = tmp_path / "copy"
    copy.mkdir()
    if files == ("",):  # a copy taken after a checkpoint: everything is in the database file
        live.call(lambda: live.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    for suffix in files:
        shutil.copyfile(f"{live.path}{suffix}", copy / f"journal.sqlite{suffix}")
        (copy / f"journal.sqlite{suffix}").chmod(0o444)
    copy.chmod(0o555)
    config = str(_config(tmp_path, copy, softhsm_token))
    before = sorted(os.listdir(copy))
    with immutable(*copy.iterdir(), copy):
        capsys.readouterr()
        assert main(["audit", "verify", "--json", "--config", config]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["ok"] and report["entries"] > 0
        assert main(["report", "workorder", "WO-1", "--json", "--config", config]) == 0
        assert json.loads(capsys.readouterr().out)["planned"] == 50
        # The transaction that was only in the WAL is seen (immutable=1 alone would have dropped it).
        assert main(["tenant", "list", "--json", "--config", config]) == 0
        assert "forensic" in {t["name"] for t in json.loads(capsys.readouterr().out)}
        assert main(["journal", "stats", "--config", config]) == 0
        assert json.loads(capsys.readouterr().out)["integrity"] == "ok"
    assert sorted(os.listdir(copy)) == before  # nothing was created beside it


def test_read_only_commands_open_the_live_journal_without_write_access(live: Journal) -> None:
    with Journal(live.path, read_only=True) as reader:
        opened = {}
        for fd in os.listdir("/proc/self/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/self/fd/{fd}")
                if target.startswith(str(live.path)):
                    flags = int(Path(f"/proc/self/fdinfo/{fd}").read_text().split("flags:")[1].split()[0], 8)
                    opened.setdefault(target, []).append(flags & os.O_ACCMODE)
        assert reader.call(lambda: reader.conn.execute("SELECT COUNT(*) FROM tenant").fetchone()[0]) == 2
        with pytest.raises(Exception, match="readonly"):
            reader.call(reader.transaction, lambda c: c.execute("DELETE FROM tenant"), "trying to write")
    # The writer's descriptor is O_RDWR; the reader's own one for the database file is O_RDONLY. (SQLite opens
    # the -wal read-write whenever it can, even for a mode=ro connection, and never writes it from one: the
    # immutable-media test above is the proof that reading needs no write access at all.)
    assert sorted(opened[str(live.path)]) == [os.O_RDONLY, os.O_RDWR]


def test_a_read_only_command_creates_no_journal(
    tmp_path: Path, softhsm_token: SoftHsmToken, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o700)
    config = str(_config(tmp_path, empty, softhsm_token))
    for argv in (
        ["report", "workorder", "WO-1"],
        ["audit", "verify"],
        ["station", "list"],
        ["journal", "stats"],
    ):
        assert main([*argv, "--config", config]) == 2
        assert "no journal at" in capsys.readouterr().err
    assert list(empty.iterdir()) == []
