"""The shape of the appliance's long-lived background components.

A PollingTask is an async context manager that runs one named task in its own TaskGroup. The task wakes every
`poll_s` seconds, or at once after nudge(), and runs one pass; on exit it is told to stop, finishes the pass it
is in, runs a last hook, and the TaskGroup is awaited, so shutdown never leaves a task behind.
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType
from typing import ClassVar, Self


class PollingTask:
    TASK_NAME: ClassVar[str]

    def __init__(self, poll_s: float) -> None:
        if poll_s <= 0:
            raise ValueError("the poll interval must be positive")
        self.poll_s = poll_s
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None

    # -- what subclasses provide ---------------------------------------------------------------------------------
    async def _started(self) -> None:
        """Before the task starts (load state, a first pass); an error here fails the `async with`."""

    async def _poll(self) -> None:
        """One pass. It must not raise for failures it can retry on the next pass."""
        raise NotImplementedError

    async def _stopping(self) -> None:
        """After the last pass, before exit completes (a final checkpoint, say)."""

    # -- lifecycle -------------------------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        await self._started()
        self._stop.clear()
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._task = self._tg.create_task(self._run(), name=self.TASK_NAME)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._wake.set()
        tg, self._tg = self._tg, None
        assert tg is not None, f"{type(self).__name__} exited without entering"
        await tg.__aexit__(exc_type, exc, tb)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def nudge(self) -> None:
        """Run a pass now rather than at the next poll."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            self._wake.clear()
            if self._stop.is_set():
                break
            await self._poll()
        await self._stopping()
