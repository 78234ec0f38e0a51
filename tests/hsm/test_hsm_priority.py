"""The PKCS#11 thread serves signing work before validation work, and its time-outs mean "the HSM hangs".

No timing assertions: the thread is held with events, work is queued behind it, and the order it was served
in is read back. Time-outs are driven by a hand-moved clock: the waits are real, the durations are the clock's.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from hsm.errors import HsmBusyError, HsmTimeoutError
from hsm.keys import HsmEcPrivateKey
from hsm.worker import SIGNING, Lane, Pkcs11Thread, Priority

VALIDATION = Lane(Priority.VALIDATION)
GUARD_S = 60  # deadlock guard only


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def wait_until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached (deadlock guard)"
        time.sleep(0.005)


class Gate:
    """A call that holds the PKCS#11 thread until released."""

    def __init__(self, worker: Pkcs11Thread, *, wait_started: bool = True) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        self.future: Future[bool] = worker.submit(self._hold)
        if wait_started:
            assert self.started.wait(GUARD_S)

    def _hold(self) -> bool:
        self.started.set()
        return self.release.wait(GUARD_S)


@pytest.fixture
def pool() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(max_workers=16) as p:
        yield p


def test_signing_work_is_served_before_queued_validation_work(pool: ThreadPoolExecutor) -> None:
    worker = Pkcs11Thread(timeout_s=GUARD_S, name="pkcs11-prio")
    try:
        order: list[str] = []
        gate = Gate(worker)
        low = [pool.submit(worker.call_in, VALIDATION, order.append, f"ocsp{i}") for i in range(5)]
        wait_until(lambda: worker.pending() == 5)
        high = [pool.submit(worker.call_in, SIGNING, order.append, f"cert{i}") for i in range(2)]
        wait_until(lambda: worker.pending() == 7)
        gate.release.set()
        for f in [*low, *high]:
            f.result(GUARD_S)
        # FIFO within a priority, signing first
        assert order == ["cert0", "cert1", "ocsp0", "ocsp1", "ocsp2", "ocsp3", "ocsp4"]
        assert worker.served == {Priority.SIGNING: 3, Priority.VALIDATION: 5}
    finally:
        worker.close()


async def test_an_hsm_signature_overtakes_queued_validation_signatures(
    ec_key: HsmEcPrivateKey, pool: ThreadPoolExecutor
) -> None:
    """The real key and token: OCSP-style signatures (sync, from worker threads, as cryptography's builders call
    them) queue in the validation lane; a certificate batch (asign_many) arrives later and is served first."""
    thread = ec_key._core.thread
    before = dict(thread.served)
    ocsp_key = ec_key.in_lane(VALIDATION)
    assert ocsp_key.label == ec_key.label and ocsp_key.lane == VALIDATION and ec_key.lane == SIGNING
    seen_by_cert_batch: list[int] = []
    gate = Gate(thread)
    try:
        low = [pool.submit(ocsp_key.sign, b"ocsp %d" % i, ec.ECDSA(hashes.SHA256())) for i in range(8)]
        wait_until(lambda: thread.pending() == 8)
        batch = asyncio.ensure_future(ec_key.asign_many([b"tbs 1", b"tbs 2"]))
        await asyncio.to_thread(wait_until, lambda: thread.pending() == 9)
        # Queued right behind the batch in the signing lane: runs after it and before any validation work.
        probe = thread.submit(lambda: seen_by_cert_batch.append(thread.served[Priority.VALIDATION]))
        await asyncio.to_thread(wait_until, lambda: thread.pending() == 10)
    finally:
        gate.release.set()
    sigs = await batch
    probe.result(GUARD_S)
    for f in low:
        f.result(GUARD_S)
    assert len(sigs) == 2
    assert seen_by_cert_batch == [before[Priority.VALIDATION]]  # no validation signature before the batch
    assert thread.served[Priority.VALIDATION] == before[Priority.VALIDATION] + 8


def test_waiting_behind_work_that_completes_is_not_a_timeout(pool: ThreadPoolExecutor) -> None:
    clock = Clock()
    worker = Pkcs11Thread(timeout_s=1.0, name="pkcs11-prio", clock=clock)
    try:
        first = Gate(worker)
        low = pool.submit(worker.call_in, VALIDATION, lambda: "answered")
        later = [Gate(worker, wait_started=False) for _ in range(2)]
        wait_until(lambda: worker.pending() == 3)
        # Three signing calls in a row, each 0.9 s by the clock: 2.7 s of waiting for the validation call,
        # never one call past the 1 s time-out.
        for running, nxt in zip([first, *later], [*later, None], strict=True):
            clock.now += 0.9
            running.release.set()
            if nxt is not None:
                assert nxt.started.wait(GUARD_S)
        assert low.result(GUARD_S) == "answered"
        assert all(g.future.result(GUARD_S) for g in [first, *later])
    finally:
        worker.close()


def test_a_stuck_call_times_out_everyone_waiting_and_unstarted_work_is_withdrawn(
    pool: ThreadPoolExecutor,
) -> None:
    clock = Clock()
    worker = Pkcs11Thread(timeout_s=0.2, name="pkcs11-prio", clock=clock)
    ran: list[str] = []
    try:
        gate = Gate(worker)
        own = pool.submit(worker.call_in, SIGNING, ran.append, "queued signing")
        low = pool.submit(worker.call_in, VALIDATION, ran.append, "queued validation")
        wait_until(lambda: worker.pending() == 2)
        clock.now = 0.25  # the held call has now run past the time-out: the HSM hangs
        for f in (own, low):
            with pytest.raises(HsmTimeoutError) as info:
                f.result(GUARD_S)
            assert info.value.retryable
        gate.release.set()
        gate.future.result(GUARD_S)
        assert worker.call(lambda: "after") == "after"
        assert ran == []  # withdrawn calls never run late
    finally:
        worker.close()


def test_own_call_running_too_long_times_out(pool: ThreadPoolExecutor) -> None:
    clock = Clock()
    worker = Pkcs11Thread(timeout_s=0.2, name="pkcs11-prio", clock=clock)
    started, release = threading.Event(), threading.Event()
    try:

        def slow() -> str:
            started.set()
            release.wait(GUARD_S)
            return "late"

        call = pool.submit(worker.call, slow)
        started.wait(GUARD_S)
        clock.now = 0.3
        with pytest.raises(HsmTimeoutError):
            call.result(GUARD_S)
    finally:
        release.set()
        worker.close()


def test_validation_work_waiting_past_its_lane_limit_is_busy_not_a_timeout(pool: ThreadPoolExecutor) -> None:
    clock = Clock()
    worker = Pkcs11Thread(timeout_s=10.0, name="pkcs11-prio", clock=clock)
    ran: list[str] = []
    try:
        gate = Gate(worker)
        patient = pool.submit(
            worker.call_in, Lane(Priority.VALIDATION, max_wait_s=5.0), ran.append, "patient"
        )
        hasty = pool.submit(worker.call_in, Lane(Priority.VALIDATION, max_wait_s=0.5), ran.append, "hasty")
        wait_until(lambda: worker.pending() == 2)
        clock.now = 0.6  # signing work still holds the thread, well within the call time-out
        with pytest.raises(HsmBusyError) as info:
            hasty.result(GUARD_S)
        assert info.value.retryable and not isinstance(info.value, HsmTimeoutError)
        gate.release.set()
        patient.result(GUARD_S)
        assert ran == ["patient"]
    finally:
        worker.close()


async def test_async_callers_get_the_same_rules() -> None:
    clock = Clock()
    worker = Pkcs11Thread(timeout_s=10.0, name="pkcs11-prio", clock=clock)
    try:
        gate = await asyncio.to_thread(Gate, worker)
        hasty = asyncio.ensure_future(worker.acall_in(Lane(Priority.VALIDATION, max_wait_s=0.5), lambda: 1))
        high = asyncio.ensure_future(worker.acall(lambda: 2))
        await asyncio.to_thread(wait_until, lambda: worker.pending() == 2)
        clock.now = 0.6
        with pytest.raises(HsmBusyError):
            await hasty
        gate.release.set()
        assert await high == 2
        # a cancelled caller's unstarted call is withdrawn
        gate = await asyncio.to_thread(Gate, worker)
        ran: list[int] = []
        doomed = asyncio.ensure_future(worker.acall(ran.append, 1))
        await asyncio.to_thread(wait_until, lambda: worker.pending() == 1)
        doomed.cancel()
        with pytest.raises(asyncio.CancelledError):
            await doomed
        gate.release.set()
        assert await worker.acall(lambda: 3) == 3 and ran == []
    finally:
        worker.close()
