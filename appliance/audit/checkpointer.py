"""Periodic audit checkpoints: a long-lived component that signs the head every N entries or T seconds."""

from __future__ import annotations

import logging
import time

from cryptography.hazmat.primitives.asymmetric import ec

from appliance.alarms import Alarms
from appliance.audit.log import AuditLog, Checkpoint
from appliance.errors import BirthlineError
from appliance.lifecycle import PollingTask
from hsm.errors import HsmError

log = logging.getLogger(__name__)


class Checkpointer(PollingTask):
    """Sign the audit head once `every_entries` entries are unsigned, or `every_seconds` after the last
    checkpoint if any entry is unsigned (checked every `poll_seconds`, or at once after nudge()).

    Use as an async context manager; it runs one named task ("audit-checkpointer") in its own TaskGroup. On a
    clean exit it signs the head one last time (final=True), so a stopped appliance leaves no unsigned tail.
    A failed checkpoint (HSM away, journal error) raises the warning alarm `audit.checkpoint` (logged once, not
    per tick) and is retried on the next tick; the next checkpoint made clears it. It never takes the appliance
    down, and `last_error` shows it. Writing entries, not signing them, is what gates issuance.
    """

    ALARM = "audit.checkpoint"
    ADVICE = (
        "checkpoints sign the audit head with the audit key in the HSM and are stored in the journal: check the"
        " HSM (token present, key 'audit') and the journal's filesystem (free space, writable). Issuance goes"
        " on; entries written meanwhile are signed by the next checkpoint that succeeds"
    )

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
        alarms: Alarms | None = None,
    ) -> None:
        if every_entries < 1 or every_seconds <= 0 or poll_seconds <= 0:
            raise ValueError("every_entries, every_seconds and poll_seconds must be positive")
        super().__init__(poll_seconds)
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
        self.alarms = alarms or Alarms()
        self._signed_seq = 0
        self._signed_at = time.monotonic()

    async def _started(self) -> None:
        self.last = await self.audit.alast_checkpoint()
        self._signed_seq = 0 if self.last is None else self.last.seq
        self._signed_at = time.monotonic()

    async def _poll(self) -> None:
        await self._tick(force=False)

    async def _stopping(self) -> None:
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
                self.alarms.clear(self.ALARM, f"checkpoint at entry {cp.seq}")
        except (BirthlineError, HsmError) as exc:
            self.failures += 1
            self.last_error = exc
            self.alarms.raise_alarm(
                self.ALARM, f"audit checkpoint failed (retried every {self.poll_seconds:g} s): {exc}",
                self.ADVICE, severity="warning",
            )  # fmt: skip
