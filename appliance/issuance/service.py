"""The issuance pipeline, as a long-lived async service with group commit.

authorise -> validate the CSR -> build from the profile -> journal intent -> sign in the HSM -> verify ->
journal issued -> answer. Requests that arrive together share the two transactions (group commit) but each
still follows that order: no signature is made before its intent is durable, and no certificate is released
before it is stored.

RA mode (a product whose issuance_mode is 'upstream'): authorise -> validate the CSR -> journal the request and
its outbox row in ONE transaction -> answer "pending" (IssuancePending). Nothing is signed here; the forwarder
stores the upstream CA's certificate in `ra_request`, and the same request asked again is then answered with it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.alarms import Alarms, LogOnce
from appliance.ca import CaRecord
from appliance.crashpoints import crash_point, die
from appliance.der import tbs_subject
from appliance.errors import BirthlineError, IssuanceFailed, IssuancePending, IssuanceRefused, ReasonCode
from appliance.issuance.activity import Activity
from appliance.issuance.checks import check_conflicts
from appliance.issuance.confirmations import record_confirmations
from appliance.issuance.conflicts import Present
from appliance.issuance.faults import IssuanceAlarms
from appliance.issuance.items import IssueResult, Item
from appliance.issuance.journal import Journal, burn_interrupted, journal_error
from appliance.issuance.observe import Confirmation, IssuanceObserver, Outcome
from appliance.issuance.pauses import StationPauses
from appliance.issuance.policy import LOCAL, AllowAll, AuditSink, AuthorisationPolicy, IssueRequest
from appliance.issuance.prepare import Job, PrepareContext, Preparer, Refusal
from appliance.issuance.refusals import RefusalLimiter
from appliance.issuance.requestids import new_request_id
from appliance.issuance.template import ALARM as TEMPLATE_ALARM
from appliance.issuance.workers import PreparePool
from appliance.profiles import Profile
from hsm.errors import HsmError, SignatureVerificationError
from hsm.keys import HsmPrivateKey

log = logging.getLogger(__name__)

# The retry-after of a request refused because the issuance queue is full: the same second a station is told for a
# request id still being worked on (stations.server.DUPLICATE_RETRY_MS); the queue has moved on by then.
SHED_RETRY_AFTER_S = 1.0

# A batch of at most this many signatures is verified and assembled on a thread of this process rather than in
# a prepare worker: the round trip to a worker (~0.8 ms through the process pool's threads and pipes) costs ten
# times the verify (~70 us each), and at a line's usual pace batches are of one or two devices. Nothing a device
# sent is parsed here: the TBS is ours and the signature our HSM's.
FINISH_HERE_MAX = 4

# When every prepare worker is busy as a batch comes to be finished (issuance at full speed: the workers, which
# check two signatures a certificate, are the first limit), this share of the batch is checked and assembled on a
# thread here at the same time as the rest in the workers. cryptography releases the GIL while it verifies, so
# the thread uses the core the event loop leaves idle. As if this process were two thirds of one more worker:
# 2 / (3 W + 2), 0.4 of each batch with one worker. Measured on the 2-core reference machine: issuance 26.4% of
# the raw sign rate (median of seven runs) against 25.4% without (docs/performance.md). A worker with nothing
# queued gets the whole batch: the LAN front end, whose own event loop is its limit at ~1,200 certificates/s,
# keeps one worker about a quarter busy, so it rarely adds this work to that loop.
FINISH_HERE_WORKER_SHARE = 2 / 3

# Named crash points for the crash-safety tests: the process SIGKILLs itself there. Not a secret, and unset in
# production; read once at start so the hot path pays nothing.
CRASH_POINTS = ("after-intent", "after-sign", "after-store")
CRASH_ENV = "BIRTHLINE_CRASH_POINT"


_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


# A delivery confirmation: ("local", cert_serial) or ("ra", ra_request id), the hash, and who waits for it.
_Confirm = tuple[str, str, bytes | None, "asyncio.Future[None]"]


def _share_here(batch: int, workers: int) -> int:
    """How many of a batch this process finishes itself while `workers` busy workers finish the rest."""
    share = FINISH_HERE_WORKER_SHARE / (workers + FINISH_HERE_WORKER_SHARE)
    return min(batch - 1, int(batch * share))


class IssueService:
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
        self.clock_skew_s = clock_skew_s
        self.clock = clock
        self.steady_clock = steady_clock
        """A clock nobody sets (the daemon: CLOCK_BOOTTIME), against which steps of `clock` are seen: a wall clock
        stepped by more than clock_skew_s since the last batch refuses issuance (CLOCK_NOT_TRUSTED) until it is
        set back. None: no such check (tests that drive `clock` by hand)."""
        self._clock_anchor: tuple[float, float] | None = (
            None  # (wall, steady) at the last batch that was on time
        )
        self.prepare_workers = prepare_workers
        self.pipeline_depth = max(1, pipeline_depth)
        self._profiles = dict(profiles)
        self._ctx = PrepareContext(self._profiles, ca.cert_der or b"", ca.key_algorithm, max_csr_bytes)
        self._preparer = Preparer(self._ctx)
        self._pool: PreparePool | None = None
        # A bug of ours in preparation refuses one request (INTERNAL); logged once per place, not per request.
        self._prepare_faults = LogOnce(interval_s=300.0)
        self._queue: asyncio.Queue[Item | None] = asyncio.Queue()
        self._confirms: asyncio.Queue[_Confirm | None] = asyncio.Queue()
        self._tg: asyncio.TaskGroup | None = None
        self._inflight: dict[tuple[str, bytes], Item] = {}
        self._unsettled: list[int] = []  # intents whose signature was made but could not be stored or burned
        self._last_issue_time: float | None = None
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

    async def confirm(self, cert_serial: str, cert_sha256: bytes | None = None) -> None:
        """The station stored the certificate: from now on it counts as delivered.

        Confirmations that arrive together share one transaction, as issuances do: one fsync per station
        confirmation would cap a busy line at the disk's commit rate."""
        await self._confirm(("local", cert_serial, cert_sha256))

    async def confirm_upstream(self, ra_request: int, cert_sha256: bytes | None = None) -> None:
        """The same for a certificate the upstream CA issued in RA mode (IssueResult.upstream)."""
        await self._confirm(("ra", str(ra_request), cert_sha256))

    async def _confirm(self, what: tuple[str, str, bytes | None]) -> None:
        if self._tg is None:
            raise IssuanceFailed("the issuance service is not running", ReasonCode.BUSY)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._confirms.put((*what, fut))
        await fut

    async def _confirm_batcher(self) -> None:
        while (first := await self._confirms.get()) is not None:
            batch = [first]
            while len(batch) < self.batch_max and not self._confirms.empty():
                nxt = self._confirms.get_nowait()
                if nxt is None:
                    self._confirms.put_nowait(None)
                    break
                batch.append(nxt)
            errors: dict[int, BirthlineError] = {}
            done: list[Confirmation] = []
            record = functools.partial(
                record_confirmations,
                batch=batch,
                clock=self.clock,
                audit=self.audit,
                errors=errors,
                done=done,
            )
            try:
                await self.journal.atransaction(record, "confirming delivery")
            except BirthlineError as exc:
                self._faults.failed(exc)
                errors = dict.fromkeys(range(len(batch)), exc)
            else:
                crash_point("after-confirm")
                if done and self.observer is not None:
                    self.observer.confirmed(done)
            for i, (_, _, _, fut) in enumerate(batch):
                if fut.done():
                    continue
                if i in errors:
                    fut.set_exception(errors[i])
                else:
                    fut.set_result(None)

    def _note(self, conn: sqlite3.Connection, actor: str, event: str, data: Mapping[str, object]) -> None:
        """Append to the audit log inside `conn`'s transaction: the event commits or rolls back with the rows it
        describes, and if the log cannot be written the whole transaction fails (AUDIT_UNAVAILABLE)."""
        if self.audit is not None:
            self.audit.append(conn, actor, event, data)

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

    def _record_intents(
        self, conn: sqlite3.Connection, items: list[Item], refused: list[Item], now: float
    ) -> None:
        """One transaction for the whole batch; a SAVEPOINT per request so one refusal undoes only its own rows.
        Every refusal of the batch, including those found before (bad CSR, bad serial), is audited here."""
        # One audit entry per kind per batch, listing its requests: the chain still covers every issuance and
        # refusal, at the cost of one append per group commit rather than one per certificate.
        intents = self._decide(conn, items, now)
        if intents:
            self._note(conn, "appliance", "issuance.intent", {"ca": self.ca.name, "items": intents})
        refusals = [
            {"station": i.request.station, "request_id": i.request.request_id,
             "device_serial": i.request.device_serial, "code": i.error.code.name, "reason": i.error.message}
            for i in [*refused, *(i for i in items if i.error is not None)]
            if i.error is not None and not isinstance(i.error, IssuancePending)
        ]  # fmt: skip
        # Per station, the first refusal_burst refusals of a window in full, the rest counted (refusals.py).
        refusals = [r for r in refusals if self._refusals.admit(str(r["station"]), str(r["code"]), now)]
        if refusals:
            self._note(conn, "appliance", "issuance.refused", {"items": refusals})
        self._note_summaries(conn, now)

    def _note_summaries(self, conn: sqlite3.Connection, now: float, *, final: bool = False) -> None:
        summaries = self._refusals.due(now, all_windows=final)
        if summaries:
            self._note(conn, "appliance", "issuance.refused-summary", {"items": summaries})

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

    def _clock_stepped(self, now: float) -> IssuanceRefused | None:
        """The wall clock jumped (someone set it, or a bad time source) since the last batch: compared with the
        steady clock, it moved more than clock_skew_s further or less far. A certificate dated by a clock that
        jumped forward is not yet valid for its device, and once the clock is set right every later issuance would
        be refused as behind it; so refuse until the clock is set back. A step to the right time (the clock was
        wrong when the daemon started) is accepted by restarting the daemon, which anchors afresh."""
        if self.steady_clock is None:
            return None
        steady = self.steady_clock()
        if self._clock_anchor is not None:
            wall0, steady0 = self._clock_anchor
            step = (now - wall0) - (steady - steady0)
            if abs(step) > self.clock_skew_s:
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall0))
                return IssuanceRefused(
                    f"the clock was stepped {'forward' if step > 0 else 'back'} by {abs(step):.0f} s since the"
                    f" last issuance ({when}); set it back, or restart the daemon if the new time is right",
                    ReasonCode.CLOCK_NOT_TRUSTED,
                )
        # Anchored at every batch on time: the slow slewing NTP does never adds up to a step.
        self._clock_anchor = (now, steady)
        return None

    def _decide(self, conn: sqlite3.Connection, items: list[Item], now: float) -> list[dict[str, object]]:
        if self._last_issue_time is None:
            self._last_issue_time = conn.execute("SELECT MAX(created_at) FROM issuance").fetchone()[0] or 0.0
        if now + self.clock_skew_s < self._last_issue_time:
            behind = IssuanceRefused(
                f"the clock is {self._last_issue_time - now:.0f} s behind the last issuance; set the time",
                ReasonCode.CLOCK_NOT_TRUSTED,
            )
            for item in items:
                item.error = behind
            return []
        if (stepped := self._clock_stepped(now)) is not None:
            for item in items:
                item.error = stepped
            return []
        intents: list[dict[str, object]] = []
        forwarded: list[dict[str, object]] = []
        self.policy.begin(conn)
        present = Present(
            conn, self.ca.name, [i.request.device_serial for i in items],
            [i.prep.public_key_sha256 for i in items if i.prep is not None],
            [i.prep.serial_hex for i in items if i.prep is not None],
        )  # fmt: skip
        for item in items:
            assert item.prep is not None
            req, prep = item.request, item.prep
            conn.execute("SAVEPOINT item")
            try:
                check_conflicts(
                    conn, item, present, ca=self.ca.name, policy=self.policy, observed=self.observer is not None,
                    retry_s=self.upstream_retry_s,
                )  # fmt: skip
                grant = LOCAL
                if item.reuse is None and item.ra_done is None:
                    profile = self._profiles[prep.profile]
                    if item.update is not None:
                        grant = self.policy.authorise_update(conn, req, profile, item.update.id) or LOCAL
                    else:
                        grant = self.policy.authorise(conn, req, profile) or LOCAL
                    item.grant = grant
                if grant.mode == "upstream":
                    if req.local_only:
                        raise IssuanceRefused(
                            f"work order {grant.work_order} is for a product in upstream (RA) issuance mode; this"
                            " request can only be issued here (an appliance-generated key is kept nowhere to wait"
                            " for the upstream CA)",
                            ReasonCode.UNKNOWN_PROFILE,
                        )
                    forwarded.append(self._queue_upstream(conn, item, grant.work_order, now))
                    present.forwarded(req.device_serial, prep.public_key_sha256)
                elif item.reuse is None and item.ra_done is None:
                    old = item.update
                    if old is not None:
                        # The old row leaves the one-live-row-per-device index before the new one enters it; the
                        # link is made once the new row has its id (0 never outlives this savepoint).
                        conn.execute("UPDATE issuance SET updated_by = 0 WHERE id = ?", (old.id,))
                    cur = conn.execute(
                        "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256,"
                        " csr_sha256, cert_serial, tbs_sha256, state, created_at, updates)"
                        " VALUES (?,?,?,?,?,?,?,?,?,'intent',?,?)",
                        (
                            req.request_id, req.station, prep.profile, self.ca.name, req.device_serial,
                            prep.public_key_sha256, prep.csr_sha256, prep.serial_hex, prep.tbs.sha256, now,
                            None if old is None else old.id,
                        ),
                    )  # fmt: skip
                    item.row_id = cur.lastrowid
                    present.issued(req.device_serial, prep.public_key_sha256, prep.serial_hex)
                    if old is not None:
                        conn.execute("UPDATE issuance SET updated_by = ? WHERE id = ?", (item.row_id, old.id))
                    if self.audit is not None:
                        intents.append({
                            "id": item.row_id, "station": req.station, "request_id": req.request_id,
                            "device_serial": req.device_serial, "profile": prep.profile, "cert_serial": prep.serial_hex,
                            "tbs_sha256": prep.tbs.sha256.hex(), "public_key_sha256": prep.public_key_sha256.hex(),
                            **({"updates": old.cert_serial} if old is not None else {}),
                        })  # fmt: skip
                conn.execute("RELEASE item")
            except (IssuanceRefused, IssuancePending) as exc:
                conn.execute("ROLLBACK TO item")
                conn.execute("RELEASE item")
                item.error = exc
        self._last_issue_time = max(self._last_issue_time, now)
        if forwarded:
            self._note(conn, "appliance", "issuance.forwarded", {"ca": self.ca.name, "items": forwarded})
        return intents

    def _queue_upstream(
        self, conn: sqlite3.Connection, item: Item, work_order: str | None, now: float
    ) -> dict[str, object]:
        """RA mode: record the authorised request and its outbox row (same SAVEPOINT as the policy's unit);
        nothing is signed here. The request is then answered "pending"."""
        if self.upstream_retry_s is None:
            raise IssuanceRefused(
                f"work order {work_order} is for a product in upstream (RA) issuance mode, and this appliance"
                " has no upstream CA configured ([upstream] url)",
                ReasonCode.UNKNOWN_PROFILE,
            )
        assert item.prep is not None
        req, prep = item.request, item.prep
        cur = conn.execute(
            "INSERT INTO ra_request (request_id, station, profile, ca, device_serial, public_key_sha256, csr_sha256,"
            " state, created_at) VALUES (?,?,?,?,?,?,?,'pending',?)",
            (req.request_id, req.station, prep.profile, self.ca.name, req.device_serial, prep.public_key_sha256,
             prep.csr_sha256 if req.csr else None, now),
        )  # fmt: skip
        ra_id = int(cur.lastrowid or 0)
        if req.csr:
            kind, csr, key, subject = "p10cr", req.csr, None, None
        else:
            # CRMF-enrolled (CMP ir/cr): the upstream gets the key and the subject the profile built (raVerified).
            kind, csr, key, subject = "cr", None, req.public_key_der, tbs_subject(prep.tbs.tbs)
        conn.execute(
            "INSERT INTO outbox (kind, ra_request_id, cert_serial, transaction_id, csr_der, public_key_der,"
            " subject_der, next_attempt_at, created_at) VALUES (?,?,'',?,?,?,?,?,?)",
            (kind, ra_id, os.urandom(16), csr, key, subject, now, now),
        )
        item.error = IssuancePending(
            "authorised; the upstream CA issues this certificate (RA mode)", self.upstream_retry_s, ra_id
        )
        return {"ra_request": ra_id, "station": req.station, "request_id": req.request_id,
                "device_serial": req.device_serial, "profile": prep.profile, "work_order": work_order,
                "public_key_sha256": prep.public_key_sha256.hex()}  # fmt: skip

    async def _sign_and_store(self, items: list[Item]) -> bool:
        """Sign, verify and store; False if that failed (the items are then failed and their intents burned)."""
        ids = [i.row_id for i in items if i.row_id is not None]
        started = time.perf_counter()
        try:
            raws = await self.key.asign_unverified([i.prep.tbs.tbs for i in items if i.prep is not None])
            ders = await self._finish(items, raws)
        except HsmError as exc:
            if self.observer is not None:
                self.observer.signed(len(items), time.perf_counter() - started)
            # Whatever went wrong in the HSM, the next batch first proves with a probe signature that it works
            # again, rather than reserving serials (and units) only to burn them.
            self._hsm_fault = exc.message
            await self._burn(ids, f"hsm: {type(exc).__name__}")
            self._fail(items, IssuanceFailed(f"HSM: {exc.message}", _hsm_code(exc)))
            return False
        if self.observer is not None:
            self.observer.signed(len(items), time.perf_counter() - started)
        self._crash("after-sign")
        certs: list[tuple[int, bytes]] = []
        outbox: list[tuple[str, int, str, bytes, bytes | None, bytes | None, bytes | None, float, float]] = []
        issued_at = self.clock()
        for item, der in zip(items, ders, strict=True):
            assert item.prep is not None and item.row_id is not None
            certs.append((item.row_id, der))
            # The upstream record: the device's CSR (p10cr), or for a CRMF-enrolled device its key and the
            # subject we certified (cr with raVerified). Built and RA-protected later, by the forwarder.
            req = item.request
            if not self.forward_upstream:
                continue
            if req.csr and item.update is None:
                outbox.append(("p10cr", item.row_id, item.prep.serial_hex, os.urandom(16), req.csr, None, None,
                               issued_at, issued_at))  # fmt: skip
            else:
                # A key update goes upstream as kur for the upstream's certificate of the device (forwarder).
                key = req.public_key_der or x509.load_der_x509_csr(req.csr).public_key().public_bytes(*_SPKI)
                outbox.append(("kur" if item.update is not None else "cr", item.row_id, item.prep.serial_hex,
                               os.urandom(16), None, key, tbs_subject(item.prep.tbs.tbs), issued_at, issued_at))  # fmt: skip

        def store(conn: sqlite3.Connection) -> None:
            cur = conn.executemany(
                "UPDATE issuance SET state='issued', cert_der=?, issued_at=? WHERE id=? AND state='intent'",
                [(der, issued_at, row_id) for row_id, der in certs],
            )
            if cur.rowcount != len(certs):  # rolled back whole: nothing of the batch is stored
                raise IssuanceFailed(
                    f"{len(certs) - cur.rowcount} intent(s) vanished before storing", ReasonCode.INTERNAL
                )
            conn.executemany(
                "INSERT INTO outbox (kind, issuance_id, cert_serial, transaction_id, csr_der, public_key_der,"
                " subject_der, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                outbox,
            )
            if self.audit is not None:  # the list costs ~2 us a certificate: not built for nobody
                self._note(conn, "appliance", "issuance.issued", {
                    "items": [{"id": row_id, "cert_sha256": hashlib.sha256(der).hexdigest()} for row_id, der in certs]
                })  # fmt: skip

        try:
            await self.journal.atransaction(store, "storing certificates")
        except BirthlineError as exc:
            # The certificates were signed but not stored: they must never be released. Burn the intents.
            await self._burn(ids, "store failed")
            self._fail(items, exc)
            return False
        self._crash("after-store")
        for item, (_, der) in zip(items, certs, strict=True):
            assert item.prep is not None
            self.stats["issued"] += 1
            item.future.set_result(
                self._result(der, item.prep.serial_hex, item.request.device_serial, item.row_id, False)
            )
        return True

    async def _finish(self, items: list[Item], raws: list[bytes]) -> list[bytes]:
        """The certificates: every raw signature encoded and verified with the CA key over exactly its TBS bytes,
        then assembled (Preparer.finish), in the prepare workers when there are some and the batch is larger
        than FINISH_HERE_MAX (the verify is the largest CPU cost left in this process), else on a thread (off the
        event loop); with every worker busy, a share of the batch on that thread at the same time
        (FINISH_HERE_WORKER_SHARE). SignatureVerificationError if any does not verify: then none of the batch is
        stored or released."""
        signed = [(i.prep.tbs, raw) for i, raw in zip(items, raws, strict=True) if i.prep is not None]
        pool = self._pool if len(signed) > FINISH_HERE_MAX else None
        ders: list[bytes | None] | None = None
        if pool is not None:
            here = _share_here(len(signed), pool.workers) if pool.saturated else 0
            if here:
                cut = len(signed) - here
                there, ours = await asyncio.gather(
                    pool.finish(signed[:cut]), asyncio.to_thread(self._preparer.finish, signed[cut:])
                )
                if there is None:  # the workers could not: their part here too, not the whole batch again
                    there = await asyncio.to_thread(self._preparer.finish, signed[:cut])
                ders = there + ours
            else:
                ders = await pool.finish(signed)
        if ders is None:
            ders = await asyncio.to_thread(self._preparer.finish, signed)
        checked = [d for d in ders if d is not None]
        if len(checked) != len(items):
            raise SignatureVerificationError(
                f"the HSM returned a signature with key {self.key.label!r} that does not verify; not using it"
            )
        return checked

    async def _burn(self, ids: list[int], reason: str) -> None:
        def txn(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE issuance SET state='burned', burn_reason=? WHERE id=? AND state='intent'",
                [(reason, i) for i in ids],
            )
            self._note(conn, "appliance", "issuance.burned", {"reason": reason, "ids": ids})

        try:
            await self.journal.atransaction(txn, "burning unreleased intents")
        except BirthlineError:
            # Remember them; no new issuance starts until they are settled (fail closed).
            self._unsettled.extend(ids)

    async def _settle(self) -> None:
        if self._unsettled:
            ids, self._unsettled = self._unsettled, []
            await self._burn(ids, "store failed")
            if self._unsettled:
                raise IssuanceFailed(
                    "the journal cannot record earlier failed issuances; issuance is stopped",
                    ReasonCode.JOURNAL_UNAVAILABLE,
                )

    async def _check_hsm(self) -> None:
        """The HSM health probe: after an HSM failure, one signature (verified) before the next batch starts."""
        fault = self._hsm_fault
        if fault is None:
            return
        try:
            await self.key.asign_many([b"birthline hsm health probe"])
        except HsmError as exc:
            raise IssuanceFailed(f"HSM unavailable: {exc.message}", _hsm_code(exc)) from exc
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
        if self._last_issue_time is None:
            last = await self.journal.acall(
                lambda: self.journal.conn.execute("SELECT MAX(created_at) FROM issuance").fetchone()[0]
            )
            if self._last_issue_time is None:  # a batch may have read it meanwhile
                self._last_issue_time = float(last or 0.0)
        now = self.clock()
        behind = self._last_issue_time - now
        if behind > self.clock_skew_s:
            self._faults.failed(IssuanceRefused(
                f"the clock is {behind:.0f} s behind the last issuance; set the time", ReasonCode.CLOCK_NOT_TRUSTED
            ))  # fmt: skip
        elif (stepped := self._clock_stepped(now)) is not None:
            # A step since the last batch refuses issuance as well (_decide): the alarm stays until it is set back.
            self._faults.failed(stepped)
        elif self._faults.is_open(ReasonCode.CLOCK_NOT_TRUSTED):
            self._faults.cleared(
                [ReasonCode.CLOCK_NOT_TRUSTED], "the clock is no longer behind the last issuance"
            )

    def _read_work_orders(self, ids: list[str]) -> dict[str, tuple[str, int, int]]:
        return self._faults.read_work_orders(self.journal.conn, ids)

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


def _hsm_code(exc: HsmError) -> ReasonCode:
    """A signature that does not verify is its own refusal (the HSM answered, wrongly); anything else means the
    HSM is not available."""
    return (
        ReasonCode.SIGNATURE_INVALID
        if isinstance(exc, SignatureVerificationError)
        else ReasonCode.HSM_UNAVAILABLE
    )
