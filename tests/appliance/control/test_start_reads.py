"""The daemon's start reads no table that grows with every certificate whole: on ten million certificates two such
reads made most of a 10.6 s start (docs/performance.md "Ten years of journal"). Every statement the daemon runs
on its journal connections while it starts is traced and its plan checked, so a read added to the start later is
caught here, not on a plant's journal years later."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from appliance.daemon import Daemon
from hsm.softhsm import SoftHsmToken
from tests.appliance.control.conftest import control_config
from tests.appliance.control.test_status_reads import _scans


async def test_the_daemon_start_reads_no_growing_table_whole(
    softhsm_token: SoftHsmToken,
    people_journal_template: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = control_config(tmp_path / "state", softhsm_token, people_journal_template)
    statements: list[str] = []
    connect = sqlite3.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    # Instrumentation, not a fake: every connection is SQLite's own, only traced.
    monkeypatch.setattr(sqlite3, "connect", traced)
    async with Daemon(config):
        started = list(statements)
    monkeypatch.undo()
    assert any("state='intent'" in s for s in started)  # the issuance core's start was traced
    with sqlite3.connect(config.journal.path) as conn:
        assert _scans(conn, started) == []
