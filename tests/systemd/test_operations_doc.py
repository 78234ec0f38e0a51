"""docs/operations.md's alarm table names every alarm the daemon can raise, so an operator who reads a cause
in `systemctl status` finds what it means and what to do."""

from __future__ import annotations

import re
from pathlib import Path

from appliance import diskspace, station_failures
from appliance.audit import checkpointer
from appliance.cmp.forwarder import Forwarder
from appliance.connections import AcceptErrors
from appliance.issuance import faults, template, workers
from appliance.va.crl import CrlPublisher
from appliance.va.ocsp import OcspResponder

TOP = Path(__file__).resolve().parents[2]
# Every place that raises an alarm (`raise_alarm(` in appliance/): a new one must be added to CAUSES below and
# to the table in docs/operations.md.
RAISE_SITES = 18


def causes() -> set[str]:
    return {
        *(c.key for c in faults.CAUSES.values()),
        faults.quota_cause("<id>"),
        workers.ALARM_DEATHS,
        workers.ALARM_UNAVAILABLE,
        template.ALARM,
        Forwarder.ALARM_FORWARDER,
        Forwarder.ALARM_QUEUE,
        Forwarder.ALARM_UNCONFIRMED,
        diskspace.CAUSE,
        checkpointer.ALARM_CAUSE,
        station_failures.ALARM_CAUSE + "<station>",
        AcceptErrors.CAUSE,
        "listener.<name>.full",  # ConnectionGate.cause
        CrlPublisher.ALARM,
        OcspResponder.ALARM_REFRESH,
        OcspResponder.ALARM_SIGNER,
        "stations.registry",  # appliance/daemon.py
        "tls.names",  # appliance/daemon.py
    }


def test_every_alarm_is_in_the_operations_guide() -> None:
    text = (TOP / "docs/operations.md").read_text()
    table = text[text.index("\n## Alarms") :]
    documented = set(re.findall(r"^\| `([^`]+)` \|", table, flags=re.MULTILINE))
    assert causes() <= documented, sorted(causes() - documented)
    assert documented <= causes(), sorted(documented - causes())


def test_the_list_of_raise_sites_is_complete() -> None:
    sites = sum(len(re.findall(r"\.raise_alarm\(", p.read_text())) for p in (TOP / "appliance").rglob("*.py"))
    assert sites == RAISE_SITES, "a new alarm: add its cause to causes() here and to docs/operations.md"
