"""Refusals of the appliance's own making raise an alarm, are logged once however many requests they refuse,
and clear when issuance succeeds again. Real faults where SQLite, the clock and SoftHSM can produce them; a
mock only for the defect (an exception nothing real raises on purpose)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest
from pytest_mock import MockerFixture

from appliance.alarms import Alarms
from appliance.ca import CaRecord
from appliance.errors import BirthlineError, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.prepare import Preparer
from appliance.issuance.service import IssueService
from appliance.profiles import Profile, builtin_profiles
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from tests.appliance.conftest import make_csr
from tests.p11_faults import corrupting
from tests.real_faults import hsm_token_removed

REFUSED = 12  # requests sent while the fault lasts


def _service(journal: Journal, issuing: CaRecord, token: Token, **kw: object) -> IssueService:
    profiles: dict[str, Profile] = dict(builtin_profiles())
    return IssueService(journal, issuing, token.get_key(issuing.key_label), profiles, **kw)  # type: ignore[arg-type]


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Everything logged at WARNING or above: what an operator's log shows by default."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


async def _refused(svc: IssueService, prefix: str, n: int = REFUSED) -> list[ReasonCode]:
    """Send n requests one after another (each its own batch) and collect the codes they were refused with."""
    codes = []
    for i in range(n):
        with pytest.raises(BirthlineError) as info:
            await svc.issue(IssueRequest(f"{prefix}-{i}", make_csr()[1]))
        codes.append(info.value.code)
    return codes


async def _until(cond: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Wait for a condition (a deadlock guard, not a speed requirement)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)
    assert cond(), what


async def test_audit_log_unwritable_raises_one_alarm_and_clears_on_success(
    journal: Journal, issuing: CaRecord, hsm_token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    from appliance.audit.log import AuditLog

    journal.call(lambda: journal.conn.execute(
        "CREATE TRIGGER audit_full BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit disk full'); END"))  # fmt: skip
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, audit=AuditLog(journal), alarms=alarms) as svc:
        with caplog.at_level(logging.WARNING):
            assert await _refused(svc, "SN-A") == [ReasonCode.AUDIT_UNAVAILABLE] * REFUSED
        alarm = alarms.get("issuance.audit-unavailable")
        assert alarm is not None and alarm.severity == "critical" and alarm.code == 14
        assert alarm.count == REFUSED and "audit" in alarm.message and alarm.advice
        lines = _lines(caplog)
        assert len(lines) == 1 and "ALARM issuance.audit-unavailable" in lines[0], lines

        caplog.clear()
        journal.call(lambda: journal.conn.execute("DROP TRIGGER audit_full"))
        with caplog.at_level(logging.WARNING):
            await svc.issue(IssueRequest("SN-A-OK", make_csr()[1]))
        assert alarms.active() == []
        assert [line for line in _lines(caplog) if "issuance.audit-unavailable" in line] == [
            f"alarm cleared issuance.audit-unavailable after {REFUSED} occurrence(s): issuance succeeded"
        ]


async def test_clock_behind_raises_one_alarm_and_clears_when_set_right(
    journal: Journal, issuing: CaRecord, hsm_token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    import time

    offset = [0.0]
    alarms = Alarms()
    svc = _service(journal, issuing, hsm_token, alarms=alarms, clock=lambda: time.time() + offset[0])
    async with svc:
        await svc.issue(IssueRequest("SN-C0", make_csr()[1]))
        offset[0] = -86400.0  # the clock jumped a day back
        with caplog.at_level(logging.WARNING):
            assert await _refused(svc, "SN-C") == [ReasonCode.CLOCK_NOT_TRUSTED] * REFUSED
        alarm = alarms.get("issuance.clock-not-trusted")
        assert alarm is not None and alarm.code == 11 and "behind" in alarm.message
        lines = _lines(caplog)
        assert len(lines) == 1 and "ALARM issuance.clock-not-trusted" in lines[0], lines
        offset[0] = 0.0
        await svc.issue(IssueRequest("SN-C-OK", make_csr()[1]))
        assert alarms.get("issuance.clock-not-trusted") is None


async def test_hsm_gone_raises_one_alarm_and_the_probe_clears_it_when_back(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    softhsm_token: SoftHsmToken,
    caplog: pytest.LogCaptureFixture,
) -> None:
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, alarms=alarms, health_interval_s=0.05) as svc:
        with hsm_token_removed(softhsm_token), caplog.at_level(logging.WARNING):
            assert await _refused(svc, "SN-H") == [ReasonCode.HSM_UNAVAILABLE] * REFUSED
            alarm = alarms.get("issuance.hsm-unavailable")
            assert alarm is not None and alarm.code == 12 and "HSM" in alarm.message
            # Only the first request reserved a serial; the probe refuses the rest before any intent.
            assert [r.state for r in journal.rows()] == ["burned"]
            lines = _lines(caplog)
            assert len(lines) == 1 and "ALARM issuance.hsm-unavailable" in lines[0], lines
        # Back, and no station asks: the background probe finds it and clears the alarm.
        await _until(lambda: alarms.get("issuance.hsm-unavailable") is None, "the probe clears the alarm")
        result = await svc.issue(IssueRequest("SN-H-OK", make_csr()[1]))
        assert not result.reused


async def test_an_unverifiable_signature_is_alarmed_and_the_probe_clears_it(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: MockerFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SoftHSM never returns a bad signature: one bit of every C_Sign output flipped (as in test_service), then
    put right. The service's own verify catches it; the health probe's (hsm/keys.py) until it is put right."""
    import hsm.keys

    corrupt = corrupting(hsm.keys.c_sign)

    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, alarms=alarms, health_interval_s=0.05) as svc:
        bad = mocker.patch("hsm.keys.c_sign", side_effect=corrupt)
        with caplog.at_level(logging.WARNING):
            codes = await _refused(svc, "SN-S")
        # The first batch signs and burns its intent; the probe then refuses the rest before any intent.
        assert codes == [ReasonCode.SIGNATURE_INVALID] * REFUSED
        assert [r.state for r in journal.rows()] == ["burned"]
        alarm = alarms.get("issuance.signature-invalid")
        assert alarm is not None and alarm.code == 15 and "ca list" in alarm.advice
        lines = _lines(caplog)
        assert len(lines) == 1 and lines[0].startswith("ALARM issuance.signature-invalid"), lines
        mocker.stop(bad)
        await _until(lambda: alarms.active() == [], "the probe clears it")


async def test_a_defect_is_logged_with_its_traceback_once_and_alarmed(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: MockerFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A defect that only some requests hit (a peer may choose them): its alarm does not flap with every good
    request between, it clears after internal_quiet_s without a defect."""
    now = [1000.0]
    alarms = Alarms(clock=lambda: now[0])
    broken = [True]
    real = Preparer.prepare_many

    def prepare(self: Preparer, jobs: list[object]) -> list[object]:
        if broken[0]:
            raise RuntimeError("a defect")
        return real(self, jobs)  # type: ignore[arg-type]

    mocker.patch.object(Preparer, "prepare_many", autospec=True, side_effect=prepare)
    async with _service(journal, issuing, hsm_token, alarms=alarms) as svc:
        with caplog.at_level(logging.WARNING):
            assert await _refused(svc, "SN-I") == [ReasonCode.INTERNAL] * REFUSED
            alarm = alarms.get("issuance.internal")
            assert alarm is not None and alarm.count == REFUSED and "RuntimeError" in alarm.message
            for i in range(REFUSED):  # good and bad requests alternate
                broken[0] = False
                await svc.issue(IssueRequest(f"SN-I-OK-{i}", make_csr()[1]))
                broken[0] = True
                assert await _refused(svc, f"SN-I-BAD-{i}", 1) == [ReasonCode.INTERNAL]
        tracebacks = [r for r in caplog.records if "Traceback" in r.getMessage()]
        assert len(tracebacks) == 1 and "a defect" in tracebacks[0].getMessage()
        assert len(_lines(caplog)) == 2, _lines(caplog)  # the traceback and the alarm, nothing per request
        broken[0] = False
        now[0] += 301  # five minutes without a defect
        await svc.issue(IssueRequest("SN-I-LAST", make_csr()[1]))
        assert alarms.get("issuance.internal") is None


async def test_admission_refusal_is_alarmed_once_and_clears_without_a_request(
    journal: Journal, issuing: CaRecord, hsm_token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    full = ["upstream queue over its hard limit (9 record(s), oldest 5 s; limits 9, 86400 s)"]
    alarms = Alarms()
    svc = _service(
        journal, issuing, hsm_token, alarms=alarms, admission=lambda: full[0] or None, health_interval_s=0.05
    )
    async with svc:
        with caplog.at_level(logging.WARNING):
            assert await _refused(svc, "SN-B") == [ReasonCode.BUSY] * REFUSED
        alarm = alarms.get("issuance.busy")
        assert alarm is not None and "hard limit" in alarm.message and "upstream" in alarm.advice
        lines = _lines(caplog)
        assert len(lines) == 1 and "ALARM issuance.busy" in lines[0], lines
        full[0] = ""
        await _until(lambda: alarms.get("issuance.busy") is None, "admission re-checked")


async def test_device_caused_refusals_raise_no_alarm(
    journal: Journal, issuing: CaRecord, hsm_token: Token, caplog: pytest.LogCaptureFixture
) -> None:
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, alarms=alarms) as svc:
        with caplog.at_level(logging.WARNING):
            for i in range(REFUSED):
                with pytest.raises(BirthlineError) as info:
                    await svc.issue(IssueRequest(f"SN-D-{i}", b"not a CSR"))
                assert info.value.code is ReasonCode.BAD_CSR
    assert alarms.active() == []
    assert _lines(caplog) == []
