"""Microbenchmark: the cost of AuditLog.append inside a transaction (not collected by pytest).

.venv/bin/python -m tests.appliance.audit.bench_append
"""

from __future__ import annotations

import sqlite3
import tempfile
import time
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from appliance.audit import AuditLog, export, verify
from appliance.audit.encoding import canonical_json, entry_hash
from appliance.audit.log import _LAST_CLAIM
from appliance.issuance.journal import Journal

DATA = {
    "device_serial": "SN-000123",
    "cert_serial": "5f3a9c0e11d2b7a4",
    "profile": "idevid",
    "station": "line-1",
}


def per_op(journal: Journal, fn: object, n: int) -> float:
    def txn(conn: sqlite3.Connection) -> float:
        t = time.perf_counter()
        for _ in range(n):
            fn(conn)  # type: ignore[operator]
        return (time.perf_counter() - t) / n

    return journal.call(lambda: journal.transaction(txn, "bench"))


def main() -> None:
    with tempfile.TemporaryDirectory() as d, Journal(Path(d) / "j.sqlite") as journal:
        audit = AuditLog(journal)
        n = 20_000
        for size in (0, 200_000):
            while audit.head()[0] < size:
                per_op(journal, lambda c: audit.append(c, "station:line-1", "issuance.intent", DATA), 10_000)
            append = min(
                per_op(journal, lambda c: audit.append(c, "station:line-1", "issuance.intent", DATA), n)
                for _ in range(3)
            )
            head = min(
                per_op(
                    journal,
                    lambda c: c.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone(),
                    n,
                )
                for _ in range(3)
            )
            state: dict[str, object] = {"seq": audit.head()[0], "prev": audit.head()[1]}

            def cached(c: sqlite3.Connection, state: dict[str, object] = state) -> None:  # no head SELECT
                seq, prev = int(state["seq"]) + 1, state["prev"]  # type: ignore[call-overload]
                text = canonical_json(DATA)
                t = time.time()
                h = entry_hash(seq, t, "station:line-1", "issuance.intent", text, prev)  # type: ignore[arg-type]
                c.execute(
                    "INSERT INTO audit VALUES (?,?,?,?,?,?,?)",
                    (seq, t, "station:line-1", "issuance.intent", text, prev, h),
                )
                state["seq"], state["prev"] = seq, h

            cache = min(per_op(journal, cached, n) for _ in range(3))
            print(
                f"log from {size:>7} entries: append {append * 1e6:6.1f} us/entry in a transaction"
                f" (head re-read {head * 1e6:4.1f} us; a cached-head variant {cache * 1e6:6.1f} us)"
            )

        # Checkpoints (a software P-256 key stands in for the HSM's: this measures the journal's share).
        key = ec.generate_private_key(ec.SECP256R1())
        for _ in range(3):
            per_op(journal, lambda c: audit.append(c, "station:line-1", "issuance.intent", DATA), 1000)
            audit.checkpoint(key)
        k = 50
        t = time.perf_counter()
        for _ in range(k):
            per_op(journal, lambda c: audit.append(c, "station:line-1", "issuance.intent", DATA), 1)
            audit.checkpoint(key)
        cp = (time.perf_counter() - t) / k
        lookup = min(per_op(journal, lambda c: c.execute(_LAST_CLAIM).fetchone(), 2000) for _ in range(3))
        scan = min(
            per_op(
                journal,
                lambda c: c.execute(  # no index, and no claim to stop at: an old log's first checkpoint
                    "SELECT max(seq) FROM audit WHERE event || '' = 'audit.no-such-event'"
                ).fetchone(),
                3,
            )
            for _ in range(3)
        )
        print(
            f"log of {audit.head()[0]} entries: a checkpoint (claim, software ECDSA, signature row) {cp * 1e3:.2f} ms;"
            f" finding the last claim {lookup * 1e6:.1f} us with the audit_claims index, {scan * 1e3:.1f} ms by a full scan"
        )
        t = time.perf_counter()
        report = verify(journal)
        rate = report.entries / (time.perf_counter() - t)
        out = Path(d) / "audit.jsonl"
        t = time.perf_counter()
        export(journal, out)
        exported = time.perf_counter() - t
        t = time.perf_counter()
        offline = verify(out)
        offline_rate = offline.entries / (time.perf_counter() - t)
        assert report.status == offline.status == "unsigned-tail" or report.intact, report.text()
        print(
            f"verify: {rate:,.0f} entries/s from the journal, {offline_rate:,.0f} from an export;"
            f" export of {report.entries} entries {exported:.2f} s"
        )

        def one(conn: sqlite3.Connection, with_audit: bool) -> None:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('bench', 'x')")
            if with_audit:
                audit.append(conn, "station:line-1", "issuance.intent", DATA)

        for with_audit in (False, True):
            k = 200
            t = time.perf_counter()
            for _ in range(k):
                journal.call(lambda w=with_audit: journal.transaction(lambda c: one(c, w), "bench"))
            print(
                f"one-row transaction (synchronous=FULL, WAL) {'with' if with_audit else 'without'} an audit entry:"
                f" {(time.perf_counter() - t) / k * 1e3:.3f} ms"
            )


if __name__ == "__main__":
    main()
