"""The one thread that may touch PKCS#11 in this process.

python-pkcs11 calls C_Initialize(NULL), so SoftHSM (and other modules) run without their own locking:
two threads inside the library at once crash it. Every PKCS#11 call is therefore funnelled here.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, ParamSpec, TypeVar

from hsm.errors import HsmError, HsmTimeoutError

P = ParamSpec("P")
T = TypeVar("T")

_Work = tuple[Future[Any], Callable[..., Any], tuple[Any, ...], dict[str, Any]]


class Pkcs11Thread:
    def __init__(self, timeout_s: float = 10.0, name: str = "pkcs11") -> None:
        self.timeout_s = timeout_s
        self._queue: queue.SimpleQueue[_Work | None] = queue.SimpleQueue()
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
            item = self._queue.get()
            if item is None:
                return
            fut, fn, args, kw = item
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kw)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller, who re-raises it
                fut.set_exception(exc)
            else:
                fut.set_result(result)

    def submit(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> Future[T]:
        if self.closed:
            raise HsmError("the PKCS#11 thread is closed")
        fut: Future[T] = Future()
        self._queue.put((fut, fn, args, kw))
        return fut

    def call(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        if self.on_thread():
            return fn(*args, **kw)
        fut = self.submit(fn, *args, **kw)
        try:
            return fut.result(timeout=self.timeout_s)
        except TimeoutError:
            fut.cancel()
            raise HsmTimeoutError(f"PKCS#11 call did not finish within {self.timeout_s:g} s") from None

    async def acall(self, fn: Callable[P, T], *args: P.args, **kw: P.kwargs) -> T:
        if self.on_thread():
            return fn(*args, **kw)
        fut = self.submit(fn, *args, **kw)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), self.timeout_s)
        except TimeoutError:
            raise HsmTimeoutError(f"PKCS#11 call did not finish within {self.timeout_s:g} s") from None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._queue.put(None)
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
