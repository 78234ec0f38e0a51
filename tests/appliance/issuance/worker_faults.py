"""Real deaths of prepare worker processes, for tests/appliance/issuance/test_prepare_workers.py.

No input kills a worker any more, so these stand in for the job function (`prepare.prepare_in_worker`) or the
worker initializer, patched in with pytest-mock in the parent. The pool pickles them by name and the spawned
worker imports this module, where they make the process die the way a real fault does: os._exit, SIGKILL (the
OOM killer), or a real SIGSEGV in C code.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Sequence

from appliance.issuance import prepare

_real_prepare = prepare.prepare_in_worker


def die(how: str) -> None:
    if how == "exit":
        os._exit(3)
    elif how == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif how == "segv":
        ctypes.string_at(0)  # reads address 0 in C: SIGSEGV
    raise AssertionError(f"{how}: still alive")


def prepare_or_die(jobs: Sequence[prepare.Job]) -> list[prepare.Prepared | prepare.Refusal]:
    """A job whose device serial is DIE-<how>-... kills its worker (how: exit, kill, segv)."""
    for job in jobs:
        if job.device_serial.startswith("DIE-"):
            die(job.device_serial.split("-")[1].lower())
    return _real_prepare(jobs)


def init_and_die(ctx: prepare.PrepareContext) -> None:
    """A worker that cannot start (a missing library, no memory): it exits in its initializer."""
    os._exit(4)


_real_finish = prepare.finish_in_worker


def finish_or_die(signed: Sequence[tuple[object, bytes]]) -> list[bytes | None] | None:
    """A batch holding the device FINISH-DIE kills the worker that verifies its HSM signatures."""
    if any(b"FINISH-DIE" in tbs.tbs for tbs, _ in signed):  # type: ignore[attr-defined]
        os._exit(3)
    return _real_finish(signed)  # type: ignore[arg-type]


def finish_raises(signed: Sequence[tuple[object, bytes]]) -> list[bytes | None] | None:
    """A verification call that raises in a healthy worker (a bug, not a death)."""
    raise RuntimeError("a bug in the worker's finish")
