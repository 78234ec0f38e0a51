"""The issuance service on the real SoftHSM token, with the PKCS#11 fault wrapper (tests/p11_faults.py) between
the hsm package and python-pkcs11 injecting what SoftHSM does not do on demand: a lost session, a device that
goes away and comes back, a call that hangs, a corrupted signature, a PIN the token refuses at a re-login.

Each test checks what reliability.md section 3 promises: recovery where a retry can help; otherwise issuance
refused with its reason and an alarm, the serial it reserved recorded as burned (never a certificate built on a
signature that does not verify), and issuance resuming once the fault is gone, without a station asking.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pkcs11
import pytest

from appliance.alarms import Alarms
from appliance.ca import CaRecord
from appliance.errors import BirthlineError, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.profiles import Profile, builtin_profiles
from hsm.softhsm import SoftHsmToken
from hsm.token import Token
from tests.appliance.conftest import make_csr
from tests.p11_faults import Faults, installed

REFUSED = 8  # requests sent while a fault lasts


@pytest.fixture
def faults() -> Iterator[Faults]:
    with installed() as f:
        yield f


def _service(journal: Journal, issuing: CaRecord, token: Token, alarms: Alarms) -> IssueService:
    profiles: dict[str, Profile] = dict(builtin_profiles())
    key = token.get_key(issuing.key_label)  # found through the wrapper: its C_Sign calls are faulted
    return IssueService(journal, issuing, key, profiles, alarms=alarms, health_interval_s=0.05)  # type: ignore[arg-type]


async def _refused(svc: IssueService, prefix: str, n: int = REFUSED) -> list[ReasonCode]:
    codes = []
    for i in range(n):
        with pytest.raises(BirthlineError) as info:
            await svc.issue(IssueRequest(f"{prefix}-{i}", make_csr()[1]))
        codes.append(info.value.code)
    return codes


async def _until(cond: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
    """Wait for a condition (a deadlock guard, not a speed requirement)."""
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)
    assert cond(), what


def _states(journal: Journal) -> dict[str, str]:
    return {r.device_serial: r.state for r in journal.rows()}


async def test_a_lost_session_is_recovered_with_one_login_and_nothing_burned(
    journal: Journal, issuing: CaRecord, hsm_token: Token, faults: Faults
) -> None:
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, alarms) as svc:
        faults.session_lost = 1
        result = await svc.issue(IssueRequest("SN-LOST", make_csr()[1]))
        assert not result.reused
    assert faults.session_lost == 0, "the fault was not hit"
    assert faults.logins == 1  # one re-login, then the same C_Sign again
    assert _states(journal) == {"SN-LOST": "issued"}
    assert alarms.active() == []


async def test_device_removed_stops_issuance_with_an_alarm_and_it_resumes_when_back(
    journal: Journal, issuing: CaRecord, hsm_token: Token, faults: Faults
) -> None:
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, alarms) as svc:
        faults.removed = True
        assert await _refused(svc, "SN-GONE") == [ReasonCode.HSM_UNAVAILABLE] * REFUSED
        alarm = alarms.get("issuance.hsm-unavailable")
        assert alarm is not None and alarm.severity == "critical" and "HSM device failure" in alarm.message
        # The first request's serial was reserved and is recorded as burned; the probe refused the rest first.
        assert _states(journal) == {"SN-GONE-0": "burned"}
        tries = faults.initializes  # each probe: C_Finalize + C_Initialize, then the token is asked for
        await _until(lambda: faults.initializes >= tries + 3, "the probe keeps trying the device")
        logins = faults.logins
        faults.removed = False
        await _until(lambda: alarms.get("issuance.hsm-unavailable") is None, "the probe clears the alarm")
        assert faults.logins == logins + 1  # the device came back: C_Initialize again and one login
        await svc.issue(IssueRequest("SN-BACK", make_csr()[1]))
    assert _states(journal)["SN-BACK"] == "issued"


async def test_a_hanging_hsm_is_a_time_out_then_issuance_resumes(
    journal: Journal, issuing: CaRecord, hsm_token: Token, faults: Faults
) -> None:
    alarms = Alarms()
    thread = hsm_token.thread
    saved = thread.timeout_s
    async with _service(journal, issuing, hsm_token, alarms) as svc:
        thread.timeout_s = 0.5  # the process-wide PKCS#11 thread's call time-out, for this test only
        try:
            faults.delay_s = 5.0
            with pytest.raises(BirthlineError) as info:
                await svc.issue(IssueRequest("SN-SLOW", make_csr()[1]))
            assert info.value.code is ReasonCode.HSM_UNAVAILABLE and "did not finish" in str(info.value)
            alarm = alarms.get("issuance.hsm-unavailable")
            assert alarm is not None and "did not finish" in alarm.message
            faults.delay_s = 0.0
            # The hung call ends by itself; its signature is thrown away (its serial stays burned).
            await _until(lambda: alarms.get("issuance.hsm-unavailable") is None, "the probe clears the alarm")
        finally:
            thread.timeout_s = saved
            faults.delay_s = 0.0
        await svc.issue(IssueRequest("SN-AFTER-SLOW", make_csr()[1]))
    assert _states(journal) == {"SN-SLOW": "burned", "SN-AFTER-SLOW": "issued"}


async def test_a_corrupted_signature_is_never_delivered(
    journal: Journal, issuing: CaRecord, hsm_token: Token, faults: Faults
) -> None:
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, alarms) as svc:
        faults.corrupt = True
        codes = await _refused(svc, "SN-BAD")
        assert codes == [ReasonCode.SIGNATURE_INVALID] * REFUSED
        alarm = alarms.get("issuance.signature-invalid")
        assert alarm is not None and alarm.severity == "critical" and "does not verify" in alarm.message
        rows = journal.rows()
        assert [(r.device_serial, r.state, r.cert_der) for r in rows] == [("SN-BAD-0", "burned", None)]
        faults.corrupt = False
        await _until(lambda: alarms.active() == [], "the probe clears the alarm")
        await svc.issue(IssueRequest("SN-GOOD", make_csr()[1]))
    assert _states(journal)["SN-GOOD"] == "issued"


async def test_a_refused_pin_is_never_presented_again_by_the_session_recovery(
    journal: Journal, issuing: CaRecord, hsm_token: Token, softhsm_token: SoftHsmToken, faults: Faults
) -> None:
    """The PIN file was changed to a wrong PIN while the daemon ran, then the session was lost: the re-login
    fails (SoftHSM's own PinIncorrect). The health probe and every request would log in again, each a step
    towards the lockout of a real HSM: the same PIN is presented once. Once the file is right, issuance resumes."""
    pin_file = Path(softhsm_token.pin_file)
    right = pin_file.read_text()
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, alarms) as svc:
        try:
            pin_file.write_text("999999\n")
            faults.session_lost = 1
            codes = await _refused(svc, "SN-PIN")
            assert codes == [ReasonCode.HSM_UNAVAILABLE] * REFUSED
            alarm = alarms.get("issuance.hsm-unavailable")
            assert alarm is not None and "it is not presented again" in alarm.message
            # Each refused request and each probe since asked the token again (C_Finalize + C_Initialize, then
            # a login), with one C_Login in all.
            tries = faults.initializes
            await _until(lambda: faults.initializes >= tries + 3, "the probe keeps trying")
            assert faults.logins == 1, f"the wrong PIN was presented {faults.logins} times"
        finally:
            pin_file.write_text(right)
        await _until(lambda: alarms.get("issuance.hsm-unavailable") is None, "the probe clears the alarm")
        assert faults.logins == 2  # the corrected PIN, once
        await svc.issue(IssueRequest("SN-PIN-OK", make_csr()[1]))
    assert _states(journal)["SN-PIN-OK"] == "issued"


async def test_a_device_error_at_login_is_retried_by_the_probe_unlike_a_refused_pin(
    journal: Journal, issuing: CaRecord, hsm_token: Token, faults: Faults
) -> None:
    """C_Login failing with CKR_DEVICE_ERROR says nothing about the PIN: the probe logs in again until the device
    answers, then issuance resumes."""
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, alarms) as svc:
        faults.login_error = pkcs11.DeviceError
        faults.session_lost = 1
        assert await _refused(svc, "SN-LOGIN") == [ReasonCode.HSM_UNAVAILABLE] * REFUSED
        alarm = alarms.get("issuance.hsm-unavailable")
        assert alarm is not None and "HSM device failure" in alarm.message
        logins = faults.logins
        await _until(lambda: faults.logins >= logins + 3, "the probe logs in again")
        faults.login_error = None
        await _until(lambda: alarms.get("issuance.hsm-unavailable") is None, "the probe clears the alarm")
        await svc.issue(IssueRequest("SN-LOGIN-OK", make_csr()[1]))
    assert _states(journal)["SN-LOGIN-OK"] == "issued"
