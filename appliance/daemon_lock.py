"""Whether the daemon runs: an exclusive flock on <state_dir>/daemon.lock.

The daemon (`birthline run`, and `birthline demo` while its appliance runs) holds the lock for its whole life.
Jobs that are the daemon's own (`crl generate`, `upstream sync`, `init`) take the same lock while they run:
they are refused while the daemon runs, and the daemon refuses to start while one of them runs. The kernel
drops an flock when its holder exits, however it exits (SIGKILL included), so a file left behind never blocks
anyone; and a second open of the file conflicts even inside one process, so in-process daemons (tests, the
demo) are seen too. The file says who holds it, for the refusal's message; it holds no secret.

    with daemon_job(config, "crl generate"):   # refused (DaemonRunning) while the daemon runs
        ...
    holder = running(state_dir)                # who holds the lock right now, or None
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from appliance.config import Config
from appliance.errors import BirthlineError, ReasonCode

LOCK_FILE: Final = "daemon.lock"


class DaemonRunning(BirthlineError):
    """Another process holds the daemon lock; `holder` says who (as that process wrote it)."""

    def __init__(self, message: str, holder: str) -> None:
        super().__init__(message, ReasonCode.BUSY, {"holder": holder})
        self.holder = holder

    def __str__(self) -> str:
        return self.message


def _open(state_dir: Path) -> int:
    return os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    return text or "another process"


class DaemonLock:
    """The lock itself: `with DaemonLock(state_dir, "the daemon"):` or acquire()/release()."""

    def __init__(self, state_dir: Path, holder: str) -> None:
        self.path = Path(state_dir) / LOCK_FILE
        self.holder = holder
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = _open(self.path.parent)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise DaemonRunning(f"{holder} holds {self.path}", holder) from None
        since = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.holder} (pid {os.getpid()}, since {since})\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None

    def __enter__(self) -> DaemonLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def running(state_dir: Path) -> str | None:
    """Who holds the daemon lock now (the daemon, or a daemon job), or None. A probe: by the time the caller
    acts the answer may have changed; to act only while nobody runs, hold the lock (daemon_job)."""
    if not (Path(state_dir) / LOCK_FILE).exists():
        return None
    try:
        with DaemonLock(state_dir, "probe"):
            return None
    except DaemonRunning as exc:
        return exc.holder


@contextlib.contextmanager
def daemon_job(config: Config, what: str) -> Iterator[None]:
    """Run one of the daemon's own jobs by hand: refused while the daemon (or another such job) runs."""
    from appliance.runtime import check_state

    check_state(config)  # the lock file lives in the state directory: the same checks as opening it
    lock = DaemonLock(config.appliance.state_dir, f"`birthline {what}`")
    try:
        lock.acquire()
    except DaemonRunning as exc:
        raise DaemonRunning(
            f"`birthline {what}` is the daemon's own job and is refused while the daemon runs, which does it"
            f" itself ({exc.holder} holds {lock.path}); stop the daemon to run it by hand",
            exc.holder,
        ) from None
    try:
        yield
    finally:
        lock.release()
