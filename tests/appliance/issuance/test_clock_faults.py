"""The wall clock set behind the last issuance, and jumping forward, injected at the issuance service's clock
source (the machine's clock is shared and is not ours to set): issuance is refused with CLOCK_NOT_TRUSTED and
the reason, the alarm is raised, nothing is written; once the clock is set right it resumes and the alarm clears.
The steady clock it is checked against is the real CLOCK_BOOTTIME, as in the daemon."""

from __future__ import annotations

import time

import pytest

from appliance.alarms import Alarms
from appliance.ca import CaRecord
from appliance.errors import BirthlineError, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.profiles import Profile, builtin_profiles
from hsm.token import Token
from tests.appliance.conftest import make_csr

CAUSE = "issuance.clock-not-trusted"


def _service(
    journal: Journal, issuing: CaRecord, token: Token, offset: list[float], alarms: Alarms
) -> IssueService:
    profiles: dict[str, Profile] = dict(builtin_profiles())
    return IssueService(
        journal, issuing, token.get_key(issuing.key_label), profiles, alarms=alarms, clock_skew_s=300,
        clock=lambda: time.time() + offset[0], steady_clock=lambda: time.clock_gettime(time.CLOCK_BOOTTIME),
    )  # fmt: skip


async def _refused(svc: IssueService, serial: str) -> BirthlineError:
    with pytest.raises(BirthlineError) as info:
        await svc.issue(IssueRequest(serial, make_csr()[1]))
    return info.value


@pytest.mark.parametrize("step", [86400.0, 3600.0, 301.0 + 60])
async def test_a_clock_jumping_forward_is_refused_until_set_back(
    journal: Journal, issuing: CaRecord, hsm_token: Token, step: float
) -> None:
    offset = [0.0]
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, offset, alarms) as svc:
        await svc.issue(IssueRequest("SN-0", make_csr()[1]))
        offset[0] = step
        for i in range(3):
            err = await _refused(svc, f"SN-FWD-{i}")
            assert err.code is ReasonCode.CLOCK_NOT_TRUSTED
            assert "stepped forward by" in str(err) and "set it back" in str(err), err
        alarm = alarms.get(CAUSE)
        assert alarm is not None and alarm.count == 3 and "stepped forward" in alarm.message
        # Nothing was reserved, dated or signed at the wrong time.
        assert [r.device_serial for r in journal.rows()] == ["SN-0"]
        offset[0] = 0.0  # set right again
        await svc.issue(IssueRequest("SN-1", make_csr()[1]))
        assert alarms.get(CAUSE) is None
    assert [(r.device_serial, r.state) for r in journal.rows()] == [("SN-0", "issued"), ("SN-1", "issued")]


async def test_a_clock_set_behind_the_last_issuance_is_refused_then_resumes(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    offset = [0.0]
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, offset, alarms) as svc:
        await svc.issue(IssueRequest("SN-0", make_csr()[1]))
        offset[0] = -7200.0
        err = await _refused(svc, "SN-BACK")
        assert err.code is ReasonCode.CLOCK_NOT_TRUSTED and "behind the last issuance" in str(err)
        assert alarms.get(CAUSE) is not None
        offset[0] = 0.0
        await svc.issue(IssueRequest("SN-1", make_csr()[1]))
        assert alarms.get(CAUSE) is None
    # Restarted while the clock is behind: the last issuance is read from the journal, still refused.
    offset[0] = -7200.0
    async with _service(journal, issuing, hsm_token, offset, Alarms()) as svc:
        err = await _refused(svc, "SN-BACK-2")
        assert err.code is ReasonCode.CLOCK_NOT_TRUSTED and "behind the last issuance" in str(err)


async def test_a_small_step_or_a_step_to_the_right_time_after_a_restart_is_accepted(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    offset = [0.0]
    async with _service(journal, issuing, hsm_token, offset, Alarms()) as svc:
        await svc.issue(IssueRequest("SN-0", make_csr()[1]))
        offset[0] = 120.0  # within clock_skew_s: an NTP correction, not a jump
        await svc.issue(IssueRequest("SN-1", make_csr()[1]))
        offset[0] = 120.0 + 3600.0
        assert (await _refused(svc, "SN-2")).code is ReasonCode.CLOCK_NOT_TRUSTED
    # The operator says the new time is right by restarting: the new process anchors at it.
    async with _service(journal, issuing, hsm_token, offset, Alarms()) as svc:
        await svc.issue(IssueRequest("SN-3", make_csr()[1]))
