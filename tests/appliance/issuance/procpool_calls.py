"""Functions the tests of `procpool` run in worker processes (pickled by name, imported there)."""

from __future__ import annotations

import os
import signal
import sys
import threading

_state: dict[str, object] = {}


def init(tag: str) -> None:
    _state["tag"] = tag


def init_fails(tag: str) -> None:
    raise RuntimeError(f"cannot start: {tag}")


def echo(value: object) -> tuple[object, object, int]:
    return value, _state.get("tag"), os.getpid()


def fails(message: str) -> None:
    raise ValueError(message)


def unpicklable() -> object:
    return threading.Lock()


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def modules() -> list[str]:
    return sorted(sys.modules)


def block(path: str) -> str:
    """Wait until `path` exists (a test holds a call in flight this way, without any timing)."""
    while not os.path.exists(path):
        threading.Event().wait(0.01)
    return path


def fork_holder() -> int:
    """Fork a process that keeps every descriptor of this worker (its socket too) for an hour; its pid."""
    pid = os.fork()
    if pid == 0:
        threading.Event().wait(3600)
        os._exit(0)
    return pid


def sleep_then_echo(seconds: float, value: object) -> object:
    threading.Event().wait(seconds)
    return value


def wait_for(path: str) -> str:
    """Busy until `path` exists (the test decides when, no timing involved)."""
    while not os.path.exists(path):
        threading.Event().wait(0.01)
    return path
