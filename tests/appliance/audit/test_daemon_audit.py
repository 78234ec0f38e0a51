"""The daemon's checkpoints: the configured policy, signing what it inherits before its own entries, the final
claim on a clean stop, and the alarm when checkpoints fail."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

from appliance.audit import AuditLog, verify
from appliance.audit.checkpointer import ALARM_CAUSE
from appliance.config import (
    ApplianceSection,
    AuditSection,
    Config,
    IssuanceSection,
    JournalSection,
    StationsSection,
    VaSection,
)
from appliance.daemon import Daemon
from appliance.issuance.journal import Journal
from appliance.issuance.schema import OUTBOX_TABLE, SCHEMA
from appliance.profiles import builtin_profiles
from hsm.softhsm import SoftHsmToken


def _config(state: Path, softhsm_token: SoftHsmToken, template: Path) -> Config:
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)  # the appliance refuses a state directory others can reach
    shutil.copy(template, state / "journal.sqlite")
    return Config(
        appliance=ApplianceSection(state),
        hsm=softhsm_token.hsm_config(),
        journal=JournalSection(state / "journal.sqlite"),
        issuance=IssuanceSection(),
        stations=StationsSection(lan_listen="", tls_dir=state / "tls"),
        va=VaSection(listen=""),
        audit=AuditSection(checkpoint_every_entries=25, checkpoint_every_s=45.0),
        profiles={"idevid": builtin_profiles()["idevid"]},
    )


def _claims(journal: Journal) -> list[tuple[int, str, dict[str, object]]]:
    return [
        (e.seq, json.loads(e.data)["reason"], json.loads(e.data)["policy"])
        for e in AuditLog(journal).entries()
        if e.event == "audit.checkpoint"
    ]


async def test_the_daemon_signs_what_it_inherits_first_and_everything_when_it_stops(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path / "state", softhsm_token, production_journal_template)
    async with Daemon(config) as d:
        entries = AuditLog(d.journal).entries()
        events = [e.event for e in entries]
        # the floor's setup entries were unsigned: signed before the daemon's own start entry
        start = events.index("audit.checkpoint")
        assert events.index("appliance.started") > start
        assert json.loads(entries[start].data)["reason"] == "start"
        assert d.core is not None and d.core.alarms.get(ALARM_CAUSE) is None
    with Journal(config.journal.path) as journal:
        report = verify(journal)
        assert report.intact, report.text()
        claims = _claims(journal)
    assert [reason for _, reason, _ in claims] == ["start", "final"]
    policy = {"every_entries": 25, "every_s": 45.0, "max_unsigned_entries": 50, "max_unsigned_s": 90.0}
    assert all(p == policy for _, _, p in claims)

    # entries a crash (or a command run while the daemon was down) left unsigned: signed before appliance.started
    with Journal(config.journal.path) as journal:
        AuditLog(journal).record("alice", "test.while-stopped", {})
    async with Daemon(config):
        pass
    with Journal(config.journal.path) as journal:
        events = [e.event for e in AuditLog(journal).entries()]
        assert verify(journal).intact
        assert [reason for _, reason, _ in _claims(journal)] == ["start", "final", "start", "final"]
    tail = events[events.index("test.while-stopped") :]
    assert tail[:2] == ["test.while-stopped", "audit.checkpoint"] and tail[-1] == "audit.checkpoint"
    assert "appliance.started" in tail[2:]


async def test_a_journal_migration_is_in_the_audit_log_from_the_next_start(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    """A migration rewrites tables an auditor relies on (5 -> 6 rebuilds the outbox): the daemon's next start
    writes it to the audit log (journal.migrated: from, to, when, how long), before its own start entry."""
    config = _config(tmp_path / "state", softhsm_token, production_journal_template)
    path = config.journal.path
    conn = sqlite3.connect(path, isolation_level=None)
    v5 = OUTBOX_TABLE.replace("transaction_id    BLOB NOT NULL,", "transaction_id    BLOB NOT NULL UNIQUE,")
    conn.executescript(f"DROP TRIGGER outbox_on_revocation; DROP TABLE outbox; {v5}; {SCHEMA}")
    conn.execute("UPDATE meta SET value='5' WHERE key='schema_version'")
    conn.close()
    before = time.time()
    async with Daemon(config) as d:
        entries = AuditLog(d.journal).entries()
        events = [e.event for e in entries]
        migrated = [json.loads(e.data) for e in entries if e.event == "journal.migrated"]
        assert len(migrated) == 1 and events.index("journal.migrated") < events.index("appliance.started")
        assert migrated[0]["from"] == 5 and migrated[0]["to"] == 6
        assert before <= migrated[0]["at"] <= time.time() and migrated[0]["seconds"] >= 0
        left = d.journal.call(
            lambda: d.journal.conn.execute("SELECT key FROM meta WHERE key LIKE 'migrated:%'").fetchall()
        )
        assert left == []  # written once
    async with Daemon(config) as d:  # the next start does not write it again
        assert [e.event for e in AuditLog(d.journal).entries()].count("journal.migrated") == 1
    with Journal(path) as journal:
        assert verify(journal).ok
