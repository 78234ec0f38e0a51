"""The one thread that may touch PKCS#11 in this process, and the order in which it serves its callers.

python-pkcs11 calls C_Initialize(NULL), so SoftHSM (and other modules) run without their own locking:
two threads inside the library at once crash it. Every PKCS#11 call is therefore funnelled here.

Calls wait in a priority queue, FIFO within a priority. Signing work (certificates, audit checkpoints, CRLs,
key management: everything by default) is served before validation work (OCSP answers), so a flood of OCSP
signatures never sits between an issuance batch and the HSM: the batch waits for one call at most, the one the
thread is running when it arrives. A call is never interrupted once started.

Time-outs mean that the HSM is not answering, never that the queue is long:

* `timeout_s` bounds one call's run on the thread. A caller gets HsmTimeoutError when its call has run longer,
  or, while its call still waits, when the thread has been stuck in some other call for longer (the HSM hangs;
  waiting helps nobody). Waiting behind calls that complete is not a time-out.
* A lane's `max_wait_s` bounds how long a call may wait to *start*. Past it the call is withdrawn unstarted and
  HsmBusyError is raised: the HSM is busy with more important work, which is no fault and no reason to alarm.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from hsm.errors import HsmBusyError, HsmError, HsmTimeoutError

P = ParamSpec("P")
T = TypeVar("T")


class Priority(enum.IntEnum):
    """Lower values are served first."""

    SIGNING = 0  # certificates, audit checkpoints, CRLs, logins, key generation: the default
    VALIDATION = 1  # OCSP answers: only when no signing work waits


@dataclass(frozen=True)
class Lane:
    """How a caller's work is queued: its priority, and how long it may wait to start (None: as long as it
    takes, bounded by the work ahead of it, which the priority order bounds)."""

    priority: Priority = Priority.SIGNING
    max_wait_s: float | None = None


SIGNING = Lane()


class _Job:
    __slots__ = ("args", "fn", "fut", "kw", "priority", "started_at")

    def __init__(
        self, priority: Priority, fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]
    ) -> None:
        self.priority = priority
        self.fut: Future[Any] = Future()
        self.fn = fn
        self.args = args
        self.kw = kw
        self.started_at: float | None = None  # monotonic; set by the thread when the call starts


# (priority, arrival number, job); the number keeps FIFO order within a priority and is never equal, so jobs
# are never compared. None is the close sentinel, queued behind everything.
_Entry = tuple[int, int, _Job | None]
_CLOSE_PRIORITY = max(Priority) + 1


class Pkcs11Thread:
    def __init__(
        self, timeout_s: float = 10.0, name: str = "pkcs11", clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        # Calls run to completion, by priority: what a test or a benchmark reads to see who was served.
        self.served: dict[Priority, int] = dict.fromkeys(Priority, 0)
        self._queue: queue.PriorityQueue[_Entry] = queue.PriorityQueue()
        self._arrivals = itertools.count()
        self._running: _Job | None = None
        self._closed = False
        self._pid = os.getpid()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        # A forked child inherits this object but not the thread.
        return self._closed or self._pid != os.getpid()

    def on_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def _run(self) -> None:
        while True:
            _, _, job = self._queue.get()
            if job is None:
                return
            if not job.fut.set_running_or_notify_cancel():
                continue  # withdrawn by its caller before it started
            job.started_at = self.clock()
            self._running = job
            try:
                result = job.fn(*job.args, **job.kw)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
                outcome: tuple[bool, Any] = (False, exc)
            else:
                outcome = (True, result)
            self._running = None
            self.served[job.priority] += 1
            # Counted before the caller wakes, so whoever sees the result also sees the count.
            if outcome[0]:
                job.fut.set_result(outcome[1])
            else:
                job.fut.set_exception(outcome[1])

    def _enqueue(self, lane: Lane, fn: Callable[..., Any], args: tuple[Any, ...], kw: dict[str, Any]) -> _Job:
        if self.closed:
            raise HsmError("the PKCS#11 thread is closed")
        job = _Job(lane.priority, fn, args, kw)
        self._queue.put((int(lane.priority), next(self._arrivals), job))
        return job

    def submit(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> Future[T]:
        return self._enqueue(SIGNING, fn, args, kw).fut

    def _next_check(self, job: _Job, lane: Lane, queued_at: float) -> float:
        """How long the caller may wait before it must look again; raises when waiting is over."""
        now = self.clock()
        started = job.started_at
        if started is not None:
            left = started + self.timeout_s - now
            if left <= 0:
                raise HsmTimeoutError(f"PKCS#11 call did not finish within {self.timeout_s:g} s")
            return left
        running = self._running
        running_since = running.started_at if running is not None else None
        if running_since is not None and now - running_since >= self.timeout_s and job.fut.cancel():
            raise HsmTimeoutError(
                f"the PKCS#11 thread has been inside one call for more than {self.timeout_s:g} s"
            )
        # While the thread is idle or between calls, look again within one timeout.
        left = self.timeout_s if running_since is None else max(0.0, running_since + self.timeout_s - now)
        if lane.max_wait_s is not None:
            wait_left = queued_at + lane.max_wait_s - now
            if wait_left <= 0 and job.fut.cancel():
                raise HsmBusyError(
                    f"the HSM was busy with higher-priority work for {lane.max_wait_s:g} s; not started"
                )
            left = min(left, max(0.0, wait_left))
        # A withdrawal that lost the race (the call just started) is looked at again at once.
        return max(left, 0.001)

    def call_in(self, lane: Lane, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        """Run fn on the thread, queued in `lane`, and block until it returns."""
        if self.on_thread():
            return fn(*args, **kw)
        job = self._enqueue(lane, fn, args, kw)
        queued_at = self.clock()
        while True:
            try:
                result: T = job.fut.result(timeout=self._next_check(job, lane, queued_at))
                return result
            except TimeoutError:
                continue
            except CancelledError:
                raise HsmError("the PKCS#11 call was withdrawn") from None

    async def acall_in(self, lane: Lane, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        """Run fn on the thread, queued in `lane`, without blocking the event loop."""
        if self.on_thread():
            return fn(*args, **kw)
        job = self._enqueue(lane, fn, args, kw)
        queued_at = self.clock()
        waiter = asyncio.wrap_future(job.fut)
        try:
            while True:
                done, _ = await asyncio.wait({waiter}, timeout=self._next_check(job, lane, queued_at))
                if done:
                    result: T = waiter.result()
                    return result
        except BaseException:
            # Our caller gave up (time-out, cancellation): a call that has not started never will.
            job.fut.cancel()
            raise

    def call(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        return self.call_in(SIGNING, fn, *args, **kw)

    async def acall(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        return await self.acall_in(SIGNING, fn, *args, **kw)

    def pending(self) -> int:
        """Calls queued and not yet started (withdrawn ones included until the thread skips them)."""
        return self._queue.qsize()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put((_CLOSE_PRIORITY, next(self._arrivals), None))
        if not self.on_thread() and self._pid == os.getpid():
            self._thread.join(timeout=self.timeout_s)


_shared_lock = threading.Lock()
_shared: Pkcs11Thread | None = None


def process_thread(timeout_s: float = 10.0) -> Pkcs11Thread:
    """The process-wide PKCS#11 thread (created on first use; its timeout is that of the first caller)."""
    global _shared  # noqa: PLW0603 - one thread per process is the whole point
    with _shared_lock:
        if _shared is None or _shared.closed:
            _shared = Pkcs11Thread(timeout_s)
        return _shared
