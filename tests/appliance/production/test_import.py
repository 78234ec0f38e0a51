"""MES work-order import: CSV and JSON, every problem reported with its row, all or nothing; safe patterns."""

from __future__ import annotations

import json

import pytest

from appliance.production import store
from appliance.production.allowlist import AllowlistError, SerialRange, compile_pattern, pattern_matches
from appliance.production.model import ProductionError
from tests.appliance.production.conftest import Floor
from tests.cpu import cpu_budget

CSV_OK = """id,product,quantity,valid_from,valid_to,lines,serials,ranges,pattern
WO-100,sensor,500,2025-01-01T00:00:00Z,2030-01-01T00:00:00Z,L1;L2,,ACME-[000001-000500],
WO-101,sensor,3,,,L1,A1;A2;A3,,
WO-102,sensor,10,,,L2,,,ACME-X[0-9]{4}
"""


def count(floor: Floor) -> int:
    return int(
        floor.journal.call(
            lambda: floor.journal.conn.execute("SELECT COUNT(*) FROM work_order").fetchone()[0]
        )
    )


def test_csv_import(floor: Floor) -> None:
    ids = store.import_work_orders(
        floor.journal, floor.audit, floor.supervisor, CSV_OK, "csv", source="mes.csv"
    )
    assert ids == ["WO-100", "WO-101", "WO-102"]
    wo = store.get_work_order(floor.journal, "WO-100")
    assert (
        wo.lines == ("L1", "L2") and wo.ranges == (SerialRange("ACME-", 1, 500, 6),) and wo.state == "draft"
    )
    assert store.get_work_order(floor.journal, "WO-101").serial_count == 3
    events = [e.event for e in floor.audit.entries()][-4:]
    assert events == ["workorder.add"] * 3 + ["workorder.import"]


def test_a_spreadsheets_byte_order_mark_is_not_part_of_the_header(floor: Floor) -> None:
    """Excel's "CSV UTF-8" starts with U+FEFF."""
    ids = store.import_work_orders(floor.journal, floor.audit, floor.supervisor, "\ufeff" + CSV_OK, "csv")
    assert ids == ["WO-100", "WO-101", "WO-102"]


@pytest.mark.parametrize(
    "doc", ["[" * 100_000 + "]" * 100_000, '{"work_orders": [{"quantity": ' + "9" * 5000 + "}]}"]
)
def test_hostile_json_is_a_problem_not_a_traceback(floor: Floor, doc: str) -> None:
    with pytest.raises(ProductionError) as info:
        store.import_work_orders(floor.journal, floor.audit, floor.supervisor, doc, "json")
    assert "not valid JSON" in str(info.value)
    assert count(floor) == 0


def test_json_import(floor: Floor) -> None:
    doc = {"work_orders": [{
        "id": "WO-J", "product": "sensor", "quantity": 2, "lines": ["L1"], "serials": ["S1"],
        "ranges": [{"prefix": "R-", "from": 1, "to": 9, "width": 2}], "valid_to": "2031-01-01",
    }]}  # fmt: skip
    store.import_work_orders(
        floor.journal, floor.audit, floor.supervisor, json.dumps(doc), "json", activate=True
    )
    wo = store.get_work_order(floor.journal, "WO-J")
    assert wo.state == "active" and str(wo.ranges[0]) == "R-[01-09]"


def test_bad_rows_report_every_problem_and_import_nothing(floor: Floor) -> None:
    bad = CSV_OK + (
        "WO-100,sensor,5,,,L1,A9,,\n"  # duplicate id in the file
        "WO-200,nosuch,0,yesterday,,L9,,,\n"  # product, quantity, time, line, allowlist
        "WO-201,sensor,5,,,L1,,ACME-[1-100],(a+)+$\n"  # range widths differ, nested quantifier
    )
    with pytest.raises(ProductionError) as info:
        store.import_work_orders(floor.journal, floor.audit, floor.supervisor, bad, "csv", source="mes.csv")
    text = str(info.value)
    for where in (
        "row 5.id",
        "row 6.quantity",
        "row 6.valid_from",
        "row 6.serials",
        "row 7.ranges",
        "row 7.pattern",
    ):
        assert where in text, where
    assert "nothing was imported" in text
    probs = info.value.problems
    assert [p.where.split(".")[0] for p in probs] == sorted(
        (p.where.split(".")[0] for p in probs), key=lambda w: int(w.split()[1])
    )
    assert count(floor) == 0
    # Database-level problems (unknown product and line) are found too, once the syntax is clean.
    fixable = "id,product,quantity,lines,serials\nWO-300,nosuch,5,L9,A1\nWO-301,sensor,5,L1,A2\n"
    with pytest.raises(ProductionError) as info:
        store.import_work_orders(floor.journal, floor.audit, floor.supervisor, fixable, "csv")
    assert {p.where for p in info.value.problems} == {"row 2.product", "row 2.lines"}
    assert count(floor) == 0


def test_json_problems_are_located(floor: Floor) -> None:
    doc = [{"id": "A", "product": "sensor", "quantity": 1, "serials": ["S 1"], "colour": "red"}, 7]
    with pytest.raises(ProductionError) as info:
        store.import_work_orders(floor.journal, floor.audit, floor.supervisor, json.dumps(doc), "json")
    assert {p.where for p in info.value.problems} == {"work_orders[1].colour", "work_orders[2]"}
    with pytest.raises(ProductionError):
        store.import_work_orders(floor.journal, floor.audit, floor.supervisor, "{not json", "json")


def test_import_needs_the_work_order_role(floor: Floor) -> None:
    from appliance.production.users import AuthError

    with pytest.raises(AuthError):
        store.import_work_orders(floor.journal, floor.audit, floor.operator, CSV_OK, "csv")
    assert count(floor) == 0


@pytest.mark.parametrize(
    "pattern",
    [r"(a+)+b", r"(a*)*", r"(ab|cd)*x", r"(a|a)+", r"\w*\w*\w*\w*", r"(?=a)a", r"(a)\1", "x" * 129, r"[0-9",
     "(.|a)" * 25, r"\w*-\w*-\w*", "(ab|cd|ef)" * 11],
)  # fmt: skip
def test_unsafe_or_broken_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(AllowlistError):
        compile_pattern(pattern)


def test_every_accepted_pattern_fails_cheaply_on_the_worst_serial() -> None:
    """The bound holds where backtracking is worst: a 64-character serial the pattern almost matches."""
    for pattern in (r"A.{0,31}B.{0,31}C", "(.|a)" * 15 + "b", r"[A-Z]{1,64}[0-9]{1,64}X"):
        compiled = compile_pattern(pattern)
        with cpu_budget(0.5):
            for subject in ("a" * 64, "A" * 63 + "0", "ABC" * 21 + "D"):
                compiled.fullmatch(subject)


def test_safe_patterns_match_the_whole_serial() -> None:
    assert pattern_matches(r"ACME-[0-9]{6}", "ACME-000123")
    assert not pattern_matches(r"ACME-[0-9]{6}", "xACME-000123")
    assert not pattern_matches(r"ACME-[0-9]{6}", "ACME-0001234")
    assert not pattern_matches(r"A.*", "A" * 65)  # longer than any device serial
