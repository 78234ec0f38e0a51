"""The protocol's code table mirrors the appliance's reason codes, and stations/ stays importable alone."""

from __future__ import annotations

import ast
from pathlib import Path

from appliance.errors import ReasonCode
from stations.codes import RETRYABLE, Code, code_from_wire

STATIONS = Path(__file__).resolve().parents[2] / "stations"


def test_codes_mirror_reason_codes_number_for_number() -> None:
    for reason in ReasonCode:
        assert Code[reason.name].value == reason.value
    mirrored = {c for c in Code if c.value < 100 and c is not Code.OK}
    assert {c.name for c in mirrored} == {r.name for r in ReasonCode}


def test_protocol_codes_live_at_100_and_above() -> None:
    protocol = {c for c in Code if c.name not in ReasonCode.__members__ and c is not Code.OK}
    assert protocol and all(c.value >= 100 for c in protocol)
    assert all(0 <= c.value <= 0xFFFF for c in Code)


def test_permanent_refusals_are_not_retryable() -> None:
    for code in (
        Code.BAD_CSR,
        Code.BAD_POP,
        Code.DEVICE_ALREADY_ISSUED,
        Code.AUTH_FAILED,
        Code.UNKNOWN_STATION,
    ):
        assert code not in RETRYABLE
    assert Code.BUSY in RETRYABLE and Code.HSM_UNAVAILABLE in RETRYABLE


def test_unknown_wire_code_is_kept_as_int() -> None:
    assert code_from_wire(7) is Code.QUOTA_EXHAUSTED
    assert code_from_wire(4242) == 4242


def test_stations_never_imports_appliance_or_hsm() -> None:
    for path in STATIONS.glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            for name in names:
                assert name.split(".")[0] not in {"appliance", "hsm"}, f"{path.name} imports {name}"
