"""The outbox and RA-request depth counters (journal schema 4) equal what GROUP BY counts from the rows, through
inserts, state changes, deletes and rolled-back transactions; `upstream status` reads them, not the rows."""

from __future__ import annotations

import random
import sqlite3
from pathlib import Path

import pytest

from appliance.issuance.journal import Journal

KINDS = ("p10cr", "cr", "kur")
STATES = ("queued", "sent", "waiting", "done", "failed", "parked")
RA_STATES = ("pending", "issued", "confirmed", "failed")


def _agree(journal: Journal) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    def q(c: sqlite3.Connection) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
        outbox = c.execute(
            "SELECT kind, state, COUNT(*) FROM outbox GROUP BY kind, state ORDER BY kind, state"
        ).fetchall()
        assert (
            c.execute("SELECT kind, state, n FROM outbox_count WHERE n > 0 ORDER BY kind, state").fetchall()
            == outbox
        )
        assert not c.execute("SELECT * FROM outbox_count WHERE n < 0").fetchall()
        ra = c.execute("SELECT state, COUNT(*) FROM ra_request GROUP BY state ORDER BY state").fetchall()
        assert c.execute("SELECT state, n FROM ra_request_count WHERE n > 0 ORDER BY state").fetchall() == ra
        return outbox, ra

    return journal.call(lambda: q(journal.conn))


def test_counters_follow_every_change_of_the_rows(tmp_path: Path) -> None:
    rnd = random.Random(15)
    with Journal(tmp_path / "journal.sqlite") as journal:
        outbox_ids: list[int] = []
        ra_ids: list[int] = []
        for step in range(300):

            def change(c: sqlite3.Connection, step: int = step) -> None:
                what = rnd.random()
                if what < 0.35 or not outbox_ids:
                    cur = c.execute(
                        "INSERT INTO outbox (kind, cert_serial, transaction_id, next_attempt_at, created_at, state)"
                        " VALUES (?, ?, ?, 0, 0, ?)",
                        (rnd.choice(KINDS), f"{step:x}", rnd.randbytes(16), rnd.choice(STATES)),
                    )
                    outbox_ids.append(int(cur.lastrowid or 0))
                elif what < 0.6:
                    c.execute(
                        "UPDATE outbox SET state = ? WHERE id = ?",
                        (rnd.choice(STATES), rnd.choice(outbox_ids)),
                    )
                elif what < 0.65:
                    c.execute(
                        "UPDATE outbox SET attempts = attempts + 1 WHERE id = ?", (rnd.choice(outbox_ids),)
                    )
                elif what < 0.72:
                    gone = outbox_ids.pop(rnd.randrange(len(outbox_ids)))
                    c.execute("DELETE FROM outbox WHERE id = ?", (gone,))
                elif what < 0.85 or not ra_ids:
                    state = rnd.choice(("pending", "failed"))
                    cur = c.execute(
                        "INSERT INTO ra_request (request_id, station, profile, ca, device_serial, public_key_sha256,"
                        " state, created_at) VALUES (?, 'fixture-1', 'idevid', 'issuing', ?, ?, ?, 0)",
                        (f"r{step}", f"SN-{step}", rnd.randbytes(32), state),
                    )
                    ra_ids.append(int(cur.lastrowid or 0))
                elif what < 0.95:
                    c.execute("UPDATE ra_request SET state = 'failed' WHERE id = ?", (rnd.choice(ra_ids),))
                else:
                    gone = ra_ids.pop(rnd.randrange(len(ra_ids)))
                    c.execute("DELETE FROM ra_request WHERE id = ?", (gone,))

            journal.call(journal.transaction, change, "test")
            if step % 25 == 0:
                _agree(journal)
        outbox, ra = _agree(journal)
        assert sum(int(n) for *_, n in outbox) == len(outbox_ids) and len(outbox) > 5  # type: ignore[call-overload]
        assert sum(int(n) for _, n in ra) == len(ra_ids)  # type: ignore[call-overload]


def test_a_rolled_back_transaction_leaves_the_counters_as_they_were(tmp_path: Path) -> None:
    with Journal(tmp_path / "journal.sqlite") as journal:
        before = _agree(journal)

        def fails(c: sqlite3.Connection) -> None:
            c.execute("INSERT INTO outbox (kind, cert_serial, transaction_id, next_attempt_at, created_at)"
                      " VALUES ('p10cr', '01', x'00', 0, 0)")  # fmt: skip
            raise RuntimeError("rolled back")

        with pytest.raises(RuntimeError):
            journal.call(journal.transaction, fails, "test")
        assert _agree(journal) == before == ([], [])
