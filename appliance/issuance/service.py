"""The issuance pipeline, as a long-lived async service with group commit.

authorise -> validate the CSR -> build from the profile -> journal intent -> sign in the HSM -> verify ->
journal issued -> answer. Requests that arrive together share the two transactions (group commit) but each
still follows that order: no signature is made before its intent is durable, and no certificate is released
before it is stored.

RA mode (a product whose issuance_mode is 'upstream'): authorise -> validate the CSR -> journal the request and
its outbox row in ONE transaction -> answer "pending" (IssuancePending). Nothing is signed here; the forwarder
stores the upstream CA's certificate in `ra_request`, and the same request asked again is then answered with it.

Here: the service's life, its queues and batches, and the answers. Beside it, by responsibility:
intents.py (the intent transaction: clock, conflicts, work orders), signing.py (signing a batch and storing its
certificates), finish.py (each HSM signature verified and its certificate assembled), health.py (the checks
between requests that clear alarms), clockguard.py (whether the clock can date a certificate), confirmations.py
(delivery confirmations).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping

from cryptography.hazmat.primitives import serialization

from appliance.alarms import Alarms, LogOnce
from appliance.ca import CaRecord
from appliance.crashpoints import die
from appliance.errors import BirthlineError, IssuanceFailed, IssuancePending, IssuanceRefused, ReasonCode
from appliance.issuance.activity import Activity
from appliance.issuance.clockguard import ClockGuard
from appliance.issuance.confirmations import Confirm, ConfirmSteps
from appliance.issuance.faults import IssuanceAlarms
from appliance.issuance.health import HealthChecks
from appliance.issuance.intents import IntentSteps
from appliance.issuance.items import IssueResult, Item
from appliance.issuance.journal import Journal, burn_interrupted
from appliance.issuance.observe import IssuanceObserver, Outcome
from appliance.issuance.pauses import StationPauses
from appliance.issuance.policy import AllowAll, AuditSink, AuthorisationPolicy, IssueRequest
from appliance.issuance.prepare import Job, PrepareContext, Preparer, Refusal
from appliance.issuance.refusals import RefusalLimiter
from appliance.issuance.requestids import new_request_id
from appliance.issuance.signing import SignSteps
from appliance.issuance.template import ALARM as TEMPLATE_ALARM
from appliance.issuance.workers import PreparePool
from appliance.profiles import Profile
from hsm.keys import HsmPrivateKey

log = logging.getLogger(__name__)

# The retry-after of a request refused because the issuance queue is full: the same second a station is told for a
# request id still being worked on (stations.server.DUPLICATE_RETRY_MS); the queue has moved on by then.
SHED_RETRY_AFTER_S = 1.0

# Named crash points for the crash-safety tests: the process SIGKILLs itself there. Not a secret, and unset in
# production; read once at start so the hot path pays nothing.
CRASH_POINTS = ("after-intent", "after-sign", "after-store")
CRASH_ENV = "BIRTHLINE_CRASH_POINT"


class IssueService(IntentSteps, SignSteps, ConfirmSteps, HealthChecks):
    """Issue birth certificates from one issuing CA. Use as an async context manager."""

    def __init__(
        self,
        journal: Journal,
        ca: CaRecord,
        key: HsmPrivateKey,
        profiles: Mapping[str, Profile],
        *,
        default_profile: str = "idevid",
        policy: AuthorisationPolicy | None = None,
        batch_max: int = 64,
        max_csr_bytes: int = 8192,
        clock_skew_s: float = 300.0,
        clock: Callable[[], float] = time.time,
        steady_clock: Callable[[], float] | None = None,
        prepare_workers: int = 0,
        pipeline_depth: int = 2,
        audit: AuditSink | None = None,
        admission: Callable[[], str | None] | None = None,
        upstream_retry_s: float | None = None,
        refusal_burst: int = 60,
        refusal_window_s: float = 60.0,
        alarms: Alarms | None = None,
        quota_warning_percent: int = 5,
        health_interval_s: float = 5.0,
        recover_intents: bool = True,
        forward_upstream: bool = True,
        max_queued: int = 0,
        activity: Activity | None = None,
    ) -> None:
        ca_cert = ca.certificate
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if ca_cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise IssuanceFailed(
                f"the HSM key {key.label!r} is not the key of CA {ca.name!r}", ReasonCode.HSM_UNAVAILABLE
            )
        self.journal = journal
        self.audit = audit
        self.ca = ca
        self.chain = tuple(c.public_bytes(serialization.Encoding.DER) for c in ca.chain)
        self.key = key
        self.default_profile = default_profile
        self.policy: AuthorisationPolicy = policy or AllowAll()
        self.batch_max = batch_max
        self.clock = clock
        self.clock_guard = ClockGuard(clock_skew_s, steady_clock)
        """Refuses issuance (CLOCK_NOT_TRUSTED) while `clock` is behind the last issuance or was stepped by more than
        clock_skew_s since the last batch (against `steady_clock`, one nobody sets: the daemon's CLOCK_BOOTTIME;
        None: no step check, for tests that drive `clock` by hand)."""
        self.prepare_workers = prepare_workers
        self.pipeline_depth = max(1, pipeline_depth)
        self._profiles = dict(profiles)
        self._ctx = PrepareContext(self._profiles, ca.cert_der or b"", ca.key_algorithm, max_csr_bytes)
        self._preparer = Preparer(self._ctx)
        self._pool: PreparePool | None = None
        # A bug of ours in preparation refuses one request (INTERNAL); logged once per place, not per request.
        self._prepare_faults = LogOnce(interval_s=300.0)
        self._queue: asyncio.Queue[Item | None] = asyncio.Queue()
        self._confirms: asyncio.Queue[Confirm | None] = asyncio.Queue()
        self._tg: asyncio.TaskGroup | None = None
        self._inflight: dict[tuple[str, bytes], Item] = {}
        self._unsettled: list[int] = []  # intents whose signature was made but could not be stored or burned
        self._hsm_fault: str | None = None
        self._crash_at = os.environ.get(CRASH_ENV, "")
        self.stats = {"issued": 0, "reused": 0, "refused": 0, "failed": 0, "batches": 0, "pending": 0}
        self.max_queued = max_queued
        """Requests waiting for the issuance loop at most (0: no limit). Past it a request is refused BUSY before
        anything is done for it, with `retry_after_s` in its details: over capacity the queue, and so the latency
        of the requests accepted, stays bounded, instead of every request waiting longer and longer."""
        self.shed = 0  # requests refused that way
        self._shed_log = LogOnce(interval_s=60.0)
        self.admission = admission
        """Consulted before every batch: a text refuses the whole batch (BUSY), e.g. the upstream queue over its
        hard limit (appliance.cmp.forwarder.Forwarder.admission). It must be cheap: it runs on the hot path."""
        self.upstream_retry_s = upstream_retry_s
        """RA mode is available (an upstream is configured): how long a station waits before asking again.
        None: requests for products in upstream mode are refused (UNKNOWN_PROFILE: no upstream CA)."""
        self._refusals = RefusalLimiter(refusal_burst, refusal_window_s)
        self._stopping = asyncio.Event()
        self.forward_upstream = forward_upstream
        """Write each issuance's upstream outbox record. False on a standalone line (no [upstream] url): nothing
        would ever send them, and the outbox would grow with every certificate (docs/cmp.md)."""
        self.recover_intents = recover_intents
        """Burn the intents found at start (crash recovery). Only for a process that issues alone on this
        journal: the daemon, under its lock. `birthline issue` beside a running daemon must not, or it would burn
        the daemon's requests in flight."""
        self.alarms = alarms or Alarms()
        """Where refusals of the appliance's own making are raised (runtime.Core.alarms in the daemon)."""
        self._faults = IssuanceAlarms(self.alarms, quota_warning_percent=quota_warning_percent)
        self.health_interval_s = health_interval_s
        self.pauses = StationPauses(journal)
        """Stations an operator paused: refused STATION_PAUSED before anything else is done for them."""
        self.observer: IssuanceObserver | None = None
        """Told every answer, signing call and confirmation (the control API and metrics); None: nobody."""
        self.activity = activity or Activity()
        """Marked for every request from its queueing to its answer: what OCSP answers yield to (runtime.Core
        shares one between the services of a process and the responder)."""

    # -- lifecycle -------------------------------------------------------------------------------------------
    async def __aenter__(self) -> IssueService:
        burned = await self.journal.atransaction(self._recover, "recovering interrupted issuances")
        if burned:
            log.warning(
                "burned %d intent(s) left by an interrupted run; their serials are never reused", burned
            )
        self._faults.check_work_orders(
            await self.journal.acall(self._faults.read_active_work_orders, self.journal.conn)
        )
        await self._check_clock()
        if self.prepare_workers > 0:
            self._pool = PreparePool(self._ctx, self.prepare_workers, alarms=self.alarms)
            await self._pool.start()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._tg.create_task(self._batcher(), name="issuance-batcher")
        self._tg.create_task(self._confirm_batcher(), name="confirm-batcher")
        self._tg.create_task(self._summaries(), name="refusal-summaries")
        self._tg.create_task(self._health(), name="issuance-health")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._queue.put(None)
        await self._confirms.put(None)
        self._stopping.set()
        assert self._tg is not None
        await self._tg.__aexit__(None, None, None)
        self._tg = None
        await self._write_summaries(final=True)
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        # Anything still queued was never started: tell its caller rather than leave it waiting forever.
        stopped = IssuanceFailed("the issuance service stopped", ReasonCode.BUSY)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item.future.done():
                item.future.set_exception(stopped)
        while not self._confirms.empty():
            pending = self._confirms.get_nowait()
            if pending is not None and not pending[3].done():
                pending[3].set_exception(stopped)

    @property
    def profiles(self) -> Mapping[str, Profile]:
        return self._profiles

    @property
    def prepare_stats(self) -> Mapping[str, int]:
        """The prepare workers' counters (deaths, pool replacements, jobs quarantined, poison requests refused,
        times no worker could start); empty without worker processes."""
        return dict(self._pool.stats) if self._pool is not None else {}

    @property
    def prepare_pids(self) -> list[int]:
        """The process ids of the prepare workers now running; empty without worker processes."""
        return self._pool.pids if self._pool is not None else []

    # -- API ---------------------------------------------------------------------------------------------------
    async def issue(self, request: IssueRequest) -> IssueResult:
        if self._tg is None:
            raise IssuanceFailed("the issuance service is not running", ReasonCode.BUSY)
        if self.max_queued and self._queue.qsize() >= self.max_queued:
            self.shed += 1
            self._shed_log.log(log, logging.WARNING, "shed", "issuance queue full (%d requests): new requests are"
                               " answered BUSY, retry after %g s", self.max_queued, SHED_RETRY_AFTER_S)  # fmt: skip
            raise IssuanceRefused(
                f"the appliance is busy ({self.max_queued} requests queued): retry after {SHED_RETRY_AFTER_S:g} s",
                ReasonCode.BUSY,
                {"retry_after_s": SHED_RETRY_AFTER_S},
            )
        if not request.request_id:
            request = dataclasses.replace(request, request_id=new_request_id())
        fut: asyncio.Future[IssueResult] = asyncio.get_running_loop().create_future()
        item = Item(request, fut)
        self.activity.begin()
        try:
            await self._queue.put(item)
            if self.observer is None:
                return await fut
            try:
                result = await fut
            except BirthlineError as exc:
                self._tell(item, None, exc)
                raise
            self._tell(item, result, None)
            return result
        finally:
            self.activity.end()

    def _tell(self, item: Item, result: IssueResult | None, error: BirthlineError | None) -> None:
        if self.observer is None:
            return
        req = item.request
        grant = item.grant if item.leader is None else item.leader.grant  # a follower: its leader's grant
        work_order, product = (
            (grant.work_order, grant.product) if grant is not None else item.origin or (None, None)
        )
        self.observer.answered(Outcome(
            req.station, req.device_serial, req.request_id,
            item.prep.profile if item.prep is not None else req.profile, work_order, product,
            result.cert_serial if result is not None else None, result.reused if result is not None else False,
            None if isinstance(error, IssuancePending) else error, isinstance(error, IssuancePending),
            req.front_end,
        ))  # fmt: skip

    def _recover(self, conn: sqlite3.Connection) -> int:
        """Burn every intent left by a crash: its signature, if the HSM made one, was never released. Read the
        paused stations."""
        self.pauses.load_in(conn)
        serials = burn_interrupted(conn) if self.recover_intents else []
        if serials:
            self._note(
                conn, "appliance", "issuance.burned", {"reason": "crash-recovery", "cert_serials": serials}
            )
        return len(serials)

    # -- the batcher -------------------------------------------------------------------------------------------
    async def _next_batch(self) -> list[Item] | None:
        first = await self._queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.batch_max and not self._queue.empty():
            nxt = self._queue.get_nowait()
            if nxt is None:
                self._queue.put_nowait(None)  # let the loop see the stop after this batch
                break
            batch.append(nxt)
        return batch

    async def _batcher(self) -> None:
        # Up to pipeline_depth batches in flight: one can be preparing or journaling while another signs, so
        # fsyncs and HSM calls (which release the GIL) overlap with CPU work. Order within each request holds.
        slots = asyncio.Semaphore(self.pipeline_depth)
        async with asyncio.TaskGroup() as tg:
            n = 0
            while (batch := await self._next_batch()) is not None:
                await slots.acquire()
                n += 1
                task = tg.create_task(self._guarded(batch), name=f"issuance-batch-{n}")
                task.add_done_callback(lambda _t: slots.release())

    async def _guarded(self, batch: list[Item]) -> None:
        try:
            await self._run_batch(batch)
        except BirthlineError as exc:
            self._fail(batch, exc)
        except Exception as exc:  # noqa: BLE001 - a defect fails its batch (traceback logged), never the service
            self._fail(batch, self._faults.internal(exc))
        except asyncio.CancelledError:
            # The batch was stopped midway (its task group is going down): its callers are told rather than left
            # waiting for ever, each still counted open in `activity`. Nothing was released; an intent it left is
            # burned at the next start, as after a crash.
            stopped = IssuanceFailed("the issuance service stopped", ReasonCode.BUSY)
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(stopped)
            raise
        finally:
            for item in batch:
                if item.prep is not None and self._inflight.get(item.key) is item:
                    del self._inflight[item.key]
            for item in batch:
                for follower in item.followers:
                    self._follow(follower)

    def _fail(self, items: list[Item], exc: BirthlineError) -> None:
        """The whole batch (or the part being signed) failed: every cause of that is the appliance's own
        (device-caused refusals are answered per request), so it raises the alarm of its cause."""
        self._faults.failed(exc)
        for item in items:
            if not item.future.done():
                self.stats["failed"] += 1
                item.future.set_exception(exc)

    def _crash(self, point: str) -> None:
        if self._crash_at == point:
            die(point)  # the marker first: the campaign counts only a death that left it

    async def _run_batch(self, batch: list[Item]) -> None:
        self.stats["batches"] += 1
        if self.admission is not None:
            if (refusal := self.admission()) is not None:
                raise IssuanceRefused(refusal, ReasonCode.BUSY)
            self._faults.cleared([ReasonCode.BUSY], "admitted again")
        await self._settle()
        await self._check_hsm()
        now = self.clock()
        if self.pauses.paused:
            for item in batch:
                if (pause := self.pauses.get(item.request.station)) is not None:
                    item.error = pause.refusal()
        await self._prepare(batch, int(now))
        live = []
        for item in batch:
            if item.error is not None:
                continue
            leader = self._inflight.get(item.key)
            if leader is not None:
                item.leader = leader
                leader.followers.append(item)
            else:
                self._inflight[item.key] = item
                live.append(item)
        refused = [i for i in batch if i.error is not None]
        wrote = bool(live or (refused and self.audit is not None))
        if wrote:
            await self.journal.atransaction(
                lambda conn: self._record_intents(conn, live, refused, now), "recording intents"
            )
        self._crash("after-intent")
        to_sign = [i for i in live if i.row_id is not None and i.error is None]
        signed = await self._sign_and_store(to_sign) if to_sign else None
        for item in batch:
            self._answer(item)
        self._report(batch, signed, wrote)

    def _report(self, batch: list[Item], signed: bool | None, wrote: bool) -> None:
        """Alarms from a batch that did not fail as a whole: the clock refusals and work orders running out
        raise theirs; everything the batch proved to work clears its own."""
        clock_ok = False
        for item in batch:
            err = item.error
            if isinstance(err, IssuancePending) or item.row_id is not None or item.reuse is not None:
                clock_ok = True  # past the clock check in _decide
            if err is not None and err.code is ReasonCode.CLOCK_NOT_TRUSTED:
                self._faults.failed(err)
            elif err is not None and err.code is ReasonCode.QUOTA_EXHAUSTED:
                self._faults.quota_refused(err)
            grant = item.grant
            took_unit = err is None or isinstance(err, IssuancePending)
            if took_unit and grant is not None and grant.remaining is not None and grant.quantity is not None:
                self._faults.units_left(str(grant.work_order), grant.remaining, grant.quantity)
        if signed is not False:  # False: signing or storing failed, and _fail raised its alarm
            self._faults.succeeded(journal_ok=wrote, signed=bool(signed), clock_ok=clock_ok)

    # -- steps -------------------------------------------------------------------------------------------------
    async def _prepare(self, batch: list[Item], now: int) -> None:
        """Validate and build: CPU work, in worker processes when configured; nothing committed yet. Items
        already refused (a paused station) are left out."""
        batch = [i for i in batch if i.error is None]
        if not batch:
            return
        jobs = [
            Job(
                i.request.device_serial,
                i.request.csr,
                i.request.profile or self.default_profile,
                now,
                i.request.public_key_der,
            )
            for i in batch
        ]
        if self._pool is None:
            results = self._preparer.prepare_many(jobs)
        else:
            # Never raises for a job's content or a worker's death (appliance/issuance/workers.py).
            results = await self._pool.run(jobs)
        for item, result in zip(batch, results, strict=True):
            if isinstance(result, Refusal):
                item.error = result.error()
                if result.fault is not None:
                    self._prepare_faults.log(
                        log, logging.ERROR, f"prepare:{result.fault}",
                        "a request was refused INTERNAL by a fault in CSR checking (a bug): %s", result.fault,
                    )  # fmt: skip
            else:
                item.prep = result
                if result.template_fault is not None:
                    self.alarms.raise_alarm(
                        TEMPLATE_ALARM, result.template_fault,
                        "report it with the profile's configuration; issuance goes on with cryptography's builder"
                        " (slower) until the daemon restarts", severity="warning",
                    )  # fmt: skip
                if result.csr_der and result.csr_der != item.request.csr:
                    # A PEM input: from here on the request carries the DER that was validated.
                    item.request = dataclasses.replace(item.request, csr=result.csr_der)

    async def _summaries(self) -> None:
        """Audit a station's suppressed refusals when its window closes, even if nothing else happens then."""
        while True:
            try:
                await asyncio.wait_for(self._stopping.wait(), self._refusals.window_s / 4)
                return
            except TimeoutError:
                pass
            await self._write_summaries()

    async def _write_summaries(self, *, final: bool = False) -> None:
        now = self.clock()
        if self.audit is None or not (final or self._refusals.pending(now)):
            return
        try:
            await self.journal.atransaction(
                lambda conn: self._note_summaries(conn, now, final=final), "auditing refusal summaries"
            )
        except BirthlineError as exc:
            self._faults.failed(exc)

    def _result(self, der: bytes, serial: str, device: str, row_id: int | None, reused: bool) -> IssueResult:
        return IssueResult(der, self.chain, serial, device, row_id or 0, reused)

    def _answer(self, item: Item) -> None:
        if item.future.done():
            pass
        elif item.error is not None:
            self.stats["pending" if isinstance(item.error, IssuancePending) else "refused"] += 1
            item.future.set_exception(item.error)
        elif item.ra_done is not None:
            self.stats["reused"] += 1
            item.future.set_result(item.ra_done)
        elif item.reuse is not None:
            r = item.reuse
            assert r.cert_der is not None
            self.stats["reused"] += 1
            item.future.set_result(self._result(r.cert_der, r.cert_serial, r.device_serial, r.id, True))
        elif item.leader is not None:
            self._follow(item)

    def _follow(self, item: Item) -> None:
        leader = item.leader
        assert leader is not None
        if item.future.done() or not leader.future.done():
            return
        if leader.future.exception() is not None:
            item.future.set_exception(leader.future.exception())  # type: ignore[arg-type]
        else:
            res = leader.future.result()
            self.stats["reused"] += 1
            item.future.set_result(
                IssueResult(
                    res.certificate, res.chain, res.cert_serial, res.device_serial, res.issuance_id, True
                )
            )
