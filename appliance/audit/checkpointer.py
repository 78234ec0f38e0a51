"""Periodic audit checkpoints: a long-lived component that signs the log every N entries or T seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from cryptography.hazmat.primitives.asymmetric import ec

from appliance.alarms import Alarms, LogOnce
from appliance.audit.claims import REASON_FINAL, REASON_INTERVAL, REASON_START, CheckpointPolicy
from appliance.audit.log import AuditLog, Checkpoint
from appliance.errors import BirthlineError
from appliance.lifecycle import PollingTask
from hsm.errors import HsmError

log = logging.getLogger(__name__)

ALARM_CAUSE = "audit.checkpoint"


class Checkpointer(PollingTask):
    """Sign the log once `every_entries` entries are unsigned, or `every_seconds` after the last checkpoint if
    any entry is unsigned (checked every `poll_seconds`, at once when an append reaches the entry count, or
    after nudge()). The policy defaults to the audit log's (the configuration's) and is stated in every claim.

    Use as an async context manager; it runs one named task ("audit-checkpointer") in its own TaskGroup. On
    entry it signs at once what an earlier run or another process left unsigned, so the unsigned run never spans
    a stop; on a clean exit it signs the head one last time (final=True), so a stopped appliance leaves no
    unsigned entry. A failed checkpoint (HSM away, journal error) raises the alarm `audit.checkpoint` and is
    retried on the next tick; it never takes the appliance down, and `last_error` shows it. Writing entries,
    not signing them, is what gates issuance; a checkpointer failing for longer than the policy's bound leaves
    an unsigned run that `verify` reports as overdue, which is then the truth.
    """

    TASK_NAME = "audit-checkpointer"

    def __init__(
        self,
        audit: AuditLog,
        key: ec.EllipticCurvePrivateKey,
        *,
        every_entries: int | None = None,
        every_seconds: float | None = None,
        poll_seconds: float = 1.0,
        final: bool = True,
        alarms: Alarms | None = None,
    ) -> None:
        if poll_seconds <= 0:
            raise ValueError("poll_seconds must be positive")
        self.policy = CheckpointPolicy(
            audit.policy.every_entries if every_entries is None else every_entries,
            audit.policy.every_s if every_seconds is None else every_seconds,
        )  # raises ValueError for a non-positive interval
        super().__init__(poll_seconds)
        self.audit = audit
        self.key = key
        self.poll_seconds = poll_seconds
        self.final = final
        self.alarms = alarms
        self.last: Checkpoint | None = None
        self.made = 0
        self.failures = 0
        self.last_error: BaseException | None = None
        self._signed_seq = 0
        self._signed_at = time.monotonic()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._log_once = LogOnce(interval_s=300.0)

    @property
    def every_entries(self) -> int:
        return self.policy.every_entries

    @property
    def every_seconds(self) -> float:
        return self.policy.every_s

    async def _started(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.last = await self.audit.alast_checkpoint()
        self._signed_seq = 0 if self.last is None else self.last.seq
        self._signed_at = time.monotonic()
        await self._tick(force=True, reason=REASON_START)
        self._arm()

    async def _poll(self) -> None:
        await self._tick(force=False, reason=REASON_INTERVAL)
        self._arm()

    async def _stopping(self) -> None:
        self.audit.watch(None)
        if self.final:
            await self._tick(force=True, reason=REASON_FINAL)

    def _arm(self) -> None:
        """Be nudged by the append that makes `every_entries` entries unsigned."""
        self.audit.watch(self._signed_seq + self.policy.every_entries, self._nudge_from_journal)

    def _nudge_from_journal(self) -> None:
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: the final tick already ran
                loop.call_soon_threadsafe(self.nudge)

    async def _tick(self, *, force: bool, reason: str) -> None:
        try:
            seq, _ = await self.audit.ahead()
            fresh = seq - self._signed_seq
            due = fresh >= self.policy.every_entries or (
                fresh > 0 and time.monotonic() - self._signed_at >= self.policy.every_s
            )
            if fresh > 0 and (due or force):
                cp = await self.audit.acheckpoint(self.key, reason=reason, policy=self.policy)
                self.last, self.made, self.last_error = cp, self.made + 1, None
                self._signed_seq, self._signed_at = cp.seq, time.monotonic()
                if self.alarms is not None:
                    self.alarms.clear(ALARM_CAUSE, f"signed through entry {cp.seq}")
        except (BirthlineError, HsmError) as exc:
            self.failures += 1
            self.last_error = exc
            message = f"audit checkpoint failed (retried every {self.poll_seconds:g} s): {exc}"
            if self.alarms is not None:
                self.alarms.raise_alarm(
                    ALARM_CAUSE,
                    message,
                    "check the HSM and the audit key; new audit entries stay unsigned until a checkpoint"
                    " succeeds, and past the log's stated bound `birthline audit verify` reports them overdue",
                    severity="warning",
                    code=int(exc.code) if isinstance(exc, BirthlineError) else None,
                )
            else:
                self._log_once.log(log, logging.ERROR, ALARM_CAUSE, "%s", message)
