"""Issue 10 item 7: knowing that the daemon runs. The flock on <state>/daemon.lock, held by another process, then
that process SIGKILLed (the kernel releases the lock; the file left behind blocks nobody)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from appliance.daemon_lock import DaemonLock, DaemonRunning, running

HOLDER = """
import sys, time
from pathlib import Path
from appliance.daemon_lock import DaemonLock
lock = DaemonLock(Path(sys.argv[1]), "the daemon")
lock.acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_a_holder_is_seen_and_a_killed_holder_blocks_nobody(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    assert running(state) is None
    child = subprocess.Popen([sys.executable, "-c", HOLDER, str(state)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        holder = running(state)
        assert holder is not None and holder.startswith(f"the daemon (pid {child.pid}, since ")
        with pytest.raises(DaemonRunning, match=r"the daemon \(pid \d+"):
            DaemonLock(state, "`birthline crl generate`").acquire()
    finally:
        child.kill()
        child.wait(timeout=30)
    assert (state / "daemon.lock").exists()  # left behind by the killed holder ...
    assert running(state) is None  # ... and held by nobody
    with DaemonLock(state, "a job"):
        assert running(state) is not None  # a second open file conflicts even in the same process
    assert running(state) is None
