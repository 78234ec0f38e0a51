"""Periodic audit checkpoints: a long-lived component that signs the head every N entries or T seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from types import TracebackType

from cryptography.hazmat.primitives.asymmetric import ec

from appliance.audit.log import AuditLog, Checkpoint
from appliance.errors import BirthlineError
from hsm.errors import HsmError

log = logging.getLogger(__name__)


class Checkpointer:
    """Sign the audit head once `every_entries` entries are unsigned, or `every_seconds` after the last
    checkpoint if any entry is unsigned (checked every `poll_seconds`, or at once after nudge()).

    Use as an async context manager; it runs one named task ("audit-checkpointer") in its own TaskGroup. On a
    clean exit it signs the head one last time (final=True), so a stopped appliance leaves no unsigned tail.
    A failed checkpoint (HSM away, journal error) is logged and retried on the next tick; it never takes the
    appliance down, and `last_error` shows it. Writing entries, not signing them, is what gates issuance.
    """

    TASK_NAME = "audit-checkpointer"

    def __init__(
        self,
        audit: AuditLog,
        key: ec.EllipticCurvePrivateKey,
        *,
        every_entries: int = 1000,
        every_seconds: float = 300.0,
        poll_seconds: float = 1.0,
        final: bool = True,
    ) -> None:
        if every_entries < 1 or every_seconds <= 0 or poll_seconds <= 0:
            raise ValueError("every_entries, every_seconds and poll_seconds must be positive")
        self.audit = audit
        self.key = key
        self.every_entries = every_entries
        self.every_seconds = every_seconds
        self.poll_seconds = poll_seconds
        self.final = final
        self.last: Checkpoint | None = None
        self.made = 0
        self.failures = 0
        self.last_error: BaseException | None = None
        self._signed_seq = 0
        self._signed_at = time.monotonic()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._tg: asyncio.TaskGroup | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Checkpointer:
        self.last = await self.audit.alast_checkpoint()
        self._signed_seq = 0 if self.last is None else self.last.seq
        self._signed_at = time.monotonic()
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
        assert tg is not None, "Checkpointer exited without entering"
        await tg.__aexit__(exc_type, exc, tb)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def nudge(self) -> None:
        """Check now rather than at the next poll (e.g. after an issuance batch committed)."""
        self._wake.set()

    async def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
            self._wake.clear()
            if self._stop.is_set():
                break
            await self._tick(force=False)
        if self.final:
            await self._tick(force=True)

    async def _tick(self, *, force: bool) -> None:
        try:
            seq, _ = await self.audit.ahead()
            fresh = seq - self._signed_seq
            due = fresh >= self.every_entries or (
                fresh > 0 and time.monotonic() - self._signed_at >= self.every_seconds
            )
            if fresh > 0 and (due or force):
                cp = await self.audit.acheckpoint(self.key)
                self.last, self.made, self.last_error = cp, self.made + 1, None
                self._signed_seq, self._signed_at = cp.seq, time.monotonic()
        except (BirthlineError, HsmError) as exc:
            self.failures += 1
            self.last_error = exc
            log.error("audit checkpoint failed (will retry): %s", exc)
