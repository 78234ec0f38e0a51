"""Issue 10 item 8: one rule per kind of name (appliance/names.py), checked at every entry point: the command
line, an MES import, the core that stores names, and the configuration. Each refusal names the field and the
rule, and never puts the hostile value raw on a terminal. Exports neutralise what a spreadsheet would run."""

from __future__ import annotations

import csv
import io
import json

import pytest

from appliance import names
from appliance.cli.main import main
from appliance.config import parse_config
from appliance.errors import BirthlineError, ConfigError
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.production import reconcile, store, users
from appliance.production.model import ProductionError, WorkOrderSpec
from appliance.production.users import Role
from appliance.stations_registry import add_station
from hsm.token import Token
from tests.appliance.conftest import make_csr
from tests.appliance.production.conftest import PASSWORD, Floor

# What a peer, an MES file or a careless script may hand us, one per class of trouble.
HOSTILE = {
    "newline": "WO-1\nFORGED audit line",
    "escape": "WO\x1b[2J\x1b]0;pwned\x07",
    "nul": "WO\x001",
    "bidi": "WO-\u202e1000",
    "dotdot": "..",
    "traversal": "../../etc/passwd",
    "slash": "a/b",
    "formula": "=cmd|' /C calc'!A0",
    "plus": "+1+2",
    "minus": "-2+3",
    "at": "@SUM(A1)",
    "option": "--help",
    "overlong": "W" * 65,
    "empty": "",
    "space": "WO 1",
    "homoglyph": "WO-\uff11",  # FULLWIDTH DIGIT ONE
}
# Device serials are PrintableString: '..', 'a/b', '+1+2' are valid serials (exports neutralise the formula ones).
HOSTILE_SERIALS = {k: v for k, v in HOSTILE.items() if k in
                   ("newline", "escape", "nul", "bidi", "formula", "at", "overlong", "empty", "homoglyph")}  # fmt: skip
# A value starting with '-' is an option to argparse (it refuses it, or '--help' prints the help): not a name.
HOSTILE_ARGS = {k: v for k, v in HOSTILE.items() if not v.startswith("-")}
NAME_RULES = [names.WORK_ORDER_ID, names.STATION, names.LINE, names.TENANT, names.PRODUCT, names.CA,
              names.PROFILE, names.CMP_LABEL, names.USER]  # fmt: skip


def _safe_for_a_terminal(text: str) -> bool:
    return text.isascii() and all(ch.isprintable() or ch == "\n" for ch in text)


@pytest.mark.parametrize("rule", NAME_RULES, ids=lambda r: r.field)
@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_every_name_rule_refuses_every_hostile_value(rule: names.Rule, value: str) -> None:
    with pytest.raises(names.InvalidName) as info:
        rule.check(value)
    message = str(info.value)
    assert message.startswith(rule.field) and rule.rule in message
    assert _safe_for_a_terminal(message) and "\n" not in message


@pytest.mark.parametrize(
    ("rule", "good"),
    [(names.WORK_ORDER_ID, "WO-2025.03:1_a"), (names.STATION, "L1-st1"), (names.CA, "issuing-2"),
     (names.PROFILE, "acme_idevid-2"), (names.CMP_LABEL, "ra.1"), (names.USER, "alice.b-2"),
     (names.DEVICE_SERIAL, "=1+2 (rev. 3)"), (names.SERIAL_PORT, "/dev/serial/by-path/pci-0000:00:14.0-port0")],
)  # fmt: skip
def test_ordinary_names_pass(rule: names.Rule, good: str) -> None:
    assert rule.check(good) == good


@pytest.mark.parametrize(
    "value", ["SN\n1", "SN\x1b1", "SN\x001", "SN\u202e1", "SN_1", " SN1", "S" * 65, "", "SN@1"]
)
def test_device_serials_are_printable_string(value: str) -> None:
    with pytest.raises(names.InvalidName, match="device serial") as info:
        names.DEVICE_SERIAL.check(value)
    assert _safe_for_a_terminal(str(info.value))


@pytest.mark.parametrize(
    "value", ["/dev/../etc/shadow", "dev/ttyS0", "/dev/tty S0", "/dev/\x1b", "/" + "a" * 255]
)
def test_serial_ports_are_plain_absolute_paths(value: str) -> None:
    with pytest.raises(names.InvalidName, match="serial port"):
        names.SERIAL_PORT.check(value)


@pytest.mark.parametrize("value", ["a\nb", "\x1b[31m", "nul\x00", "rtl\u202e", "x" * 257])
def test_free_text_refuses_controls_and_overlong(value: str) -> None:
    for rule in (names.DISPLAY_NAME, names.DESCRIPTION, names.REASON):
        with pytest.raises(names.InvalidName):
            rule.check(value)
    assert names.DISPLAY_NAME.check("Acme Geräte GmbH") == "Acme Geräte GmbH"
    with pytest.raises(names.InvalidName):
        names.REASON.check("   ")


# -- the command line ------------------------------------------------------------------------------------------------
CLI_ENTRIES = {
    "workorder add ID": ["workorder", "add", "{}", "--product", "p", "--quantity", "1", "--serial", "A1"],
    "workorder add --product": [
        "workorder",
        "add",
        "WO-1",
        "--product",
        "{}",
        "--quantity",
        "1",
        "--serial",
        "A",
    ],
    "workorder add --line": ["workorder", "add", "WO-1", "--product", "p", "--quantity", "1", "--line", "{}"],
    "workorder activate": ["workorder", "activate", "{}"],
    "workorder show": ["workorder", "show", "{}"],
    "report workorder": ["report", "workorder", "{}"],
    "export workorder": ["export", "workorder", "{}", "--csv", "/dev/null"],
    "station add --name": ["station", "add", "--name", "{}", "--lan", "--out", "/nonexistent"],
    "station disable": ["station", "disable", "--name", "{}"],
    "line add": ["line", "add", "{}"],
    "line assign-station": ["line", "assign-station", "L1", "{}"],
    "tenant add": ["tenant", "add", "{}"],
    "product add": ["product", "add", "{}", "--tenant", "t", "--profile", "idevid"],
    "product add --tenant": ["product", "add", "p", "--tenant", "{}", "--profile", "idevid"],
    "user add": ["user", "add", "{}", "--bootstrap"],
    "--user": ["tenant", "add", "t", "--user", "{}"],
    "issue --station": ["issue", "--station", "{}", "--serial", "SN1", "--csr", "x", "--user", "u"],
    "revoke --work-order": ["revoke", "--work-order", "{}", "--reason", "keyCompromise", "--user", "u"],
    "ca init-root --name": ["ca", "init-root", "--name", "{}"],
    "crl show --ca": ["crl", "show", "--ca", "{}"],
}


@pytest.mark.parametrize("entry", CLI_ENTRIES, ids=CLI_ENTRIES.keys())
@pytest.mark.parametrize("value", HOSTILE_ARGS.values(), ids=HOSTILE_ARGS.keys())
def test_the_command_line_refuses_hostile_names_before_opening_anything(
    entry: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # No --config: nothing past argument parsing could work here. The refusal is argparse's (exit 2), naming
    # the argument, the field and its rule, with the value escaped.
    assert main([a.replace("{}", value) for a in CLI_ENTRIES[entry]]) == 2
    err = capsys.readouterr().err
    assert "is not allowed: 1.." in err, err
    assert _safe_for_a_terminal(err)


@pytest.mark.parametrize(
    ("argv", "field"),
    [(["issue", "--station", "s", "--serial", "{}", "--csr", "x", "--user", "u"], "device serial"),
     (["device", "scrap", "{}", "--reason", "r", "--user", "u"], "device serial"),
     (["revoke", "--device", "{}", "--reason", "keyCompromise", "--user", "u"], "device serial"),
     (["workorder", "add", "W", "--product", "p", "--quantity", "1", "--serial", "{}"], "device serial"),
     (["device", "rework", "SN1", "--reason", "{}", "--user", "u"], "reason"),
     (["tenant", "add", "t", "--display-name", "{}", "--user", "u"], "display name")],
)  # fmt: skip
@pytest.mark.parametrize("value", ["SN\n1", "SN\x1b[2J", "SN\x00", "SN\u202e1"])
def test_the_command_line_refuses_hostile_serials_and_text(
    argv: list[str], field: str, value: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([a.replace("{}", value) for a in argv]) == 2
    err = capsys.readouterr().err
    assert field in err and _safe_for_a_terminal(err) and value not in err


# -- MES import ------------------------------------------------------------------------------------------------------
def test_an_mes_import_refuses_hostile_names_whole(floor: Floor) -> None:
    cases = [(k, v) for k in ("id", "product", "lines") for v in HOSTILE.values()]
    cases += [("serials", v) for v in HOSTILE_SERIALS.values()]
    for key, value in cases:
        order = {
            "id": "WO-9",
            "product": "sensor",
            "quantity": 1,
            "lines": ["L1"],
            "serials": ["A1"],
            key: value,
        }
        if key in ("lines", "serials"):
            order[key] = [value]
        with pytest.raises(ProductionError) as info:
            store.import_work_orders(
                floor.journal, floor.audit, floor.supervisor, json.dumps([order]), "json"
            )
        assert any(p.where == f"work_orders[1].{key}" for p in info.value.problems), (key, value)
        assert _safe_for_a_terminal(str(info.value))
    assert store.list_work_orders(floor.journal) == []


# -- the core ---------------------------------------------------------------------------------------------------------
def test_the_core_refuses_hostile_names_whoever_calls_it(floor: Floor, hsm_token: Token) -> None:
    j, a = floor.journal, floor.audit
    for value in HOSTILE.values():
        spec = WorkOrderSpec(value, "sensor", 1, ("L1",), serials=("A1",))
        with pytest.raises(ProductionError) as info:
            store.add_work_order(j, a, floor.supervisor, spec)
        assert [p.where for p in info.value.problems] == ["work order.id"]
        with pytest.raises(ProductionError):
            store.add_work_order(
                j, a, floor.supervisor, WorkOrderSpec("WO-8", "sensor", 1, (value,), serials=("A1",))
            )
        calls = [
            lambda v=value: store.add_tenant(j, a, floor.admin, v),
            lambda v=value: store.add_line(j, a, floor.admin, v),
            lambda v=value: store.add_product(
                j, a, floor.admin, v, tenant="acme", profile=floor.profile, ca="issuing"
            ),
            lambda v=value: store.assign_station(j, a, floor.supervisor, v, "L1"),
            lambda v=value: store.activate_work_order(j, a, floor.supervisor, v),
            lambda v=value: users.add_user(j, a, floor.admin, v, Role.OPERATOR, PASSWORD),
            lambda v=value: add_station(j, hsm_token, v, "serial", port="/dev/ttyS9", audit=a, actor="alice"),
        ]
        for call in calls:
            with pytest.raises(BirthlineError) as err:
                call()
            assert _safe_for_a_terminal(str(err.value)) and "is not allowed" in str(err.value), value
    with pytest.raises(names.InvalidName):
        store.rework(j, a, floor.supervisor, "SN-0001", "new key\x1b[2J", ca="issuing")
    assert store.list_work_orders(j) == [] and [t.name for t in store.list_tenants(j)] == ["acme"]


# -- configuration ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["..", "a/b", "=cmd", "x\ny", "-x", "X" * 65])
def test_the_configuration_refuses_hostile_names_with_where(value: str) -> None:
    data = {
        "hsm": {"module": "/m.so", "token_label": "t", "pin_file": "/p"},
        "issuance": {"issuing_ca": value},
        "stations": {"management_ca": value},
        "cmp": {"default_label": value, "labels": {value: {"station": value, "secret_file": "/nonexistent"}}},
    }
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    where = {p.where for p in info.value.problems}
    assert {"issuance.issuing_ca", "stations.management_ca", "cmp.default_label"} <= where
    assert any(w.startswith("cmp.labels.") and w.endswith(".station") for w in where)
    assert any(p.where.startswith("cmp.labels.") and "CMP label" in p.message for p in info.value.problems)
    assert _safe_for_a_terminal(str(info.value))


# -- exports -----------------------------------------------------------------------------------------------------------
async def test_the_csv_export_neutralises_spreadsheet_formulas(floor: Floor, service: IssueService) -> None:
    """Device serials are PrintableString, which allows '=', '+' and '-' first: a serial '=1+2' must reach a
    spreadsheet as text ('=1+2), not as a formula (OWASP CSV Injection)."""
    serials = ("=1+2", "+42", "-7", "SN-0001")
    floor.work_order(quantity=4, serials=serials, ranges=())
    for s in serials:
        await service.issue(IssueRequest(s, make_csr()[1], station="st1"))
    text = reconcile.export_csv(reconcile.certificates(floor.journal, "WO-1"))
    cells = [row["device_serial"] for row in csv.DictReader(io.StringIO(text))]
    assert cells == ["'=1+2", "'+42", "'-7", "SN-0001"]
    for cell in (c for row in csv.reader(io.StringIO(text)) for c in row):
        assert not cell.startswith(reconcile.FORMULA_STARTS)


def test_spreadsheet_safe_covers_owasp_characters() -> None:
    for lead in ("=", "+", "-", "@", "\t", "\r", "\n", "\0"):
        assert reconcile.spreadsheet_safe(lead + "X") == "'" + lead + "X"
    assert reconcile.spreadsheet_safe("A=1") == "A=1" and reconcile.spreadsheet_safe("") == ""
    # A serial that really starts with a quote (PrintableString allows it) stays distinct from a neutralised
    # formula: every cell reads back by dropping one leading quote.
    assert reconcile.spreadsheet_safe("'=1+2") == "''=1+2" != reconcile.spreadsheet_safe("=1+2")
