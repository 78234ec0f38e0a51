"""The child side of `procpool.ProcessPool`: a worker process serving calls from its daemon on one socket.

Standard library only at import time: what a worker holds in memory is what its initializer and its calls
import (for the prepare workers, cryptography and the profile code), not the daemon's modules.

Wire (procpool.py has the whole description): the daemon's frames are a 4-byte big-endian length and a
pickle; the worker's are a header (payload length, call id, ok) and a pickle. Call id 0 is READY, sent once
the initializer returned.
"""

from __future__ import annotations

import io
import os
import pickle
import socket
import struct
import traceback
from typing import Any, Final

IN_HEADER: Final = struct.Struct(">I")
OUT_HEADER: Final = struct.Struct(">IQB")
READY_ID: Final = 0


def read_frame(rfile: io.BufferedReader) -> Any | None:
    """The next frame's value, or None at end of file (the daemon closed its end or died)."""
    head = rfile.read(IN_HEADER.size)
    if len(head) < IN_HEADER.size:
        return None
    (size,) = IN_HEADER.unpack(head)
    body = rfile.read(size)
    if len(body) < size:
        return None
    return pickle.loads(body)  # noqa: S301 - frames come only from this worker's own daemon, over a socketpair


def _send(sock: socket.socket, call_id: int, ok: bool, value: Any) -> None:
    try:
        payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - the daemon gets the reason instead of a hang
        ok, payload = False, pickle.dumps(f"the result does not pickle: {exc!r}")
    sock.sendall(OUT_HEADER.pack(len(payload), call_id, ok) + payload)


def serve(sock: socket.socket, rfile: io.BufferedReader) -> None:
    """Run the initializer, say READY, then answer calls until the daemon closes the socket; then exit."""
    try:
        first = read_frame(rfile)
        if first is None:
            os._exit(0)
        initializer, initargs = first
        # An exception here ends the process: the daemon sees a worker that cannot start.
        initializer(*initargs)
        _send(sock, READY_ID, True, os.getpid())
        while (message := read_frame(rfile)) is not None:
            call_id, fn, args = message
            try:
                value, ok = fn(*args), True
            except BaseException:  # noqa: BLE001 - the call's failure is the call's result, as in a process pool
                value, ok = traceback.format_exc(limit=8), False
            _send(sock, call_id, ok, value)
    except OSError:
        pass  # the daemon closed the socket while a call ran (shutdown, a broken pool) or died: nobody to answer
    # The daemon is gone or shut the pool down. os._exit: no interpreter teardown of the worker's threads.
    os._exit(0)
