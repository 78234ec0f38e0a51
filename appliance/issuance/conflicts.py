"""Which of a batch's devices, keys and serials the journal already holds: four queries per batch, not per request.

Before recording an intent the service asks the journal, per request, for the device's live certificate, its
RA-mode request, another device holding the same key, and the serial (checks.check_conflicts). Four indexed
queries per certificate were a third of the journal thread's CPU, and nearly every answer is "none": a factory
issues each device once. `Present` asks the same questions once for the whole batch, inside the same
transaction (BEGIN IMMEDIATE: nobody else writes meanwhile), and the per-request query then runs only where the
batch query found something, or where an earlier request of the same batch wrote a row that may match. So a
"maybe" always runs the exact per-request query, and a "no" is as good as its answer: no conflict is missed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from typing import Final

# Well below SQLite's limit on host parameters (32766 since 3.32; 999 before).
_CHUNK: Final = 500


def _chunks(values: Sequence[object]) -> Iterable[Sequence[object]]:
    for i in range(0, len(values), _CHUNK):
        yield values[i : i + _CHUNK]


def _found(conn: sqlite3.Connection, sql: str, head: tuple[object, ...], values: Sequence[object],
           repeat: int = 1) -> set[object]:  # fmt: skip
    """The values `sql` returns for `values`, asked `_CHUNK` at a time; `{IN}` in `sql` stands for the list."""
    out: set[object] = set()
    for chunk in _chunks(list(dict.fromkeys(values))):
        marks = ",".join("?" * len(chunk))
        params = head + tuple(chunk) * repeat
        out.update(r[0] for r in conn.execute(sql.replace("{IN}", marks), params))
    return out


class Present:
    """What the journal holds for one batch, as sets of possible matches (never missing one)."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        ca: str,
        devices: Sequence[str],
        keys: Sequence[bytes],
        serials: Sequence[str],
    ) -> None:
        # The same conditions as the per-request queries in checks.check_conflicts / check_upstream.
        self.devices = _found(
            conn,
            "SELECT device_serial FROM issuance WHERE ca=? AND device_serial IN ({IN})"
            " AND state NOT IN ('burned', 'reworked') AND updated_by IS NULL",
            (ca,),
            devices,
        )
        self.ra_devices = _found(
            conn,
            "SELECT device_serial FROM ra_request WHERE ca=? AND device_serial IN ({IN})",
            (ca,),
            devices,
        )
        self.keys = _found(
            conn,
            "SELECT public_key_sha256 FROM issuance WHERE public_key_sha256 IN ({IN}) AND state!='burned'",
            (),
            keys,
        ) | _found(
            conn,
            "SELECT public_key_sha256 FROM ra_request WHERE public_key_sha256 IN ({IN}) AND state!='failed'",
            (),
            keys,
        )
        self.serials = _found(
            conn, "SELECT cert_serial FROM issuance WHERE cert_serial IN ({IN})", (), serials
        )

    def issued(self, device: str, key: bytes, serial: str) -> None:
        """An intent row was inserted for this device, key and serial in this transaction."""
        self.devices.add(device)
        self.keys.add(key)
        self.serials.add(serial)

    def forwarded(self, device: str, key: bytes) -> None:
        """An RA-mode request row was inserted for this device and key in this transaction."""
        self.ra_devices.add(device)
        self.keys.add(key)
