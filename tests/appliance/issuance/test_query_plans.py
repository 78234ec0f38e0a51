"""The queries that run per request or per command use indexes, so they cost the same on a journal ten years full
(bench/journal_growth.py measures that journal; this checks the plans, which do not depend on its size)."""

from __future__ import annotations

from pathlib import Path

from appliance.issuance.journal import Journal
from bench.journal_growth import HOT_QUERIES, plans


def test_hot_queries_use_indexes_on_a_real_journal(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.sqlite") as journal:
        found = journal.call(lambda: plans(journal.conn))
    assert [name for name, _, _ in found] == [name for name, _, _ in HOT_QUERIES]
    assert [(name, plan) for name, plan, scans in found if scans] == []


def test_a_lookup_without_its_index_is_reported_as_a_full_scan(tmp_path: Path) -> None:
    """The check above can fail: without issuance_by_device, `revoke --device` scans the issuance table."""
    with Journal(tmp_path / "journal.sqlite") as journal:
        journal.call(lambda: journal.conn.execute("DROP INDEX issuance_by_device"))
        found = journal.call(lambda: plans(journal.conn))
    assert [name for name, _, scans in found if scans] == ["revocation by device"]


def test_the_queue_age_is_read_from_its_own_index(tmp_path: Path) -> None:
    """The forwarder's queue age (every pass): through outbox_open_created, one seek. Through any other index of
    the open rows SQLite also says SEARCH, but reads every open row from the table: about a second with 100,000
    queued (docs/performance.md "Upstream drain"), so the plan must name this index."""
    with Journal(tmp_path / "journal.sqlite") as journal:
        plan = dict((name, p) for name, p, _ in journal.call(lambda: plans(journal.conn)))["outbox oldest"]
    assert "outbox_open_created" in plan, plan
    with Journal(tmp_path / "without.sqlite") as journal:  # the check can fail
        journal.call(lambda: journal.conn.execute("DROP INDEX outbox_open_created"))
        plan = dict((name, p) for name, p, _ in journal.call(lambda: plans(journal.conn)))["outbox oldest"]
    assert "outbox_open_created" not in plan, plan


def test_the_daemon_start_reads_no_whole_table(tmp_path: Path) -> None:
    """At every start the issuance core burns the intents a crash left and reads the time of the last issuance
    (its clock check): each was a read of every issuance row (docs/performance.md "Ten years of journal").
    Without their indexes both are flagged."""
    with Journal(tmp_path / "journal.sqlite") as journal:
        found = dict((name, p) for name, p, _ in journal.call(lambda: plans(journal.conn)))
    assert "issuance_intent" in found["start: interrupted intents"], found
    assert "issuance_created" in found["start: last issuance"], found
    with Journal(tmp_path / "without.sqlite") as journal:  # the check can fail
        journal.call(lambda: journal.conn.execute("DROP INDEX issuance_intent"))
        journal.call(lambda: journal.conn.execute("DROP INDEX issuance_created"))
        flagged = [name for name, _, scans in journal.call(lambda: plans(journal.conn)) if scans]
    assert flagged == ["start: interrupted intents", "start: last issuance"]


def test_upstream_status_reads_counters_and_an_index_not_the_outbox(tmp_path: Path) -> None:
    """`birthline upstream status` on ten years of records: the depths from the counter table (journal schema
    4), the parked and failed records through outbox_aside. Without that index the listing reads the outbox
    backwards, all of it when nothing is set aside (45 s with a million records), and is flagged."""
    with Journal(tmp_path / "journal.sqlite") as journal:
        found = dict((name, p) for name, p, _ in journal.call(lambda: plans(journal.conn)))
    assert found["upstream status: depth"] == "SCAN outbox_count", found
    assert "outbox_aside" in found["upstream status: set aside"], found
    with Journal(tmp_path / "without.sqlite") as journal:  # the check can fail
        journal.call(lambda: journal.conn.execute("DROP INDEX outbox_aside"))
        flagged = [name for name, _, scans in journal.call(lambda: plans(journal.conn)) if scans]
    assert flagged == ["upstream status: set aside"]
