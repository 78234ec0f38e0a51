"""Worker processes on socket pairs, driven from the event loop: the process pool under `workers.PreparePool`.

Why not concurrent.futures.ProcessPoolExecutor, which this replaced (issue 15):
- its hand-offs: a call went from the event loop to the pool's management thread and its queue feeder thread, and
  its result back through the management thread, each needing the GIL that the event loop and the journal thread
  hold; at 200 LAN
  stations 11 of a prepare's 16 ms round trip were those hand-offs, 5 the work
  (bench/profiles/lan-threads-2026-12-06.txt). Here a call is one write from the event loop to a worker's
  socket, and its answer one read callback on the event loop;
- memory: its "spawn" start re-imports the daemon's main module in each worker, and it starts multiprocessing's
  resource tracker, a process of its own (13 MB resident). A worker here imports what its initializer and its
  calls need, nothing else.

Kept from ProcessPoolExecutor, because PreparePool's recovery rests on it: the death of any one worker breaks
the whole pool (BrokenProcessPool for every call in flight and for every later `submit`), and the other workers
are killed with it; an exception raised by a call is that call's result (`WorkerCallError`, with the worker's
traceback), not a broken pool.

Wire, between the daemon and its own child processes only (never reachable by a peer): each worker gets one
end of a socketpair as an inherited descriptor. The daemon's frames are a 4-byte big-endian length and a
pickle: first sys.path (so that the worker imports what the daemon imports), then (initializer, initargs), then
one (call id, function, args) per call, functions by reference as pickle names them. The worker's frames are a
header (4-byte payload length, 8-byte call id, 1-byte ok) and a pickle of the value: call id 0 (READY, the
worker's pid) once its initializer returned, then one per call in the order the calls came. A worker exits at
end of file on its socket: when the daemon shuts the pool down, and when the daemon dies (the kernel closes its
end); it marks its end of the socket not inheritable at once. The daemon sees a worker's death by the end of file
on its socket or by the process's pidfd (whichever comes first: a process the worker forked would hold the
socket open), and a call is bound to one worker when it is submitted (the least busy; PreparePool splits each
batch into one chunk per worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Final

from appliance.issuance.procworker import IN_HEADER, OUT_HEADER, READY_ID

# Run by `python -c` in each worker: only the standard library until the daemon's sys.path is in place.
BOOT: Final = (
    "import os,sys,socket,pickle,struct;"
    "os.set_inheritable(int(sys.argv[1]),False);"
    "s=socket.socket(fileno=int(sys.argv[1]));f=s.makefile('rb');"
    "n,=struct.unpack('>I',f.read(4));sys.path[:]=pickle.loads(f.read(n));"
    "from appliance.issuance.procworker import serve;serve(s,f)"
)
STOP_GRACE_S: Final = 5.0
LOST_WAIT_S: Final = 0.1


class WorkerCallError(Exception):
    """A call raised in its worker; the worker's traceback is the message."""


def _frame(value: Any) -> bytes:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return IN_HEADER.pack(len(payload)) + payload


class _Worker(asyncio.Protocol):
    """One worker process: its socket's reader, and the calls waiting for its answers (answered in order)."""

    def __init__(self, pool: ProcessPool, proc: subprocess.Popen[bytes], sock: socket.socket) -> None:
        self.pool = pool
        self.proc = proc
        self.sock = sock  # ours, until the transport owns it
        self.transport: asyncio.Transport | None = None
        self.loop = asyncio.get_running_loop()  # the pool's loop: close() may run where no loop is running
        self.ready: asyncio.Future[int] = self.loop.create_future()
        self.pending: dict[int, asyncio.Future[Any]] = {}
        self.pidfd: int | None = None
        self.stopped = False
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self.stopped:  # it ended before its transport was ready
            transport.abort()

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        at = 0
        while len(buf) - at >= OUT_HEADER.size:
            size, call_id, ok = OUT_HEADER.unpack_from(buf, at)
            end = at + OUT_HEADER.size + size
            if len(buf) < end:
                break
            payload = bytes(buf[at + OUT_HEADER.size : end])
            at = end
            self._answer(call_id, bool(ok), payload)
        del buf[:at]

    def _answer(self, call_id: int, ok: bool, payload: bytes) -> None:
        future = self.ready if call_id == READY_ID else self.pending.pop(call_id, None)
        if future is None or future.done():
            return  # its caller was cancelled
        try:
            value = pickle.loads(payload)  # noqa: S301 - our own child process, over a socketpair
        except Exception as exc:  # noqa: BLE001 - one call's answer, not the pool's problem
            future.set_exception(WorkerCallError(f"the worker's answer does not unpickle: {exc!r}"))
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(WorkerCallError(str(value)))

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool._lost(self)

    def fail(self, exc: Exception | None) -> None:
        """Every call still waiting gets `exc`; None: cancelled (the pool is shut down)."""
        waiting = [self.ready, *self.pending.values()]
        self.pending.clear()
        for future in waiting:
            if future.done():
                continue
            if exc is None:
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: a call whose caller went away must not log "never retrieved"

    def close(self) -> None:
        """Shut the socket now (the worker reads end of file at once, even if the loop never runs again) and stop
        watching the process."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        if self.transport is not None:
            self.transport.abort()  # else connection_made, still to come, aborts it
        if self.pidfd is not None:
            self.loop.remove_reader(self.pidfd)
            os.close(self.pidfd)
            self.pidfd = None


class ProcessPool:
    """`workers` child processes, each running `initializer(*initargs)` once, then the calls `submit` sends.
    Event-loop only: every method runs on the loop that ran `start`."""

    def __init__(self, workers: int, initializer: Callable[..., None], initargs: Sequence[Any]) -> None:
        if workers < 1:
            raise ValueError("a ProcessPool needs at least one worker")
        self.workers = workers
        self.initializer = initializer
        self.initargs = tuple(initargs)
        self._procs: list[_Worker] = []
        self._ids = itertools.count(READY_ID + 1)
        self._broken: str | None = None
        self._closed = False

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._procs]

    @property
    def broken(self) -> bool:
        return self._broken is not None

    @property
    def saturated(self) -> bool:
        """Every worker has a call it has not answered yet: a new call would wait behind one."""
        return bool(self._procs) and all(w.pending for w in self._procs)

    async def start(self, timeout: float) -> None:
        """Start every worker and wait until each ran its initializer. Raises BrokenProcessPool if one dies
        first, OSError if one cannot be spawned. Past `timeout` it returns anyway: a call sent to a worker still
        starting waits in its socket until the worker reads it."""
        loop = asyncio.get_running_loop()
        for _ in range(self.workers):
            if self._broken is not None or self._closed:
                # A worker already started died (or the pool was shut down) while this loop waited: spawning the
                # rest into a dead pool would leave them running with nobody to stop them.
                raise BrokenProcessPool(self._broken or "the process pool was shut down while starting")
            ours, theirs = socket.socketpair()
            try:
                argv = [
                    sys.executable,
                    *subprocess._args_from_interpreter_flags(),  # type: ignore[attr-defined]
                    "-c", BOOT, str(theirs.fileno()),
                ]  # fmt: skip
                proc = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL)
            except BaseException:
                ours.close()
                raise
            finally:
                theirs.close()
            worker = _Worker(self, proc, ours)
            self._procs.append(worker)
            # The process's own end, not only its socket's: a descendant that inherited the socket would keep it
            # open after the worker died, and no call to it would ever be answered.
            with contextlib.suppress(OSError):  # a kernel without pidfds (before 5.3): the socket's end only
                worker.pidfd = os.pidfd_open(proc.pid)
                loop.add_reader(worker.pidfd, self._lost, worker)
            await loop.connect_accepted_socket(lambda w=worker: w, ours)  # type: ignore[misc]
            if worker.stopped:  # it died while its socket was being connected: _lost has run
                continue
            assert worker.transport is not None
            worker.transport.write(_frame(sys.path) + _frame((self.initializer, self.initargs)))
        ready = asyncio.gather(*(w.ready for w in self._procs))
        ready.add_done_callback(lambda f: f.cancelled() or f.exception())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        if self._broken is not None:
            raise BrokenProcessPool(self._broken)

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """`fn(*args)` in the least busy worker; its value, WorkerCallError if it raised, BrokenProcessPool if a
        worker of the pool died before it was answered. Raises BrokenProcessPool at once on a broken pool."""
        if self._broken is not None:
            raise BrokenProcessPool(self._broken)
        if self._closed or not self._procs:
            raise RuntimeError("the process pool is shut down")
        worker = min(self._procs, key=lambda w: len(w.pending))
        call_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        try:
            data = _frame((call_id, fn, args))
        except Exception as exc:  # noqa: BLE001 - the call's own failure, as a process pool reports it
            future.set_exception(WorkerCallError(f"the call does not pickle: {exc!r}"))
            return future
        assert worker.transport is not None
        worker.pending[call_id] = future
        worker.transport.write(data)
        return future

    def _lost(self, worker: _Worker) -> None:
        """A worker's socket reached end of file or its process ended (whichever is seen first)."""
        if worker.stopped:
            return
        if self._closed:
            worker.fail(None)
            self._stop([worker], wait=False)
            return
        if self._broken is None:
            # The kernel closes a dying process's sockets just before it can be reaped: a brief wait gets the
            # exit code (or signal) an operator needs in the log.
            try:
                code: int | None = worker.proc.wait(LOST_WAIT_S)
            except subprocess.TimeoutExpired:
                code = None
            how = (
                "its socket closed" if code is None
                else f"killed by signal {-code}" if code < 0
                else f"exit code {code}"
            )  # fmt: skip
            self._broken = f"a worker process (pid {worker.proc.pid}) ended: {how}"
        error = BrokenProcessPool(self._broken)
        for w in self._procs:
            w.fail(error)
        self._closed = True
        self._stop(self._procs, wait=False)

    def shutdown(self, wait: bool = True) -> None:
        """Stop every worker still running: end of file on its socket, then (wait) until it exits, at most
        STOP_GRACE_S for all of them together, before it is killed; without wait, killed at once. Calls still
        waiting are cancelled. Safe to call again, and after the pool broke."""
        self._closed = True
        for w in self._procs:
            w.fail(None)
        self._stop(self._procs, wait)

    def _stop(self, workers: Sequence[_Worker], wait: bool) -> None:
        todo = [w for w in workers if not w.stopped]
        for w in todo:
            w.stopped = True
            w.close()
        procs = [w.proc for w in todo]
        if wait:
            deadline = time.monotonic() + STOP_GRACE_S
            for proc in procs:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _kill(proc)
                    proc.wait()
            return
        for proc in procs:
            if proc.poll() is None:
                _kill(proc)
        if procs:
            # Reaped off the loop: a killed process is gone within milliseconds, but wait() is still a syscall
            # that blocks until it is.
            threading.Thread(target=_reap, args=(procs,), name="procpool-reap", daemon=True).start()


def _kill(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)


def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        with contextlib.suppress(Exception):
            proc.wait()
