"""How long the journal's migration from schema 5 to 6 takes (the outbox rebuilt without the UNIQUE constraint on
its transaction_id), and how much disk it needs on the way.

    .venv/bin/python bench/migration.py [--rows 1000000] [--csr-bytes 300] [--dir DIR]

Makes a journal of this release, turns it into a schema-5 one (the outbox with transaction_id UNIQUE, as that
schema had it) holding --rows outbox records of --csr-bytes each (a P-256 device's CSR is about 250 to 300), drops
the file from the page cache where it may (root: /proc/sys/vm/drop_caches), then opens it with Journal: the
migration and the schema after it, every index of the rebuilt outbox included, and the checkpoint after it. Prints
the time, per million rows and per GB of journal, and the largest the journal file and its WAL grew while it ran
(sampled every 50 ms; their sum over the journal's size before is an upper bound of the extra disk needed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.issuance.journal import Journal
from appliance.issuance.schema import OUTBOX_TABLE, SCHEMA


def schema_5_journal(path: Path, rows: int, csr_bytes: int) -> None:
    """A journal as schema 5 left it, its outbox holding `rows` done records."""
    Journal(path).close()
    conn = sqlite3.connect(path, isolation_level=None)
    v5 = OUTBOX_TABLE.replace("transaction_id    BLOB NOT NULL,", "transaction_id    BLOB NOT NULL UNIQUE,")
    conn.executescript(f"DROP TRIGGER outbox_on_revocation; DROP TABLE outbox; {v5};")
    conn.executescript(SCHEMA)
    conn.execute("UPDATE meta SET value='5' WHERE key='schema_version'")
    csr = os.urandom(csr_bytes)
    now = time.time()
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO outbox (kind, cert_serial, transaction_id, csr_der, state, next_attempt_at, created_at,"
        " done_at) VALUES ('p10cr', ?, ?, ?, 'done', 0, ?, ?)",
        ((f"{i:032x}", os.urandom(16), csr, now, now) for i in range(rows)),
    )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError:
        return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--csr-bytes", type=int, default=300)
    ap.add_argument("--dir", help="where to make the journal (default: a temporary directory)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="birthline-migration-", dir=args.dir) as tmp:
        path = Path(tmp) / "journal.sqlite"
        wal = path.with_name(path.name + "-wal")
        print(
            f"making a schema-5 journal with {args.rows} outbox rows of {args.csr_bytes}-byte CSRs ...",
            flush=True,
        )
        schema_5_journal(path, args.rows, args.csr_bytes)
        before = path.stat().st_size
        cold = drop_page_cache()
        peak = {"file": before, "wal": 0}
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.05):
                for name, p in (("file", path), ("wal", wal)):
                    with contextlib.suppress(OSError):
                        peak[name] = max(peak[name], p.stat().st_size)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        with Journal(path):
            took = time.perf_counter() - t0
        done.set()
        sampler.join()
        after = path.stat().st_size
        # The file grows last, in the checkpoint after the COMMIT, which can fall between two samples.
        peak["file"] = max(peak["file"], after)
        gb = before / 1e9
        print(
            f"migration 5 -> 6 of {args.rows} outbox rows ({before / 1e6:.0f} MB journal,"
            f" {'dropped from' if cold else 'possibly still in'} the page cache): {took:.1f} s,"
            f" {took / args.rows * 1e6:.1f} s a million rows, {took / gb:.1f} s a GB"
        )
        print(
            f"  journal file {before / 1e6:.0f} MB -> {after / 1e6:.0f} MB (largest {peak['file'] / 1e6:.0f} MB);"
            f" WAL largest {peak['wal'] / 1e6:.0f} MB, after {wal.stat().st_size / 1e6 if wal.exists() else 0:.0f} MB;"
            f" largest file + WAL over the journal before: {(peak['file'] + peak['wal'] - before) / before:.2f}x"
        )


if __name__ == "__main__":
    main()
