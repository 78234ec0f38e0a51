"""The `disk.low` alarm: the state directory's filesystem is running out of space.

The journal fails closed when the disk is full (JOURNAL_UNAVAILABLE: issuance stops); this warns before that,
while a person can still free space. Checked every `check_s` seconds with statvfs (space available to the
daemon's user); raised below `low_mb`, cleared above it plus a tenth (so a disk hovering at the threshold does
not make the alarm flap).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from pathlib import Path

from appliance.alarms import Alarms

log = logging.getLogger(__name__)

CAUSE = "disk.low"


def free_mb(path: Path) -> float:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize / (1024 * 1024)


class DiskWatch:
    def __init__(self, path: Path, alarms: Alarms, low_mb: int, check_s: float) -> None:
        self.path = path
        self.alarms = alarms
        self.low_mb = low_mb
        self.check_s = check_s
        self._task: asyncio.Task[None] | None = None

    def check(self) -> float | None:
        try:
            free = free_mb(self.path)
        except OSError as exc:
            log.warning("cannot read the free space of %s: %s", self.path, exc)
            return None
        if free < self.low_mb:
            self.alarms.raise_alarm(
                CAUSE,
                f"{free:.0f} MB free on the filesystem of {self.path} (alarm below {self.low_mb} MB)",
                "free space there (old logs, exports) or grow the filesystem: when it is full the journal"
                " refuses writes and issuance stops (JOURNAL_UNAVAILABLE)",
                severity="warning",
                details={"free_mb": round(free), "low_mb": self.low_mb},
            )
        elif free > self.low_mb * 1.1:
            self.alarms.clear(CAUSE, f"{free:.0f} MB free")
        return free

    async def __aenter__(self) -> DiskWatch:
        if self.low_mb > 0:
            self.check()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="disk-watch")
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.check_s)
            self.check()
