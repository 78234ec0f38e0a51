"""Named crash points for the crash campaign (bench/chaos.py) and the crash-safety tests.

`crash_point("after-revoke")` SIGKILLs the process when BIRTHLINE_CRASH_POINT names that point, so a test can stop
the daemon at the exact moment that matters (a revocation committed but not yet answered, a CRL signed but not yet
stored, ...) instead of hoping a random kill lands there. The variable is read once at import; unset (production),
a call is one comparison of a module constant. It is not a secret and changes nothing else.

Before it kills itself, an armed point appends `<point> <pid>` to the file BIRTHLINE_CRASH_MARKER names (if set)
and fsyncs it: the campaign counts a daemon's death as "reached the point" only on that evidence, so a daemon that
dies of anything else (a traceback, exit 1, a status asyncio lost) is never mistaken for a planned kill.
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "BIRTHLINE_CRASH_POINT"
MARKER_ENV = "BIRTHLINE_CRASH_MARKER"

# Every named point, in pipeline order. The first three are the issuance service's own (issuance/service.py reads
# the same variable); the others call crash_point() below.
POINTS = (
    "after-intent",  # issuance: intent rows committed, nothing signed yet
    "after-sign",  # issuance: signed in the HSM, not stored
    "after-store",  # issuance: certificates stored, not answered
    "after-confirm",  # confirmation: delivery recorded, not acknowledged
    "after-revoke",  # revocation (CMP rr): committed, not answered
    "after-crl-sign",  # CRL: signed in the HSM, not stored
    "after-crl-store",  # CRL: stored, not served
    "after-forward-send",  # forwarder: the upstream answered the requests, nothing confirmed or recorded
    "after-forward-confirm",  # forwarder: the upstream confirmed the certConf, the outcome not recorded
    "after-forward-record",  # forwarder: outcomes recorded
)

_ARMED = os.environ.get(CRASH_ENV, "")
_MARKER = os.environ.get(MARKER_ENV, "")


def crash_point(name: str) -> None:
    """SIGKILL this process if BIRTHLINE_CRASH_POINT names `name` (SIGKILL: no handler, no flush, no cleanup)."""
    if name == _ARMED:
        die(name)


def die(name: str) -> None:
    """Leave the marker (written and fsynced: it must survive the kill), then SIGKILL this process."""
    if _MARKER:
        fd = os.open(_MARKER, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            os.write(fd, f"{name} {os.getpid()}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    os.kill(os.getpid(), signal.SIGKILL)
