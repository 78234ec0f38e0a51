"""systemd's service notification protocol (sd_notify(3)), without libsystemd: one AF_UNIX datagram of
newline-separated KEY=VALUE lines to $NOTIFY_SOCKET.

    notifier = Notifier.from_environment()
    notifier.send(READY=1, STATUS="ready")      # nothing at all when not started by systemd
    notifier.watchdog_interval_s                # half of $WATCHDOG_USEC, None when no watchdog is asked of us

Sending never raises and never blocks: the socket is non-blocking, and a notification that cannot be delivered
(systemd restarting, the socket gone, its queue full) is dropped with one log line per kind of failure and five
minutes. A notification is state, not an event: the next one says everything again, so a dropped one costs
nothing but time, while a daemon that stopped or waited for its supervisor would cost issuance.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import Mapping

from appliance.alarms import LogOnce

log = logging.getLogger(__name__)

__all__ = ["Notifier"]


def _address(name: str) -> str | None:
    """The socket address of a $NOTIFY_SOCKET value: a path, or an abstract name written '@name'."""
    if name.startswith("@"):
        return "\0" + name[1:]
    if name.startswith("/"):
        return name
    return None  # vsock: and other transports of newer systemd: not spoken here


class Notifier:
    def __init__(self, socket_name: str | None, *, watchdog_usec: int | None = None) -> None:
        self.socket_name = socket_name or None
        self.watchdog_usec = watchdog_usec
        self._address = _address(socket_name) if socket_name else None
        self._sock: socket.socket | None = None
        self._failures = LogOnce(300.0)
        if socket_name and self._address is None:
            log.warning(
                "NOTIFY_SOCKET=%s is not a path or an abstract name: systemd is not notified", socket_name
            )

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """From $NOTIFY_SOCKET, $WATCHDOG_USEC and $WATCHDOG_PID. The watchdog is ours only when WATCHDOG_PID is
        unset or names this process: a child that inherited the variables must not ping for its parent."""
        env = os.environ if environ is None else environ
        usec: int | None = None
        raw, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
        if raw:
            try:
                usec = int(raw)
            except ValueError:
                log.warning("WATCHDOG_USEC=%r is not a number: no watchdog pings", raw)
            if pid and pid != str(os.getpid()):
                usec = None
        return cls(env.get("NOTIFY_SOCKET"), watchdog_usec=usec if usec and usec > 0 else None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to ping: half the watchdog timeout, as sd_watchdog_enabled(3) advises."""
        if not self.enabled or self.watchdog_usec is None:
            return None
        return self.watchdog_usec / 2e6

    def send(self, **fields: object) -> bool:
        """Send one notification; True when the datagram was handed to the kernel. Values are one line each:
        a newline would start a field of its own, so it is replaced."""
        if self._address is None:
            return False
        text = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(text.encode(), self._address)
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
            self._failures.log(log, logging.WARNING, name, "cannot notify systemd on %s: %s (dropped: %s)",
                               self.socket_name, exc.strerror or exc, ", ".join(fields))  # fmt: skip
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS):
                self.close()  # a new socket next time: systemd may have come back
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
