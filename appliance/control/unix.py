"""The control socket: an AF_UNIX listening socket with mode 0660 and the configured group, and the bounds every
listener has (a connection cap, a deadline for each request to arrive, a body limit in the app).

The socket is bound under a temporary name, given its mode and group, then renamed into place, so it is never
reachable with wider permissions. A socket file left by a daemon that died is replaced; one a running daemon
answers on is not (ControlSocketBusy). A path longer than sun_path allows (108 bytes) is bound and reached
through /proc/self/fd/N of its directory.

Bounds: at most `max_connections` connections; past it a connection gets a fixed 503 and is closed. A
connection must deliver a request's headers within `request_timeout_s` of opening or of its last response,
else it is closed; a request being handled (an event stream) is exempt while it runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nConnection: close\r\n"
    b'Content-Length: 62\r\n\r\n{"error": "busy", "message": "too many control connections"}\r\n'
)


class ControlSocketBusy(OSError):
    """Another process is answering on the control socket."""


@contextlib.contextmanager
def _short(path: Path) -> Iterator[str]:
    """A name for `path` that fits in sun_path (through /proc/self/fd/N of its directory if needed)."""
    if len(os.fsencode(path)) < 100:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _answering(path: Path) -> bool:
    with _short(path) as name, socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(name)
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except OSError as exc:
            return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT)
        return True


def bind_control_socket(path: Path, group: str = "") -> socket.socket:
    """A listening socket at `path`, mode 0660, group `group` (or the process's)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    if path.exists() or path.is_symlink():
        if not path.is_socket():
            raise ControlSocketBusy(errno.EEXIST, f"{path} exists and is not a socket")
        if _answering(path):
            raise ControlSocketBusy(errno.EADDRINUSE, f"another process answers on {path}")
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with _short(tmp) as name:
            sock.bind(name)
        # Nobody can connect before listen(); the mode and group are right before the name is visible.
        os.chmod(tmp, 0o660)
        if group:
            os.chown(tmp, -1, grp.getgrnam(group).gr_gid)
        os.replace(tmp, path)
        sock.listen(64)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return sock


def open_for_group(directory: Path, group: str) -> None:
    """Let `group` reach the socket: its directory becomes mode 0710 with that group (traverse only: members
    can open what they know the name of and its own mode allows, and list nothing)."""
    gid = grp.getgrnam(group).gr_gid
    st = directory.stat()
    if st.st_gid != gid:
        os.chown(directory, -1, gid)
    os.chmod(directory, (st.st_mode & 0o700) | 0o010)  # noqa: S103 - group traverse only, by design


class Gate:
    """Connection count and request deadlines for one listener."""

    def __init__(self, max_connections: int, request_timeout_s: float) -> None:
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self.open = 0
        self.refused = 0
        self.timed_out = 0


class CappedProtocol(asyncio.Protocol):
    """In front of aiohttp's request handler: counts the connection and closes it if no request arrives in time.
    The app's middleware marks requests in progress through `busy`."""

    def __init__(self, gate: Gate, inner: asyncio.Protocol) -> None:
        self.gate = gate
        self.inner = inner
        self.busy = 0
        self.transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    # asyncio.Protocol, delegated
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport  # counted in `gate.open` already, when the factory made it
        self._arm()
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gate.open -= 1
        if self._timer is not None:
            self._timer.cancel()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    # deadlines
    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.gate.request_timeout_s, self._expired)

    def _expired(self) -> None:
        self._timer = None
        if self.busy == 0 and self.transport is not None and not self.transport.is_closing():
            self.gate.timed_out += 1
            self.transport.abort()

    def request_started(self) -> None:
        self.busy += 1
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def request_finished(self) -> None:
        self.busy -= 1
        if self.busy == 0:
            self._arm()


class _Refuse(asyncio.Protocol):
    def __init__(self, gate: Gate) -> None:
        self.gate = gate

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.gate.refused += 1
        transport.write(BUSY_RESPONSE)
        transport.close()


def capped_factory(gate: Gate, inner: Callable[[], Any]) -> Callable[[], asyncio.Protocol]:
    def factory() -> asyncio.Protocol:
        # Counted here, not in connection_made: asyncio accepts a burst of connections and makes all their
        # protocols before any connection_made runs, so a count taken there let a burst past the cap.
        if gate.open >= gate.max_connections:
            return _Refuse(gate)
        protocol = CappedProtocol(gate, inner())
        gate.open += 1
        return protocol

    return factory
