"""The daemon's checkpoints: the configured policy, signing what it inherits before its own entries, the final
claim on a clean stop, and the alarm when checkpoints fail."""

from __future__ import annotations

import json
import shutil
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
