"""Binding the configured TCP listeners (LAN stations, VA, CMP, metrics): a failure is one line that names the
configuration key, the address and what to do, never a traceback.

    with binding("[va] listen", config.va.listen):
        server = await ...create_server(...)
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Iterator

from appliance.errors import BirthlineError, ReasonCode

_WHY = {
    errno.EADDRINUSE: "the address is in use: another Birthline daemon (on another state directory) or another"
    " program listens there (`ss -ltnp` shows which); stop it, or choose another port",
    errno.EADDRNOTAVAIL: "no network interface of this machine has that address; use one it has, or 0.0.0.0",
    errno.EACCES: "ports below 1024 need CAP_NET_BIND_SERVICE (AmbientCapabilities= in the unit); or choose a"
    " port above 1023",
}


class ListenerUnavailable(BirthlineError):
    """A configured listener could not bind its address."""

    def __init__(self, key: str, listen: str, why: str) -> None:
        super().__init__(f"{key} = {listen!r} cannot be bound: {why}", ReasonCode.BUSY, {"key": key})

    def __str__(self) -> str:
        return self.message


@contextlib.contextmanager
def binding(key: str, listen: str) -> Iterator[None]:
    """Around the start of the listener configured by `key` (its value `listen`): EADDRINUSE, EADDRNOTAVAIL and
    EACCES become ListenerUnavailable; other errors pass unchanged."""
    try:
        yield
    except OSError as exc:
        why = _WHY.get(exc.errno or 0)
        if why is None:
            raise
        raise ListenerUnavailable(key, listen, why) from exc
