"""The revocation store: selectors, roles, idempotence, audit in the same transaction, scrap and rework."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Mapping
from typing import Any

import pytest

from appliance.audit.log import AuditError
from appliance.issuance.journal import Journal
from appliance.production import store
from appliance.production.users import AuthError
from appliance.va import revocation as rv
from appliance.va.revocation import Reason, RevocationError, Source
from tests.appliance.va.conftest import DEVICES, Va, audit_events


def count(journal: Journal) -> int:
    return int(journal.call(lambda: journal.conn.execute("SELECT COUNT(*) FROM revocation").fetchone()[0]))


def test_revoke_by_certificate_serial_is_stored_and_audited_with_the_supervisor(va: Va) -> None:
    serial = va.serial("SN-0001")
    before = time.time()
    result = rv.revoke(
        va.journal, va.audit, va.supervisor, cert_serial=serial.upper(), reason="keyCompromise"
    )
    (r,) = result.revoked
    assert (r.cert_serial, r.ca, r.device_serial, r.reason, r.actor, r.source) == (
        serial, "issuing", "SN-0001", Reason.KEY_COMPROMISE, "sam", Source.CLI,
    )  # fmt: skip
    assert before <= r.revoked_at <= time.time() and r.forwarded_at is None
    assert result.cas == {"issuing"}
    ((actor, data),) = audit_events(va.journal, "cert.revoke")
    assert actor == "sam"
    assert (
        json.loads(data).items()
        >= {"cert_serial": serial, "reason": "keyCompromise", "device_serial": "SN-0001"}.items()
    )
    assert rv.get_revocation(va.journal, "0x" + serial) == r


def test_revoke_is_idempotent_and_refuses_another_reason_but_raises_to_key_compromise(va: Va) -> None:
    serial = va.serial("SN-0002")
    rv.revoke(va.journal, va.audit, va.supervisor, cert_serial=serial, reason=Reason.CESSATION_OF_OPERATION)
    again = rv.revoke(
        va.journal, va.audit, va.supervisor, cert_serial=serial, reason="cessation-of-operation"
    )
    assert not again.changed and len(again.already) == 1
    assert len(audit_events(va.journal, "cert.revoke")) == 1 and count(va.journal) == 1
    with pytest.raises(RevocationError, match="only be raised to keyCompromise"):
        rv.revoke(va.journal, va.audit, va.supervisor, cert_serial=serial, reason="superseded")
    first = rv.get_revocation(va.journal, serial)
    assert first is not None
    raised = rv.revoke(
        va.journal, va.audit, va.supervisor, cert_serial=serial, reason="key_compromise",
        invalidity_date=time.time() - 3600,
    )  # fmt: skip
    (r,) = raised.raised
    assert r.reason == Reason.KEY_COMPROMISE and r.revoked_at == first.revoked_at and r.invalidity_date
    assert r.change_seq > first.change_seq
    ((_, data),) = audit_events(va.journal, "cert.revoke-reason")
    assert json.loads(data)["previous_reason"] == "cessationOfOperation"


@pytest.mark.parametrize("who", ["operator", "admin"])
def test_only_a_supervisor_may_revoke(va: Va, who: str) -> None:
    with pytest.raises(AuthError, match="needs: supervisor"):
        rv.revoke(va.journal, va.audit, getattr(va, who), device_serial="SN-0001", reason="keyCompromise")
    assert count(va.journal) == 0


@pytest.mark.parametrize(
    "selectors",
    [{}, {"device_serial": "SN-0001", "cert_serial": "ab"}, {"work_order": "WO-1", "device_serial": "x"}],
)
def test_exactly_one_selector(va: Va, selectors: dict[str, str]) -> None:
    with pytest.raises(RevocationError, match="exactly one"):
        rv.revoke(va.journal, va.audit, va.supervisor, reason="unspecified", **selectors)


@pytest.mark.parametrize(
    ("selector", "message"),
    [
        ({"cert_serial": "abcdef"}, "no certificate with serial"),
        ({"cert_serial": "not hex"}, "not a hexadecimal"),
        ({"device_serial": "SN-9999"}, "no issued certificate"),
        ({"work_order": "WO-404"}, "no work order"),
    ],
)
def test_unknown_targets_are_refused(va: Va, selector: dict[str, str], message: str) -> None:
    with pytest.raises(RevocationError, match=message):
        rv.revoke(va.journal, va.audit, va.supervisor, reason="unspecified", **selector)


def test_unknown_or_refused_reasons(va: Va) -> None:
    for bad in ("certificateHold", "removeFromCRL", "aACompromise", "nope"):
        with pytest.raises(RevocationError, match="unknown revocation reason"):
            rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0001", reason=bad)


def test_revoke_a_device_and_a_whole_work_order(va: Va) -> None:
    one = rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0003", reason="privilegeWithdrawn")
    assert [r.device_serial for r in one.revoked] == ["SN-0003"]
    whole = rv.revoke(va.journal, va.audit, va.supervisor, work_order="WO-1", reason="affiliationChanged")
    assert sorted(r.device_serial for r in whole.revoked) == sorted(set(DEVICES) - {"SN-0003"})
    assert [r.device_serial for r in whole.already] == ["SN-0003"]  # bulk: left with its own reason
    assert {r.reason for r in rv.list_revocations(va.journal)} == {
        Reason.AFFILIATION_CHANGED,
        Reason.PRIVILEGE_WITHDRAWN,
    }
    assert len(audit_events(va.journal, "cert.revoke")) == len(DEVICES)


def _insert(journal: Journal, serial: str, state: str, device: str) -> None:
    def txn(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256, csr_sha256,"
            " cert_serial, tbs_sha256, state, created_at) VALUES ('r','st','idevid','issuing',?,?,?,?,?,?,?)",
            (device, serial.encode(), b"c", serial, b"t", state, time.time()),
        )

    journal.call(journal.transaction, txn, "test row")


def test_burned_and_in_flight_serials_cannot_be_revoked(va: Va) -> None:
    _insert(va.journal, "b0b0", "burned", "SN-BURN")
    _insert(va.journal, "1a1a", "intent", "SN-0050")
    with pytest.raises(RevocationError, match="never released"):
        rv.revoke(va.journal, va.audit, va.supervisor, cert_serial="b0b0", reason="unspecified")
    with pytest.raises(RevocationError, match="being issued right now"):
        rv.revoke(va.journal, va.audit, va.supervisor, cert_serial="1a1a", reason="unspecified")
    # the intent row belongs to WO-1's unit? It has none: bind one so the work-order selector sees it.
    va.journal.call(va.journal.transaction, lambda c: c.execute(
        "INSERT INTO work_order_unit (work_order, device_serial, kind, issuance_id, created_at)"
        " SELECT 'WO-1', 'SN-0050', 'new', id, 0 FROM issuance WHERE cert_serial='1a1a'"), "unit")  # fmt: skip
    result = rv.revoke(va.journal, va.audit, va.supervisor, work_order="WO-1", reason="unspecified")
    assert result.in_flight == ("1a1a",) and len(result.revoked) == len(DEVICES)


def test_scrap_revokes_cessation_of_operation_and_rework_revokes_superseded(va: Va) -> None:
    store.scrap(va.journal, va.audit, va.supervisor, "SN-0004", "dropped in the oven", ca="issuing")
    store.rework(va.journal, va.audit, va.supervisor, "SN-0005", "secure element replaced", ca="issuing")
    by_device = {r.device_serial: r for r in rv.list_revocations(va.journal)}
    assert by_device["SN-0004"].reason == Reason.CESSATION_OF_OPERATION
    assert by_device["SN-0004"].source == Source.SCRAP and by_device["SN-0004"].actor == "sam"
    assert by_device["SN-0005"].reason == Reason.SUPERSEDED and by_device["SN-0005"].source == Source.REWORK
    # a later keyCompromise for the scrapped device raises its reason
    raised = rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0004", reason="keyCompromise")
    assert [r.device_serial for r in raised.raised] == ["SN-0004"]


def test_scraps_from_before_revocation_existed_are_backfilled_at_open(va: Va) -> None:
    store.scrap(va.journal, va.audit, va.supervisor, "SN-0004", "dropped", ca="issuing")
    va.journal.call(va.journal.transaction, lambda c: c.execute("DELETE FROM revocation"), "forget")
    path = va.journal.path
    with Journal(path) as again:
        (r,) = rv.list_revocations(again)
    assert r.device_serial == "SN-0004" and r.reason == Reason.CESSATION_OF_OPERATION


class FailingAudit:
    def append(self, conn: sqlite3.Connection, actor: str, event: str, data: Mapping[str, Any]) -> Any:
        raise AuditError("disk full")

    def record(self, actor: str, event: str, data: Mapping[str, Any]) -> Any:
        raise AuditError("disk full")


def test_no_revocation_without_its_audit_entry(va: Va) -> None:
    with pytest.raises(AuditError):
        rv.revoke(va.journal, FailingAudit(), va.supervisor, device_serial="SN-0001", reason="keyCompromise")
    assert count(va.journal) == 0


def test_forwarding_seam(va: Va) -> None:
    rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0001", reason="keyCompromise")
    (pending,) = rv.unforwarded(va.journal)
    rv.mark_forwarded(va.journal, [pending.cert_serial])
    assert rv.unforwarded(va.journal) == []
    got = rv.get_revocation(va.journal, pending.cert_serial)
    assert got is not None and got.forwarded_at is not None
