"""Between requests, what lets the issuance service's alarms clear when their cause does, even if no station
asks meanwhile: the HSM probed after a failure, an admission refusal and the work orders re-checked, the clock
checked against the last issuance.

A mixin of IssueService, whose state it uses (declared below): split from service.py by responsibility.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Callable

from appliance.errors import BirthlineError, IssuanceFailed, ReasonCode
from appliance.issuance.clockguard import ClockGuard
from appliance.issuance.faults import IssuanceAlarms
from appliance.issuance.journal import Journal, journal_error
from hsm.errors import HsmError, SignatureVerificationError
from hsm.keys import HsmPrivateKey


def hsm_code(exc: HsmError) -> ReasonCode:
    """A signature that does not verify is its own refusal (the HSM answered, wrongly); anything else means the
    HSM is not available."""
    return (
        ReasonCode.SIGNATURE_INVALID
        if isinstance(exc, SignatureVerificationError)
        else ReasonCode.HSM_UNAVAILABLE
    )


class HealthChecks:
    journal: Journal
    key: HsmPrivateKey
    clock: Callable[[], float]
    clock_guard: ClockGuard
    admission: Callable[[], str | None] | None
    health_interval_s: float
    _faults: IssuanceAlarms
    _hsm_fault: str | None
    _stopping: asyncio.Event

    async def _check_hsm(self) -> None:
        """The HSM health probe: after an HSM failure, one signature (verified) before the next batch starts."""
        fault = self._hsm_fault
        if fault is None:
            return
        try:
            await self.key.asign_many([b"birthline hsm health probe"])
        except HsmError as exc:
            raise IssuanceFailed(f"HSM unavailable: {exc.message}", hsm_code(exc)) from exc
        self._hsm_fault = None
        self._faults.cleared(
            [ReasonCode.HSM_UNAVAILABLE, ReasonCode.SIGNATURE_INVALID], f"the HSM signs again after: {fault}"
        )

    async def _health(self) -> None:
        """Between requests: probe a failed HSM, re-check an admission refusal and the work orders running out,
        so their alarms clear when the condition does, even if no station asks meanwhile."""
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self.health_interval_s)
                return
            except TimeoutError:
                pass
            try:
                if self._hsm_fault is not None:
                    await self._check_hsm()
                if (
                    self.admission is not None
                    and self._faults.is_open(ReasonCode.BUSY)
                    and not self.admission()
                ):
                    self._faults.cleared([ReasonCode.BUSY], "admitted again")
                self._faults.quiet()
                await self._check_clock()
                if watched := self._faults.watched_work_orders:
                    orders = await self.journal.acall(self._read_work_orders, watched)
                    self._faults.recheck_quota(orders)
            except sqlite3.Error as exc:
                self._faults.failed(journal_error(exc, "reading work orders"))
            except BirthlineError as exc:
                self._faults.failed(exc)
            except Exception as exc:  # noqa: BLE001 - the loop outlives a defect; its traceback is logged
                self._faults.failed(self._faults.internal(exc))

    async def _check_clock(self) -> None:
        """Raise the clock alarm while the clock is behind the last issuance (every request is refused
        CLOCK_NOT_TRUSTED then), at start and between requests, not only when a station asks; clear it once the
        clock is right again."""
        guard = self.clock_guard
        if guard.last_issue is None:  # load() reads it unless a batch has meanwhile
            await self.journal.acall(lambda: guard.load(self.journal.conn))
        now = self.clock()
        if (behind := guard.behind(now)) is not None:
            self._faults.failed(behind)
        elif (stepped := guard.stepped(now)) is not None:
            # A step since the last batch refuses issuance as well (_decide): the alarm stays until it is set back.
            self._faults.failed(stepped)
        elif self._faults.is_open(ReasonCode.CLOCK_NOT_TRUSTED):
            self._faults.cleared(
                [ReasonCode.CLOCK_NOT_TRUSTED], "the clock is no longer behind the last issuance"
            )

    def _read_work_orders(self, ids: list[str]) -> dict[str, tuple[str, int, int]]:
        return self._faults.read_work_orders(self.journal.conn, ids)
