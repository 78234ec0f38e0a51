"""The production model: tenants, products, lines and work orders, and the parsing of MES work-order files.

Parsing is pure and reports every problem with where it is (a CSV row number or a JSON entry number), so an MES
file is either imported whole or not at all.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from appliance import names
from appliance.errors import BirthlineError, Problem, ReasonCode
from appliance.production.allowlist import AllowlistError, SerialRange, check_serial, compile_pattern
from appliance.text import load_json

QUANTITY_MAX: Final = 1_000_000_000
SERIALS_MAX: Final = 1_000_000
WORK_ORDER_STATES: Final = ("draft", "active", "closed")
CSV_COLUMNS: Final = (
    "id",
    "product",
    "quantity",
    "valid_from",
    "valid_to",
    "lines",
    "serials",
    "ranges",
    "pattern",
)
_LIST_SPLIT: Final = re.compile(r"[;\s]+")


class ProductionError(BirthlineError):
    """A production change that cannot be made; `problems` (if any) lists each one with where it is."""

    def __init__(self, message: str, problems: Sequence[Problem] = ()) -> None:
        self.problems = list(problems)
        text = message + "".join(f"\n  {p}" for p in self.problems)
        super().__init__(text, ReasonCode.BAD_REQUEST, {"problems": [str(p) for p in self.problems]})

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Tenant:
    name: str
    display_name: str
    created_at: float


@dataclass(frozen=True)
class Product:
    name: str
    tenant: str
    profile: str
    ca: str
    key_algorithms: frozenset[str]
    created_at: float
    issuance_mode: str = "local"  # local | upstream (RA mode: the upstream CA issues; docs/cmp.md)
    revoke_on_update: bool = False  # a key update (CMP kur) revokes the replaced certificate once confirmed


ISSUANCE_MODES: Final = ("local", "upstream")


@dataclass(frozen=True)
class Line:
    name: str
    description: str
    created_at: float
    stations: tuple[str, ...] = ()


@dataclass(frozen=True)
class WorkOrderSpec:
    """A work order as an MES (or the CLI) sends it, before it is stored."""

    id: str
    product: str
    quantity: int
    lines: tuple[str, ...] = ()
    serials: tuple[str, ...] = ()
    ranges: tuple[SerialRange, ...] = ()
    pattern: str | None = None
    valid_from: float | None = None
    valid_to: float | None = None


@dataclass(frozen=True)
class WorkOrder:
    id: str
    product: str
    quantity: int
    consumed: int
    state: str
    pattern: str | None
    valid_from: float | None
    valid_to: float | None
    created_at: float
    activated_at: float | None
    closed_at: float | None
    lines: tuple[str, ...] = ()
    serial_count: int = 0
    ranges: tuple[SerialRange, ...] = field(default_factory=tuple)

    @property
    def remaining(self) -> int:
        return self.quantity - self.consumed

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "product": self.product, "quantity": self.quantity, "consumed": self.consumed,
            "remaining": self.remaining, "state": self.state, "lines": list(self.lines),
            "serials": self.serial_count, "ranges": [str(r) for r in self.ranges], "pattern": self.pattern,
            "valid_from": iso(self.valid_from), "valid_to": iso(self.valid_to),
        }  # fmt: skip


def iso(t: float | None) -> str | None:
    return None if t is None else dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def parse_time(text: str) -> float:
    """ISO 8601 with a time zone (2025-03-01T00:00:00Z); a date alone means 00:00 UTC."""
    try:
        value = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError(f"{text[:40]!r} is not an ISO 8601 time such as 2025-03-01T06:00:00Z") from None
    if value.tzinfo is None:
        if len(text.strip()) == 10:
            value = value.replace(tzinfo=dt.UTC)
        else:
            raise ValueError(f"{text[:40]!r} has no time zone; add Z or +01:00")
    return value.timestamp()


def spec_problems(spec: WorkOrderSpec, where: str = "work order") -> list[Problem]:
    """Every problem of a work order built by the CLI or a caller of the core (an MES file is checked as it is
    parsed, by spec_from_mapping, with the same rules)."""
    problems: list[Problem] = []

    def bad(key: str, message: str | None) -> None:
        if message is not None:
            problems.append(Problem(f"{where}.{key}", message))

    bad("id", names.WORK_ORDER_ID.problem(spec.id))
    bad("product", names.PRODUCT.problem(spec.product))
    if (
        isinstance(spec.quantity, bool)
        or not isinstance(spec.quantity, int)
        or not 1 <= spec.quantity <= QUANTITY_MAX
    ):
        bad("quantity", f"a whole number 1..{QUANTITY_MAX}")
    for line in spec.lines:
        bad("lines", names.LINE.problem(line))
    if len(spec.serials) > SERIALS_MAX:
        bad("serials", f"at most {SERIALS_MAX} explicit serials per work order; use ranges or a pattern")
    else:
        for serial in spec.serials:
            bad("serials", names.DEVICE_SERIAL.problem(serial))
        if len(set(spec.serials)) != len(spec.serials):
            bad("serials", "lists a serial more than once")
    if spec.pattern is not None:
        try:
            compile_pattern(spec.pattern)
        except AllowlistError as exc:
            bad("pattern", str(exc))
    if not spec.serials and not spec.ranges and spec.pattern is None:
        bad("serials", "a work order needs an allowlist: serials, ranges and/or a pattern")
    if spec.valid_from is not None and spec.valid_to is not None and spec.valid_from >= spec.valid_to:
        bad("valid_to", "must be after valid_from")
    return problems


def _name_problem(rule: names.Rule, value: object) -> str:
    return f"required: {rule.rule}" if value is None or value == "" else str(rule.problem(value))


# -- work-order specs ------------------------------------------------------------------------------------------------
def _as_list(value: Any, where: str, problems: list[Problem]) -> list[str]:
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [v for v in _LIST_SPLIT.split(value) if v]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    problems.append(Problem(where, "must be a list of strings (or one string separated by ';')"))
    return []


def spec_from_mapping(data: Mapping[str, Any], where: str) -> tuple[WorkOrderSpec | None, list[Problem]]:
    """One work order from a JSON object or a CSV row; every problem found, each located at `where`."""
    problems: list[Problem] = []

    def bad(key: str, message: str) -> None:
        problems.append(Problem(f"{where}.{key}", message))

    known = {*CSV_COLUMNS}
    for key in data:
        if key not in known:
            bad(str(key), "unknown field")
    wo_id = data.get("id")
    if names.WORK_ORDER_ID.problem(wo_id) is not None:
        bad("id", _name_problem(names.WORK_ORDER_ID, wo_id))
    product = data.get("product")
    if names.PRODUCT.problem(product) is not None:
        bad("product", _name_problem(names.PRODUCT, product))
    raw_q = data.get("quantity")
    quantity = 0
    if isinstance(raw_q, str) and raw_q.strip().isdigit():
        quantity = int(raw_q.strip())
    elif isinstance(raw_q, int) and not isinstance(raw_q, bool):
        quantity = raw_q
    if not 1 <= quantity <= QUANTITY_MAX:
        bad("quantity", f"required: a whole number 1..{QUANTITY_MAX}")
    times: dict[str, float | None] = {"valid_from": None, "valid_to": None}
    for key in times:
        raw = data.get(key)
        if raw is None or raw == "":
            continue
        if not isinstance(raw, str):
            bad(key, "must be an ISO 8601 time string")
            continue
        try:
            times[key] = parse_time(raw)
        except ValueError as exc:
            bad(key, str(exc))
    vf, vt = times["valid_from"], times["valid_to"]
    if vf is not None and vt is not None and vf >= vt:
        bad("valid_to", "must be after valid_from")
    lines = _as_list(data.get("lines"), f"{where}.lines", problems)
    for line in lines:
        problem = names.LINE.problem(line)
        if problem is not None:
            bad("lines", problem)
    serials = _as_list(data.get("serials"), f"{where}.serials", problems)
    if len(serials) > SERIALS_MAX:
        bad("serials", f"at most {SERIALS_MAX} explicit serials per work order; use ranges or a pattern")
        serials = []
    for s in serials:
        try:
            check_serial(s)
        except AllowlistError as exc:
            bad("serials", str(exc))
    if len(set(serials)) != len(serials):
        bad("serials", "lists a serial more than once")
    ranges: list[SerialRange] = []
    raw_ranges = data.get("ranges")
    items: list[Any] = (
        _as_list(raw_ranges, f"{where}.ranges", problems)
        if isinstance(raw_ranges, str)
        else list(raw_ranges or [])
    )
    for item in items:
        try:
            if isinstance(item, str):
                ranges.append(SerialRange.parse(item))
            elif isinstance(item, Mapping):
                ranges.append(_range_from_mapping(item))
            else:
                bad("ranges", "each range is 'PREFIX[FIRST-LAST]' or {prefix, from, to, width}")
        except AllowlistError as exc:
            bad("ranges", str(exc))
    pattern = data.get("pattern")
    if pattern in (None, ""):
        pattern = None
    elif not isinstance(pattern, str):
        bad("pattern", "must be a string")
        pattern = None
    else:
        try:
            compile_pattern(pattern)
        except AllowlistError as exc:
            bad("pattern", str(exc))
    if (
        not serials
        and not ranges
        and pattern is None
        and not any(p.where.startswith(f"{where}.s") for p in problems)
    ):
        bad("serials", "a work order needs an allowlist: serials, ranges and/or a pattern")
    if problems:
        return None, problems
    assert isinstance(wo_id, str) and isinstance(product, str)
    spec = WorkOrderSpec(
        wo_id, product, quantity, tuple(dict.fromkeys(lines)), tuple(serials), tuple(ranges), pattern, vf, vt
    )
    return spec, []


def _range_from_mapping(item: Mapping[str, Any]) -> SerialRange:
    prefix, first, last, width = item.get("prefix", ""), item.get("from"), item.get("to"), item.get("width")
    if not isinstance(prefix, str) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in (first, last, width)
    ):
        raise AllowlistError("a range object is {prefix: string, from: int, to: int, width: int}")
    assert isinstance(first, int) and isinstance(last, int) and isinstance(width, int)
    return SerialRange.make(prefix, first, last, width)


def parse_import(text: str, fmt: str) -> tuple[list[tuple[str, WorkOrderSpec]], list[Problem]]:
    """Parse an MES file (fmt 'csv' or 'json'): (where, spec) pairs and every problem (docs/production.md)."""
    problems: list[Problem] = []
    entries: list[tuple[str, Mapping[str, Any]]] = []
    if fmt == "json":
        try:
            doc = load_json(text)
        except ValueError as exc:
            return [], [Problem("$", str(exc))]
        items = doc.get("work_orders") if isinstance(doc, dict) else doc
        if not isinstance(items, list):
            return [], [Problem("$", 'expected {"work_orders": [ ... ]} or a list of work orders')]
        for n, item in enumerate(items, 1):
            if isinstance(item, dict):
                entries.append((f"work_orders[{n}]", item))
            else:
                problems.append(Problem(f"work_orders[{n}]", "not an object"))
    elif fmt == "csv":
        # A spreadsheet's "CSV UTF-8" starts with a byte order mark: it is not part of the first column's name.
        reader = csv.DictReader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
        header = reader.fieldnames or []
        missing = [c for c in ("id", "product", "quantity") if c not in header]
        unknown = [c for c in header if c not in CSV_COLUMNS]
        if missing or unknown:
            what = (f"missing columns {', '.join(missing)}; " if missing else "") + (
                f"unknown columns {', '.join(unknown)}; " if unknown else ""
            )
            return [], [Problem("row 1", f"{what}the header is {','.join(CSV_COLUMNS)}")]
        for row in reader:
            where = f"row {reader.line_num}"
            if None in row:
                problems.append(Problem(where, "more fields than the header"))
                continue
            entries.append((where, {k: v for k, v in row.items() if v is not None}))
    else:
        raise ProductionError(f"unknown import format {fmt!r}: csv or json")
    specs: list[tuple[str, WorkOrderSpec]] = []
    seen: dict[str, str] = {}
    for where, data in entries:
        spec, found = spec_from_mapping(data, where)
        problems.extend(found)
        if spec is not None:
            if spec.id in seen:
                problems.append(Problem(f"{where}.id", f"work order {spec.id!r} also at {seen[spec.id]}"))
            seen.setdefault(spec.id, where)
            specs.append((where, spec))
    if not entries and not problems:
        problems.append(Problem("$", "the file has no work orders"))
    return specs, problems
