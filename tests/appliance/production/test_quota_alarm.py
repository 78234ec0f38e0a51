"""A work order running out of units while still active: a warning alarm a supervisor can act on, raised from
the unit the issuance takes (no extra query) and cleared when the order is closed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import pytest

from appliance.alarms import Alarms
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.policy import IssueRequest
from appliance.production import store
from tests.appliance.conftest import make_csr
from tests.appliance.production.conftest import Floor, ServiceMaker

CAUSE = "workorder.WO-Q.quota"


async def _until(cond: Callable[[], bool], timeout: float = 60.0) -> None:
    async with asyncio.timeout(timeout):
        while not cond():
            await asyncio.sleep(0.02)


async def test_quota_running_out_warns_then_clears_when_the_order_is_closed(
    floor: Floor, make_service: ServiceMaker, caplog: pytest.LogCaptureFixture
) -> None:
    floor.work_order("WO-Q", quantity=20)
    alarms = Alarms()
    # 10 %: the warning starts when 2 of the 20 units are left.
    async with make_service(alarms=alarms, quota_warning_percent=10, health_interval_s=0.05) as svc:
        for i in range(17):
            await svc.issue(IssueRequest(f"SN-{i:04d}", make_csr()[1], station="st1"))
        assert alarms.get(CAUSE) is None  # 3 left
        with caplog.at_level(logging.WARNING):
            await svc.issue(IssueRequest("SN-0017", make_csr()[1], station="st1"))
            alarm = alarms.get(CAUSE)
            assert alarm is not None and alarm.severity == "warning"
            assert alarm.message == "work order WO-Q has 2 of 20 units left"
            assert "workorder close" in alarm.advice and alarm.details == {"work_order": "WO-Q"}
            for i in (18, 19):
                await svc.issue(IssueRequest(f"SN-{i:04d}", make_csr()[1], station="st1"))
            alarm = alarms.get(CAUSE)
            assert (
                alarm is not None
                and alarm.message == "work order WO-Q has used all 20 units and is still active"
            )
            for i in range(20, 25):
                with pytest.raises(IssuanceRefused) as info:
                    await svc.issue(IssueRequest(f"SN-{i:04d}", make_csr()[1], station="st1"))
                assert info.value.code is ReasonCode.QUOTA_EXHAUSTED
        warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        assert warnings == [f"ALARM {CAUSE}: work order WO-Q has 2 of 20 units left ({alarm.advice})"]

        store.close_work_order(floor.journal, floor.audit, floor.supervisor, "WO-Q")
        await _until(lambda: alarms.get(CAUSE) is None)


async def test_an_order_at_its_end_is_alarmed_at_start_after_a_restart(
    floor: Floor, make_service: ServiceMaker
) -> None:
    """The alarm registry lives in memory: a restart computes the quota alarms from the work orders as they
    stand, before any station asks; an order that has units left raises nothing."""
    floor.work_order("WO-Q", quantity=1)
    async with make_service() as svc:
        await svc.issue(IssueRequest("SN-0000", make_csr()[1], station="st1"))
    floor.work_order("WO-R", quantity=1000)
    alarms = Alarms()
    async with make_service(alarms=alarms, health_interval_s=0.05):
        alarm = alarms.get(CAUSE)
        assert (
            alarm is not None and alarm.message == "work order WO-Q has used all 1 units and is still active"
        )
        assert alarms.get("workorder.WO-R.quota") is None
        store.close_work_order(floor.journal, floor.audit, floor.supervisor, "WO-Q")
        await _until(lambda: alarms.get(CAUSE) is None)  # the start's alarm clears like any other


async def test_a_large_order_far_from_its_end_raises_nothing(
    floor: Floor, make_service: ServiceMaker
) -> None:
    floor.work_order("WO-Q", quantity=1000)
    alarms = Alarms()
    async with make_service(alarms=alarms) as svc:
        for i in range(10):
            await svc.issue(IssueRequest(f"SN-{i:04d}", make_csr()[1], station="st1"))
    assert alarms.active() == []
