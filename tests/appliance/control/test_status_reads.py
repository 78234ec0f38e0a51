"""The status document (GET /v1/status) is read on the daemon's journal thread, the thread every commit waits for,
and consoles ask for it every few seconds: no statement it runs may read a whole table that grows with every
certificate (docs/performance.md "Ten years of journal"). Checked on the plans of the statements it really runs,
traced on a real journal, not on a list kept beside the code."""

from __future__ import annotations

import re
import shutil
import sqlite3
from pathlib import Path

from appliance.config import ApplianceSection, Config, IssuanceSection, JournalSection, UpstreamSection
from appliance.control.status import _read
from appliance.issuance.journal import Journal
from hsm.config import HsmConfig

# The tables that gain rows with every certificate (or every audit entry) for the appliance's whole life.
GROWING = ("issuance", "outbox", "work_order_unit", "audit", "ra_request", "revocation")


# Reads of the newest row(s) through the rowid, newest first with no condition: SQLite shows them as a SCAN, but
# they stop after LIMIT rows (the audit head).
_NEWEST = re.compile(r"SELECT [\w, ()*]+ FROM (\w+) ORDER BY \w+ DESC LIMIT \d+")


def _scans(conn: sqlite3.Connection, statements: list[str]) -> list[tuple[str, str]]:
    """(statement, plan line) for every plan line that reads a growing table whole: a SCAN, or a SEARCH (what
    SQLite shows for a MIN/MAX of a column without an index), through no index."""
    found = []
    for sql in statements:
        if not sql.lstrip().upper().startswith(("SELECT", "WITH", "UPDATE", "DELETE")):
            continue
        if _NEWEST.fullmatch(" ".join(sql.split())):
            continue
        aliases = {a: t for t, a in re.findall(r"(?:FROM|JOIN|UPDATE)\s+(\w+)\s+(?:AS\s+)?(\w+)", sql)}
        for row in conn.execute("EXPLAIN QUERY PLAN " + sql):
            m = re.fullmatch(r"(SCAN|SEARCH) (\w+)", str(row[3]))
            if m is None or (table := aliases.get(m.group(2), m.group(2))) not in GROWING:
                continue
            if m.group(1) == "SEARCH" and set(re.findall(r"\b(?:MIN|MAX)\((\w+)\)", sql)) <= _rowid(
                conn, table
            ):
                continue  # MIN/MAX of the rowid: one seek at an end of the table's b-tree
            found.append((" ".join(sql.split()), str(row[3])))
    return found


def _rowid(conn: sqlite3.Connection, table: str) -> set[str]:
    """The column that is the table's rowid (its INTEGER PRIMARY KEY), if it has one."""
    cols = [
        (str(name), str(kind), int(pk))
        for _, name, kind, _, _, pk in conn.execute(f"PRAGMA table_info({table})")
    ]
    keys = [(name, kind) for name, kind, pk in cols if pk]
    return {keys[0][0]} if len(keys) == 1 and keys[0][1].upper() == "INTEGER" else set()


def _traced_read(path: Path, upstream: UpstreamSection) -> tuple[list[str], list[tuple[str, str]]]:
    config = Config(
        appliance=ApplianceSection(path.parent),
        hsm=HsmConfig(module="unused", token_label="unused"),
        journal=JournalSection(path),
        issuance=IssuanceSection(),
        upstream=upstream,
    )
    statements: list[str] = []
    with Journal(path) as journal:
        journal.call(lambda: journal.conn.set_trace_callback(statements.append))
        doc = journal.call(_read, journal, config)
        journal.call(lambda: journal.conn.set_trace_callback(None))
        scans = journal.call(_scans, journal.conn, statements)
    assert [o["id"] for o in doc["orders"]] == ["WO-1"]  # the work-order report ran too
    return statements, scans


def test_the_status_document_reads_no_growing_table_whole(
    production_journal_template: Path, tmp_path: Path
) -> None:
    path = tmp_path / "journal.sqlite"
    shutil.copy(production_journal_template, path)
    statements, scans = _traced_read(path, UpstreamSection(url="http://127.0.0.1:9/pkix/"))
    assert any("FROM outbox" in s for s in statements)  # the upstream part was read
    assert scans == []


def test_a_whole_table_read_is_caught(production_journal_template: Path, tmp_path: Path) -> None:
    """The check above can fail: the outbox depth (all of `upstream status`) reads every outbox row."""
    with Journal(tmp_path / "journal.sqlite") as journal:
        scans = journal.call(
            _scans, journal.conn, ["SELECT kind, state, COUNT(*) FROM outbox GROUP BY kind, state"]
        )
    assert [plan for _, plan in scans] == ["SCAN outbox"]
