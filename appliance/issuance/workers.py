"""The prepare worker processes, kept working whatever happens to one of them.

A process pool (`procpool.ProcessPool`, as concurrent.futures.ProcessPoolExecutor before it) is broken for good
once one of its workers dies (the OOM killer, a crash in a C library, os._exit): every later call raises
BrokenProcessPool. Before this module that meant INTERNAL for every request of every station until a restart.
`PreparePool` replaces a broken pool as soon as a batch finds it broken (a worker that died while idle costs no
request), and the jobs that were lost with it are run again, each ALONE in
a one-worker quarantine pool: a job that kills its worker every time (a poison input) is then found and refused
by itself (BAD_CSR), while the rest of its batch still issues. No job is ever put back into a shared batch
after a death, so a poison input cannot make the pool die in a loop.

A job lost because the pool was already broken when it was submitted (a worker died while idle, or under
another batch) never ran: it is retried once in the fresh pool before it goes to quarantine.

If a fresh worker cannot even start, nothing is blamed on the requests: they are refused BUSY (retry later),
a critical alarm says so, and no new worker is tried for `RESTART_BACKOFF_S`. Worker deaths are logged once per
`LOG_INTERVAL_S`, and `DEATHS_FOR_ALARM` of them within `DEATH_WINDOW_S` raise a warning alarm.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import BrokenExecutor
from dataclasses import dataclass
from typing import Final

from appliance.alarms import Alarms, LogOnce
from appliance.errors import IssuanceFailed, ReasonCode
from appliance.issuance import prepare
from appliance.issuance.prepare import Job, PrepareContext, Prepared, Refusal
from appliance.issuance.procpool import ProcessPool
from appliance.issuance.tbs import Tbs

log = logging.getLogger(__name__)

DEATHS_FOR_ALARM: Final = 3
DEATH_WINDOW_S: Final = 600.0
LOG_INTERVAL_S: Final = 60.0
RESTART_BACKOFF_S: Final = 5.0
STARTUP_S: Final = 60.0

ALARM_DEATHS: Final = "issuance.prepare-worker-deaths"
ALARM_UNAVAILABLE: Final = "issuance.prepare-workers-unavailable"

POISON_MESSAGE: Final = (
    "this request made the worker process checking it exit, each time it was tried; it was refused"
)
UNAVAILABLE_MESSAGE: Final = "the CSR checking processes cannot start; retry later"

Result = Prepared | Refusal


@dataclass(frozen=True)
class _Lost:
    """A chunk whose pool broke. `ran`: it was in the pool when it broke (else the pool was broken already)."""

    generation: int
    ran: bool


def _new_pool(ctx: PrepareContext, workers: int) -> ProcessPool:
    # prepare.init_worker looked up now, not at import: tests put a worker that cannot start in its place.
    return ProcessPool(workers, prepare.init_worker, (ctx,))


class PreparePool:
    """`workers` prepare processes; `run` never raises for anything a job or a worker's death can cause."""

    def __init__(
        self,
        ctx: PrepareContext,
        workers: int,
        *,
        alarms: Alarms | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1:
            raise ValueError("a PreparePool needs at least one worker")
        self.ctx = ctx
        self.workers = workers
        self.alarms = alarms
        self.clock = clock
        self._pool = _new_pool(ctx, workers)
        self._generation = 0
        self._quarantine_lock = asyncio.Lock()
        self._renew_lock = asyncio.Lock()
        self._mourned = -1  # the last generation whose death was counted
        self._deaths: collections.deque[float] = collections.deque()
        self._unavailable_until = 0.0
        self._log = LogOnce(LOG_INTERVAL_S, clock=clock)
        self.stats = {"deaths": 0, "replaced": 0, "quarantined": 0, "poison": 0, "unavailable": 0}

    # -- lifecycle -----------------------------------------------------------------------------------------------
    async def start(self) -> None:
        """Start every worker now (a failure to start is a start-up error, not a surprise at the first request)."""
        try:
            await self._pool.start(STARTUP_S)
        except Exception as exc:  # BrokenExecutor, or an OSError spawning a worker
            self._pool.shutdown(wait=False)
            raise IssuanceFailed(
                "the CSR checking worker processes could not start", ReasonCode.INTERNAL
            ) from exc

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True)

    @property
    def pids(self) -> list[int]:
        """The process ids of the shared pool's workers (tests and benches kill or measure them)."""
        return self._pool.pids

    @property
    def saturated(self) -> bool:
        """Every worker is busy with another call (issuance.finish.finish_batch then checks a share of a batch
        itself)."""
        return self._pool.saturated

    # -- work ----------------------------------------------------------------------------------------------------
    async def run(self, jobs: Sequence[Job]) -> list[Result]:
        """One result per job, in order."""
        if not jobs:
            return []
        if not self._usable():
            return [_unavailable()] * len(jobs)
        size = -(-len(jobs) // self.workers)
        chunks = [list(jobs[i : i + size]) for i in range(0, len(jobs), size)]
        outcomes = await asyncio.gather(*(self._try(c) for c in chunks))
        results: list[Result] = []
        lost = False
        for chunk, outcome in zip(chunks, outcomes, strict=True):
            if isinstance(outcome, _Lost):
                lost = True
                results.extend(await self._recover(chunk, outcome))
            else:
                results.extend(outcome)
        if not lost:
            self._clear(ALARM_UNAVAILABLE, "the prepare workers run again")
        if not self._deaths or self.clock() - self._deaths[-1] > DEATH_WINDOW_S:
            self._clear(ALARM_DEATHS, f"no prepare worker died for {DEATH_WINDOW_S:.0f} s")
        return results

    async def finish(self, signed: Sequence[tuple[Tbs, bytes]]) -> list[bytes | None] | None:
        """Preparer.finish (encode, verify, assemble) spread over the workers, one result per item in order; None
        if the workers could not do it (a worker died, or a fault in one): the caller then finishes the batch
        itself. A broken pool is replaced for the next batch."""
        if not signed or not self._usable():
            return None
        size = -(-len(signed) // self.workers)
        chunks = [list(signed[i : i + size]) for i in range(0, len(signed), size)]
        generation = self._generation
        try:
            outcomes = await asyncio.gather(*(self._pool.submit(prepare.finish_in_worker, c) for c in chunks))
        except BrokenExecutor:
            await self._renew(generation)
            return None
        except Exception:  # noqa: BLE001 - one call failed (not a death): the pool goes on, the caller finishes
            return None
        results: list[bytes | None] = []
        for outcome in outcomes:
            if outcome is None:
                return None
            results.extend(outcome)
        return results

    async def _try(self, chunk: list[Job]) -> list[Result] | _Lost:
        generation = self._generation
        try:
            future = self._pool.submit(prepare.prepare_in_worker, chunk)
        except Exception:  # noqa: BLE001 - see _submit_failed
            return _Lost(generation, ran=False)
        try:
            results: list[Result] = await future
        except BrokenExecutor:
            return _Lost(generation, ran=True)
        return results

    async def _recover(self, chunk: list[Job], lost: _Lost) -> list[Result]:
        await self._renew(lost.generation)
        if not lost.ran and self._usable():
            # It never ran: the pool was broken before (a worker died idle or under another batch).
            again = await self._try(chunk)
            if not isinstance(again, _Lost):
                return again
            await self._renew(again.generation)
        if not self._usable():
            return [_unavailable()] * len(chunk)
        return await self._quarantine(chunk)

    def _usable(self) -> bool:
        return self.clock() >= self._unavailable_until

    async def _renew(self, generation: int) -> None:
        """Replace the shared pool, once per broken generation (several chunks see the same break). The fresh
        pool starts all its workers before anyone may use it."""
        async with self._renew_lock:
            if generation != self._generation:
                return
            if self._mourned != generation:
                self._mourned = generation
                self._died(
                    "a prepare worker process died; the pool is replaced and its jobs retried one by one"
                )
            self._pool.shutdown(wait=False)
            fresh = await self._started(self.workers)
            if fresh is not None:
                self._pool = fresh
                self._generation += 1
                self.stats["replaced"] += 1

    async def _started(self, workers: int) -> ProcessPool | None:
        """A new pool with all its workers running, or None (then issuance is refused BUSY for a while)."""
        pool = _new_pool(self.ctx, workers)
        try:
            await pool.start(STARTUP_S)
        except Exception:  # noqa: BLE001 - BrokenExecutor, or see _submit_failed
            pool.shutdown(wait=False)
            self._submit_failed()
            return None
        self._clear(ALARM_UNAVAILABLE, "the prepare workers start again")
        return pool

    async def _quarantine(self, jobs: list[Job]) -> list[Result]:
        """Each job alone in a fresh one-worker pool: a death is then that job's doing."""
        results: list[Result] = []
        async with self._quarantine_lock:
            pool: ProcessPool | None = None
            try:
                for job in jobs:
                    if pool is None:
                        pool = await self._started(1)
                        if pool is None:
                            results.extend([_unavailable()] * (len(jobs) - len(results)))
                            break
                    self.stats["quarantined"] += 1
                    try:
                        future = pool.submit(prepare.prepare_in_worker, [job])
                    except Exception:  # noqa: BLE001 - see _submit_failed: not the job's doing
                        pool.shutdown(wait=False)
                        pool = None
                        self._submit_failed()
                        results.extend([_unavailable()] * (len(jobs) - len(results)))
                        break
                    try:
                        (result,) = await future
                    except BrokenExecutor:
                        pool.shutdown(wait=False)
                        pool = None
                        self.stats["poison"] += 1
                        self._died(
                            "a request made its prepare worker exit when checked alone; it was refused"
                        )
                        result = Refusal(ReasonCode.BAD_CSR, POISON_MESSAGE, {"worker": "exited"})
                    results.append(result)
            finally:
                if pool is not None:
                    pool.shutdown(wait=False)
        return results

    def _submit_failed(self) -> None:
        """No worker could be started or reached. Besides BrokenExecutor, submitting can raise OSError (no
        process or file descriptor left, or CPython's pool closing its queues while a submit spawns a worker:
        terminate_broken does not take the lock submit holds), none of which is a job's doing."""
        self._unavailable_until = self.clock() + RESTART_BACKOFF_S
        self.stats["unavailable"] += 1
        if self.alarms is not None:
            self.alarms.raise_alarm(
                ALARM_UNAVAILABLE,
                "the CSR checking worker processes cannot start: issuance is refused (BUSY)",
                "check memory and process limits and the system log; issuance resumes by itself when a"
                " worker starts again",
                severity="critical",
                code=int(ReasonCode.BUSY),
            )
        else:
            log.error("the CSR checking worker processes cannot start: issuance is refused (BUSY)")

    # -- bookkeeping -----------------------------------------------------------------------------------------
    def _died(self, what: str) -> None:
        now = self.clock()
        self.stats["deaths"] += 1
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > DEATH_WINDOW_S:
            self._deaths.popleft()
        self._log.log(log, logging.WARNING, "prepare.worker-died", "%s", what)
        if self.alarms is not None and len(self._deaths) >= DEATHS_FOR_ALARM:
            self.alarms.raise_alarm(
                ALARM_DEATHS,
                f"{len(self._deaths)} CSR checking worker processes died within {DEATH_WINDOW_S:.0f} s;"
                " issuance goes on with fresh ones",
                "look in the system log for the OOM killer or crashes; a request that killed its worker alone"
                " was refused BAD_CSR and is in the audit log",
                severity="warning",
                details={"deaths": len(self._deaths), "window_s": DEATH_WINDOW_S},
            )

    def _clear(self, cause: str, note: str) -> None:
        if self.alarms is not None:
            self.alarms.clear(cause, note)


def _unavailable() -> Refusal:
    return Refusal(ReasonCode.BUSY, UNAVAILABLE_MESSAGE, {})
