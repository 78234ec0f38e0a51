"""Ten years of journal: how the appliance behaves when its journal holds millions of certificates.

    python bench/journal_growth.py [--certs 1000000] [--per-work-order 10000] [--sample 3000]

Builds a real appliance (SoftHSM2 token, CA hierarchy, one LAN station, a production floor with an active work
order), issues --sample certificates through the issuance core with the work-order policy and the audit log (the
"empty journal" figures), copies that journal aside, then fills it with --certs more issued and confirmed
certificates written directly in bulk with SQL (not through the HSM): their issuance rows (serials in the product's
time-ordered layout, see _ordered_keys; the size of a real certificate), one work-order unit each in closed work
orders of --per-work-order units, one finished outbox row each (the forwarder's record of the upstream copy: CSR,
request and upstream certificate sized like real ones), and the audit entries the core writes for them (as many per
certificate as the sample wrote, hash-chained, with a checkpoint signed in the HSM every 1,000 entries as the
daemon does). Then, on the empty and on the full journal, measures what a user meets:

    issuance rate         --sample certificates through the core (policy + audit), alternated rounds on the two
                          journals; goal: full >= 80% of empty once the daemon's prewarm has read the key index
                          (as a running daemon meets it); also printed: the rate right after a start, before it
    OCSP cold lookup      lookup_status() of random serials, per lookup (the responder's cache is not involved)
    report workorder      `birthline report workorder` of a work order of --per-work-order units, wall time
    export workorder      `birthline export workorder ... --csv`, wall time
    upstream status       `birthline upstream status` (the outbox depth by kind and state), wall time
    audit verify          `birthline audit verify`, wall time (it recomputes the whole chain from genesis)
    journal size          bytes per certificate
    daemon start          `birthline run` until its LAN listener accepts

and prints the query plan (EXPLAIN QUERY PLAN) of the hot queries, flagging any full-table scan. Figures are
ratios within one run: this machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from appliance.audit.encoding import entry_hash
from appliance.audit.log import ensure_audit_key
from appliance.config import Config, load_config
from appliance.issuance.prewarm import JournalPrewarm
from appliance.issuance.requestids import new_request_id
from appliance.production.policy import WorkOrderPolicy
from appliance.profiles import new_serial_number
from appliance.runtime import open_core
from appliance.va.status import lookup_status
from bench.stations import _config, _free_port, _setup, _wait_listening
from stations.simulator import make_devices

CLI = [sys.executable, "-m", "appliance.cli.main"]
CHECKPOINT_EVERY = 1000  # [audit] checkpoint_every_entries default
VERIFY_SINCE_ENTRIES = 10_000  # `audit verify --since-checkpoint` is measured from a checkpoint this far back

# The queries that run per request or per command and must stay indexed as the journal grows (name, SQL,
# parameters). Checked with EXPLAIN QUERY PLAN here and in tests/appliance/issuance/test_query_plans.py. The
# audit head reads the rowid b-tree backwards with LIMIT 1: SQLite shows that as "SCAN audit", one row read.
HOT_QUERIES: tuple[tuple[str, str, tuple[object, ...]], ...] = (
    ("ocsp status", "SELECT i.state, i.ca, r.reason, r.revoked_at FROM issuance i LEFT JOIN revocation r"
     " ON r.cert_serial = i.cert_serial WHERE i.cert_serial=?", ("ab",)),
    ("station request", "SELECT cert_serial, device_serial, csr_sha256, cert_der, state FROM issuance"
     " WHERE station=? AND request_id=? AND state!='burned' ORDER BY id DESC LIMIT 1", ("s", "r")),
    ("revocation by device", "SELECT cert_serial, ca, device_serial, state FROM issuance WHERE device_serial=?"
     " ORDER BY id", ("d",)),
    ("audit head", "SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", ()),
    ("report workorder", "SELECT u.kind, i.state, COUNT(*) FROM work_order_unit u JOIN issuance i"
     " ON i.id = u.issuance_id WHERE u.work_order = ? AND u.released = 0 GROUP BY u.kind, i.state", ("w",)),
    ("confirm", "SELECT state, cert_der, station, device_serial, cert_serial, issued_at FROM issuance"
     " WHERE cert_serial=?", ("ab",)),
    ("ocsp changes", "SELECT id, ca, cert_serial FROM issuance WHERE id > ? ORDER BY id", (1,)),
    ("issue: device conflict", "SELECT id FROM issuance WHERE ca=? AND device_serial=?"
     " AND state NOT IN ('burned', 'reworked') AND updated_by IS NULL", ("c", "d")),
    ("issue: key conflict", "SELECT id FROM issuance WHERE public_key_sha256=? AND state != 'burned'", (b"k",)),
    ("issue: RA request", "SELECT id FROM ra_request WHERE ca=? AND device_serial=? ORDER BY id DESC LIMIT 1",
     ("c", "d")),
    ("export workorder", "SELECT u.issuance_id FROM work_order_unit u WHERE u.work_order = ? AND u.released = 0"
     " AND u.issuance_id IS NOT NULL", ("w",)),
    ("outbox due", "SELECT id FROM outbox WHERE state IN ('queued', 'sent', 'waiting') AND next_attempt_at <= ?"
     " ORDER BY next_attempt_at LIMIT 50", (0.0,)),
    ("outbox oldest", "SELECT MIN(created_at) FROM outbox WHERE state IN ('queued', 'sent', 'waiting')", ()),
    # `birthline upstream status` (appliance/outbox.py): the depths from their counters, the records set aside.
    ("upstream status: depth", "SELECT kind, state, n FROM outbox_count WHERE n > 0", ()),
    ("upstream status: set aside", "SELECT id, kind, cert_serial, state, done_at, last_error FROM outbox"
     " WHERE state IN ('parked', 'failed') ORDER BY id DESC LIMIT ?", (20,)),
    # At every daemon start (IssueService): the intents a crash left, and the time of the last issuance (the
    # clock check; also the status document's last issuance).
    ("start: interrupted intents", "SELECT cert_serial FROM issuance WHERE state='intent'", ()),
    ("start: last issuance", "SELECT MAX(created_at) FROM issuance", ()),
)  # fmt: skip


BOUNDED_SCANS = ("SCAN outbox_count", "SCAN ra_request_count")


def plans(conn: sqlite3.Connection) -> list[tuple[str, str, bool]]:
    """(name, plan, scans a whole table) for each hot query."""
    out = []
    for name, sql, params in HOT_QUERIES:
        detail = [str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
        # The audit head reads one row; a counter table holds a row per (kind, state), whatever the journal holds.
        one_row = name == "audit head" or all(d.startswith(BOUNDED_SCANS) for d in detail)
        # A MIN/MAX of a column without an index reads every row too, but SQLite shows it as "SEARCH t".
        scans = not one_row and any(
            (d.startswith("SCAN ") and " USING " not in d) or re.fullmatch(r"SEARCH \w+", d) for d in detail
        )
        out.append((name, "; ".join(detail), scans))
    return out


# -- the sample: real issuance through the core --------------------------------------------------------------


def issue_sample(config: Config, n: int, tag: str) -> float:
    """Issue and confirm `n` devices through the core with the work-order policy and the audit log;
    returns certificates/s (issue + confirm, all concurrently, as many stations would)."""
    devices = make_devices(n, f"JG{tag}")
    with open_core(config) as core:
        service = core.issue_service(WorkOrderPolicy(config.issuance.issuing_ca))
        from appliance.issuance.policy import IssueRequest

        async def run() -> float:
            async with service:
                t0 = time.perf_counter()
                # Half the core's queue bound in flight ([issuance] max_queued): past the bound a request is
                # refused BUSY, which would end the run instead of measuring it.
                slots = asyncio.Semaphore(max(1, config.issuance.max_queued // 2))

                async def one(serial: str, csr: bytes) -> None:
                    async with slots:
                        result = await service.issue(IssueRequest(serial, csr, station="lan00"))
                        await service.confirm(result.cert_serial)

                await asyncio.gather(*(one(s, c) for s, c in devices))
                return time.perf_counter() - t0

        written = _written()
        elapsed = asyncio.run(run())
        WRITTEN.append((_written() - written) / n)
    return n / elapsed


WRITTEN: list[float] = []  # bytes this process wrote to disk per certificate, one per issue_sample call


def _written() -> int:
    """Bytes this process has caused to be written to storage (/proc/self/io: WAL, database, checkpoints)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("write_bytes:"):
            return int(line.split()[1])
    return 0


# -- the bulk fill ----------------------------------------------------------------------------------------------


TEN_YEARS_S = 10 * 365 * 86400


def audit_shapes(journal_path: Path) -> tuple[float, list[tuple[str, str, str]]]:
    """What the sample's issuance wrote to the audit log: entries per certificate, and their (actor, event, data)
    to copy. Read from the empty copy when resuming (the full journal's counts include the bulk rows)."""
    conn = sqlite3.connect(f"file:{journal_path}?mode=ro", uri=True)
    try:
        n_sample = conn.execute("SELECT COUNT(*) FROM issuance").fetchone()[0]
        n_audit = conn.execute("SELECT COUNT(*) FROM audit WHERE event LIKE 'issuance.%'").fetchone()[0]
        shapes = [
            (str(a), str(e), str(d))
            for a, e, d in conn.execute(
                "SELECT actor, event, data FROM audit WHERE event LIKE 'issuance.%' LIMIT 64"
            )
        ]
    finally:
        conn.close()
    return n_audit / n_sample, shapes


def _ordered_keys(conn: sqlite3.Connection, total: int) -> None:
    """SQL functions for the bulk rows' random keys, drawn so that each key sorts after the previous row's.

    A public-key hash and an outbox transaction id are random, and each has an index; a certificate serial is the
    product's own, time-ordered (appliance/profiles/serial.py), and so is a request id (a UUIDv7, as the fixture
    library and the appliance make them: appliance/issuance/requestids.py), each for a time a millisecond apart
    per row. Inserted in random order, every 100,000-row chunk dirties nearly every page of those
    indexes: past about four million certificates each chunk rewrote gigabytes and the fill slowed from 11,000 to
    800 certificates/s. Here row x of `total` gets a key whose leading 31 or 32 bits are x's place in the fill
    (x * 2**31 / total) and whose other bits are random: the keys are as uniformly spread and as unpredictable in
    their low bits as the product's, but each lands at the right edge of its index ."""

    def lead(x: int) -> int:
        return x * (1 << 31) // total

    # A millisecond a row, ending now: the serials the measuring rounds issue later sort after all of them, as a
    # running appliance's new serials do after its old ones.
    start_ms = int(time.time() * 1000) - total

    def serial(
        x: int,
    ) -> str:  # the product's layout (appliance/profiles/serial.py): time-ordered, lowercase hex
        return f"{new_serial_number(now_ms=start_ms + x):x}"

    def request_id(x: int) -> str:  # the product's layout: a UUIDv7 in hex
        return new_request_id(now_ms=start_ms + x)

    def key_blob(x: int, size: int) -> bytes:  # a SHA-256 (32) or a transaction id (16)
        return (lead(x) << 1).to_bytes(4, "big") + os.urandom(size - 4)

    conn.create_function("jg_serial", 1, serial)
    conn.create_function("jg_request_id", 1, request_id)
    conn.create_function("jg_key", 2, key_blob)


def fill(config: Config, journal_path: Path, certs: int, per_wo: int, outbox: bool) -> None:
    """Append `certs` issued+confirmed certificates with their units, outbox rows and audit entries.

    The bulk load is bench code with settings of its own: no rollback or WAL journal while it runs (a crash
    means running the bench again), a 2 GB page cache, 250,000 certificates per transaction, and keys in index
    order (_ordered_keys). The rows and the schema (every index the product creates, maintained as rows go in)
    are the product's; the journal is back in WAL mode before anything is measured."""
    per_cert, shapes = audit_shapes(journal_path)
    conn = sqlite3.connect(journal_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=OFF")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-2000000")
    _ordered_keys(conn, certs)
    sample = conn.execute(
        "SELECT profile, ca, cert_der, station FROM issuance WHERE state='confirmed' LIMIT 1"
    ).fetchone()
    assert sample is not None, "the sample issued nothing"
    profile, ca, cert_der, station = sample
    csr = make_devices(1, "X")[0][1]
    t_start = time.time() - TEN_YEARS_S  # ten years ago
    span = TEN_YEARS_S
    wos = (certs + per_wo - 1) // per_wo
    print(f"bulk: {certs} certificates in {wos} work orders, {per_cert:.3f} audit entries per certificate"
          f" (as the sample), {'outbox rows' if outbox else 'no outbox'} ...", flush=True)  # fmt: skip
    conn.execute("BEGIN")
    for w in range(wos):
        wid = f"WO-Y{w:06d}"
        qty = min(per_wo, certs - w * per_wo)
        at = t_start + span * w / wos
        conn.execute(
            "INSERT INTO work_order (id, product, quantity, consumed, state, created_at, activated_at, closed_at)"
            " VALUES (?, 'widget', ?, ?, 'closed', ?, ?, ?)",
            (wid, qty, qty, at, at, at + span / wos),
        )
        conn.execute("INSERT INTO work_order_line (work_order, line) VALUES (?, 'L1')", (wid,))
    conn.execute("COMMIT")
    chunk = 250_000
    t0 = time.perf_counter()
    for first in range(0, certs, chunk):
        n = min(chunk, certs - first)
        conn.execute("BEGIN")
        conn.execute(
            "WITH RECURSIVE c(x) AS (SELECT ?1 UNION ALL SELECT x + 1 FROM c WHERE x + 1 < ?1 + ?2)"
            " INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256, csr_sha256,"
            " cert_serial, tbs_sha256, state, cert_der, created_at, issued_at, confirmed_at)"
            " SELECT jg_request_id(x), ?3, ?4, ?5, printf('Y%08x-%06d', x / 1000000, x % 1000000),"
            " jg_key(x, 32), randomblob(32), jg_serial(x), randomblob(32), 'confirmed', ?6,"
            " ?7 + x * ?8, ?7 + x * ?8, ?7 + x * ?8 + 1 FROM c",
            (first, n, station, profile, ca, cert_der, t_start, span / certs),
        )
        last_id = conn.execute("SELECT MAX(id) FROM issuance").fetchone()[0]
        conn.execute(
            "INSERT INTO work_order_unit (work_order, device_serial, kind, issuance_id, created_at)"
            " SELECT printf('WO-Y%06d', (id - ?1) / ?2), device_serial, 'new', id, created_at FROM issuance"
            " WHERE id > ?3",
            (last_id - n + 1 - first, per_wo, last_id - n),
        )
        if outbox:
            conn.execute(
                "INSERT INTO outbox (kind, issuance_id, cert_serial, transaction_id, csr_der, request_der, state,"
                " attempts, next_attempt_at, upstream_cert_der, created_at, done_at)"
                " SELECT 'p10cr', id, cert_serial, jg_key(id - ?5, 16), ?1, zeroblob(?2), 'done', 1, created_at, ?3,"
                " created_at, created_at + 1 FROM issuance WHERE id > ?4",
                (csr, len(csr) + 600, cert_der, last_id - n, last_id - n + 1 - first),
            )
        conn.execute("COMMIT")
        done = first + n
        took = time.perf_counter() - t0
        print(f"  {done} certificates ({took:.0f} s, {done / took:.0f}/s)", flush=True)
    conn.execute("PRAGMA journal_mode=WAL")  # the product's mode, before anything else opens the journal
    conn.close()
    fill_audit(config, round(certs * per_cert), shapes, t_start, span)


def fill_audit(
    config: Config, entries: int, shapes: list[tuple[str, str, str]], t0: float, span: float
) -> None:
    """Append `entries` hash-chained audit entries, signing a checkpoint every CHECKPOINT_EVERY as the daemon
    does (the audit key in the HSM)."""
    with open_core(config) as core:
        key = ensure_audit_key(core.token)
        done = 0
        while done < entries:
            n = min(CHECKPOINT_EVERY - 1, entries - done)

            def txn(conn: sqlite3.Connection, n: int = n, done: int = done) -> None:
                seq, prev = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
                prev = bytes(prev)
                rows = []
                for k in range(n):
                    seq += 1
                    actor, event, data = shapes[(done + k) % len(shapes)]
                    at = t0 + span * (done + k) / entries
                    digest = entry_hash(seq, at, actor, event, data, prev)
                    rows.append((seq, at, actor, event, data, prev, digest))
                    prev = digest
                conn.executemany(
                    "INSERT INTO audit (seq, time, actor, event, data, prev_hash, hash) VALUES (?,?,?,?,?,?,?)",
                    rows,
                )

            core.journal.call(core.journal.transaction, txn, "bulk audit")
            core.audit.checkpoint(key)
            done += n
    print(f"  {entries} audit entries with a checkpoint every {CHECKPOINT_EVERY}", flush=True)


# -- measuring ------------------------------------------------------------------------------------------------


def ocsp_lookup_us(path: Path, ca: str, n: int = 2000) -> float:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    serials = [
        int(s, 16)
        for (s,) in conn.execute("SELECT cert_serial FROM issuance ORDER BY random() LIMIT ?", (n,))
    ]
    t0 = time.perf_counter()
    for s in serials:
        assert lookup_status(conn, ca, s).kind == "good"
    us = (time.perf_counter() - t0) / len(serials) * 1e6
    conn.close()
    return us


def cli_s(toml: Path, *argv: str, ok: tuple[int, ...] = (0,)) -> float:
    t0 = time.perf_counter()
    done = subprocess.run([*CLI, *argv, "--config", str(toml)], capture_output=True, check=False)
    elapsed = time.perf_counter() - t0
    if done.returncode not in ok:
        raise RuntimeError(
            f"birthline {' '.join(argv)} exited {done.returncode}: {done.stdout!r} {done.stderr!r}"
        )
    return elapsed


# `audit verify`: INTACT (0), or UNSIGNED TAIL (3, no problem) when the daemon was stopped before its checkpoint
VERIFIED = (0, 3)


async def daemon_start_s(toml: Path, port: int) -> float:
    t0 = time.perf_counter()
    proc = subprocess.Popen([*CLI, "run", "--config", str(toml)], stderr=subprocess.DEVNULL)
    try:
        await _wait_listening(port, proc, timeout=600)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(timeout=120)


def drop_cached(journal: Path) -> None:
    """Write the journal out and drop it from the page cache, as after a reboot.

    Without this, issuance on the freshly filled ten-million journal wrote 2.4 to 3.6 MB per certificate to
    storage (write_bytes), about ten times what SQLite passed to write(); with the file's cache dropped the two
    agree. Likely (not verified further) this kernel (6.18, ext4) caching the file in large folios, of which a
    4 KB write dirties, and writeback writes, the whole. A journal grown one commit at a time over years is not
    in the page cache as a bulk fill leaves it."""
    for path in (journal, journal.with_name(journal.name + "-wal")):
        if path.exists():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def measure(label: str, base: Path, toml: Path, config: Config, port: int, wo: str, tag: str, sample: int,
            ) -> dict[str, float]:  # fmt: skip
    journal = config.appliance.state_dir / "journal.sqlite"
    out: dict[str, float] = {}
    out["start_s"] = asyncio.run(daemon_start_s(toml, port))
    out["ocsp_us"] = ocsp_lookup_us(journal, config.issuance.issuing_ca)
    out["report_s"] = cli_s(toml, "report", "workorder", wo)
    out["export_s"] = cli_s(toml, "export", "workorder", wo, "--csv", str(base / f"{tag}.csv"))
    out["verify_s"] = cli_s(toml, "audit", "verify", ok=VERIFIED)
    out["upstream_s"] = cli_s(toml, "upstream", "status")
    # Incremental: from the checkpoint about VERIFY_SINCE_ENTRIES entries before the head (as if the last full
    # verification had been made then), that checkpoint's signature verified again.
    with contextlib.closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as conn:
        head = conn.execute("SELECT MAX(seq) FROM audit").fetchone()[0]
        since = conn.execute(
            "SELECT MIN(seq) FROM audit_checkpoint WHERE seq >= ?", (head - VERIFY_SINCE_ENTRIES,)
        ).fetchone()[0]
    out["verify_since_s"] = cli_s(toml, "audit", "verify", "--since-checkpoint", str(since), ok=VERIFIED)
    out["verify_since_entries"] = head - since + 1
    with contextlib.closing(sqlite3.connect(journal)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        out["certs"] = conn.execute("SELECT COUNT(*) FROM issuance").fetchone()[0]
        out["audit"] = conn.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
        for name, plan, scans in plans(conn):
            print(f"  [{label}] plan {name}: {plan}{'   <-- FULL SCAN' if scans else ''}")
    out["bytes"] = sum(p.stat().st_size for p in journal.parent.glob("journal.sqlite*"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument(
        "--certs", type=int, default=1_000_000, help="certificates to add in bulk (10000000: ten years)"
    )
    ap.add_argument("--per-work-order", type=int, default=10_000)
    ap.add_argument("--sample", type=int, default=3000, help="certificates issued through the core per rate")
    ap.add_argument(
        "--no-outbox", action="store_true", help="no outbox rows (a plant without an upstream CA)"
    )
    ap.add_argument("--rounds", type=int, default=3, help="alternated issuance rounds per journal (median)")
    ap.add_argument("--keep", type=Path, help="keep the filled appliance in this directory")
    ap.add_argument(
        "--measure-kept",
        type=Path,
        metavar="DIR",
        help="measure a kept appliance (a birthline-growth-* directory of an earlier --keep run) instead of"
        " building one; if that run was stopped during the bulk fill, its certificates' audit entries are"
        " added first. Its empty copy (state-empty) is replaced by state-empty-pristine first (made by the"
        " --keep run, or from state-empty by the first --measure-kept of an older kept run)",
    )
    ap.add_argument(
        "--rounds-only",
        action="store_true",
        help="with --measure-kept: only the alternated issuance rounds (right after a page-cache drop, without"
        " the prewarm, then after the daemon's prewarm)",
    )
    args = ap.parse_args()
    if args.measure_kept is not None:
        return measure_kept(args)
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="birthline-growth-", dir=args.keep)
    base = Path(tmp)
    try:
        port = _free_port()
        config = _config(base, port)
        toml = base / "birthline.toml"
        _setup(config, base, 0, 1)
        with contextlib.closing(sqlite3.connect(config.appliance.state_dir / "journal.sqlite")) as conn, conn:
            conn.execute(
                "UPDATE work_order SET quantity = ? WHERE id = 'WO-BENCH'", (args.certs + 10 * args.sample,)
            )
        issue_sample(config, args.sample, "W")  # the rows the bulk copies the shape of; warms the token
        empty = measure("empty", base, toml, config, port, "WO-BENCH", "E", args.sample)
        # A copy of the empty appliance's state, to alternate issuance rounds with the full one afterwards.
        shutil.copytree(config.appliance.state_dir, base / "state-empty")
        if args.keep is not None:
            keep_pristine(base / "state-empty")
        toml_empty = base / "birthline-empty.toml"
        toml_empty.write_text(toml.read_text().replace(f"{base}/state", f"{base}/state-empty"))
        config_empty = load_config(toml_empty)
        t0 = time.perf_counter()
        fill(
            config,
            config.appliance.state_dir / "journal.sqlite",
            args.certs,
            args.per_work_order,
            not args.no_outbox,
        )
        print(f"bulk fill took {time.perf_counter() - t0:.0f} s", flush=True)
        drop_cached(config.appliance.state_dir / "journal.sqlite")
        full = measure("full", base, toml, config, port, "WO-Y000000", "F", args.sample)
        issuance_rounds(args, config_empty, config, empty, full)
    finally:
        if args.keep is None:
            shutil.rmtree(tmp, ignore_errors=True)
    report(empty, full)
    return 0


def alternate_rounds(
    args: argparse.Namespace, config_empty: Config, config: Config
) -> tuple[dict[str, float], dict[str, float]]:
    """Issuance on each journal, alternated (empty, full, empty, ...): this machine's load drifts. Returns the
    medians: {"rate": certificates/s, "written": bytes written per certificate} for the empty and the full one."""
    rounds: dict[str, list[float]] = {"empty": [], "full": []}
    written: dict[str, list[float]] = {"empty": [], "full": []}
    for i in range(args.rounds):
        for name, cfg in (("empty", config_empty), ("full", config)):
            rounds[name].append(issue_sample(cfg, args.sample, f"R{i}{name[0].upper()}"))
            written[name].append(WRITTEN[-1])
    shown = {k: ", ".join(f"{r:.0f}" for r in v) for k, v in rounds.items()}
    print(f"issuance rounds (certificates/s): empty {shown['empty']}; full {shown['full']}", flush=True)
    empty, full = ({"rate": statistics.median(rounds[k]), "written": statistics.median(written[k])}
                   for k in ("empty", "full"))  # fmt: skip
    return empty, full


def issuance_rounds(
    args: argparse.Namespace,
    config_empty: Config,
    config: Config,
    empty: dict[str, float],
    full: dict[str, float],
) -> None:
    """The issuance rate on each journal twice. First right after a page-cache drop of both journals, as after a
    reboot, without the prewarm ("cold": near what a daemon meets in its first seconds after a start, before its
    prewarm has read much; the small journal is read back within its first round). Then, after another drop of
    the full journal, after the read of the public-key index that a started daemon runs in the background
    (appliance/issuance/prewarm.py, [journal] prewarm): the rate of a running daemon, the figure for the goal."""
    path = config.appliance.state_dir / "journal.sqlite"
    empty_path = config_empty.appliance.state_dir / "journal.sqlite"
    held = []
    for p in (empty_path, path):
        with contextlib.closing(sqlite3.connect(f"file:{p}?mode=ro", uri=True)) as conn:
            held.append(conn.execute("SELECT MAX(id) FROM issuance").fetchone()[0])
    print(
        f"issuance rounds: the empty journal holds {held[0]} certificates, the full one {held[1]}", flush=True
    )
    # A restored or copied journal is otherwise still in the page cache (large folios: see drop_cached).
    drop_cached(empty_path)
    drop_cached(path)
    cold_empty, cold_full = alternate_rounds(args, config_empty, config)
    empty["cold_rate"], full["cold_rate"] = cold_empty["rate"], cold_full["rate"]
    print(
        f"  right after a start, without the prewarm (page cache dropped): issuance rate on the full journal"
        f" {cold_full['rate'] / cold_empty['rate']:.0%} of the empty one; bytes written per certificate"
        f" {cold_empty['written']:.0f} -> {cold_full['written']:.0f}",
        flush=True,
    )
    drop_cached(path)
    done = JournalPrewarm(path).read()
    print(f"prewarm (the daemon's, after a start): {done.keys} keys in {done.seconds:.1f} s"
          f"{'; skipped: ' + done.skipped if done.skipped else ''}", flush=True)  # fmt: skip
    empty["prewarm_s"], full["prewarm_s"] = 0.0, (math.nan if done.skipped else done.seconds)
    warm_empty, warm_full = alternate_rounds(args, config_empty, config)
    empty["rate"], full["rate"] = warm_empty["rate"], warm_full["rate"]
    empty["written"], full["written"] = warm_empty["written"], warm_full["written"]
    print(
        f"  after the prewarm: issuance rate on the full journal {full['rate'] / empty['rate']:.0%} of the empty"
        f" one (goal >= 80%); bytes written per certificate {empty['written']:.0f} -> {full['written']:.0f}",
        flush=True,
    )


def keep_pristine(state_dir: Path) -> Path:
    """A copy of the empty journal's state as it is now (state-empty-pristine beside it), made once: every
    measurement issues certificates into the empty copy too, and each --measure-kept run starts again from this,
    so that repeated runs compare with the same small journal. Copied under a temporary name, then renamed: an
    interrupted copy is never taken for a whole one."""
    pristine = state_dir.with_name("state-empty-pristine")
    if not pristine.exists():
        partial = state_dir.with_name("state-empty-pristine.partial")
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(state_dir, partial)
        partial.rename(pristine)
    return pristine


def measure_kept(args: argparse.Namespace) -> int:
    """--measure-kept: the empty copy and the full journal of a kept run, measured as a whole run measures them.
    A run stopped during the bulk fill kept the 100,000-certificate chunks it committed, without their audit
    entries (the audit fill comes last): those are added first, as fill() would have (a checkpoint every
    CHECKPOINT_EVERY entries, signed in the HSM). The empty copy (state-empty) is first put back as the whole
    run left it before its rounds (state-empty-pristine, see keep_pristine)."""
    base = args.measure_kept.resolve()
    toml, toml_empty = base / "birthline.toml", base / "birthline-empty.toml"
    config, config_empty = load_config(toml), load_config(toml_empty)
    port = int(re.search(r'lan_listen = "127\.0\.0\.1:(\d+)"', toml.read_text()).group(1))  # type: ignore[union-attr]
    state_empty = config_empty.appliance.state_dir
    if not (base / "state-empty-pristine").exists():
        # A kept run from before keep_pristine(): its empty copy may have grown by earlier runs' rounds.
        print(
            "no state-empty-pristine: taking the empty copy as it is now as the one to start from", flush=True
        )
    pristine = keep_pristine(state_empty)
    shutil.rmtree(state_empty, ignore_errors=True)
    shutil.copytree(pristine, state_empty)
    empty_path = config_empty.appliance.state_dir / "journal.sqlite"
    full_path = config.appliance.state_dir / "journal.sqlite"
    per_cert, shapes = audit_shapes(empty_path)
    counts = {}
    for name, path in (("empty", empty_path), ("full", full_path)):
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            counts[name] = conn.execute(
                "SELECT (SELECT MAX(id) FROM issuance), (SELECT MAX(seq) FROM audit)"
            ).fetchone()
    bulk = counts["full"][0] - counts["empty"][0]  # the bulk rows follow the sample's ids
    audit_bulk = counts["full"][1] - counts["empty"][1]
    want = round(bulk * per_cert)
    print(
        f"kept run {base}: {bulk} certificates more than the empty copy (the bulk fill's and earlier runs'),"
        f" {audit_bulk} of their {want} audit entries",
        flush=True,
    )
    if audit_bulk < want // 2:  # the fill was stopped before its audit entries
        t0 = time.perf_counter()
        fill_audit(config, want, shapes, time.time() - TEN_YEARS_S, TEN_YEARS_S)
        print(f"audit fill took {time.perf_counter() - t0:.0f} s", flush=True)
    empty: dict[str, float] = {}
    full: dict[str, float] = {}
    if args.rounds_only:
        # Nothing else first: the first rounds meet the full journal as a daemon does right after a reboot.
        issuance_rounds(args, config_empty, config, empty, full)
        return 0
    drop_cached(full_path)
    full = measure("full", base, toml, config, port, "WO-Y000000", f"KF{time.time():.0f}", args.sample)
    empty = measure(
        "empty", base, toml_empty, config_empty, port, "WO-BENCH", f"KE{time.time():.0f}", args.sample
    )
    issuance_rounds(args, config_empty, config, empty, full)
    report(empty, full)
    return 0


def report(empty: dict[str, float], full: dict[str, float]) -> None:
    added = full["certs"] - empty["certs"]
    print(f"\njournal: {empty['certs']:.0f} -> {full['certs']:.0f} certificates, {empty['audit']:.0f} ->"
          f" {full['audit']:.0f} audit entries; machine: {os.cpu_count()} cores")  # fmt: skip
    rows = (
        ("issuance rate, prewarmed (cert/s)", "rate", "{:.0f}"),
        ("  right after a start (cold)", "cold_rate", "{:.0f}"),
        ("bytes written a cert., prewarmed", "written", "{:.0f}"),
        ("OCSP cold lookup (us)", "ocsp_us", "{:.1f}"),
        ("report workorder (s)", "report_s", "{:.2f}"),
        ("export workorder --csv (s)", "export_s", "{:.2f}"),
        ("audit verify (s)", "verify_s", "{:.2f}"),
        ("upstream status (s)", "upstream_s", "{:.2f}"),
        ("audit verify --since-checkpoint (s)", "verify_since_s", "{:.2f}"),
        ("daemon start (s)", "start_s", "{:.2f}"),
    )
    print(f"  {'':34s} {'empty':>10s} {'full':>10s} {'full/empty':>10s}")
    for name, key, fmt in rows:
        print(
            f"  {name:34s} {fmt.format(empty[key]):>10s} {fmt.format(full[key]):>10s} {full[key] / empty[key]:10.2f}"
        )
    prewarmed = (
        "after the prewarm skipped itself (see above)"
        if math.isnan(full["prewarm_s"])
        else f"once the daemon's prewarm has read the key index ({full['prewarm_s']:.1f} s after a start)"
    )
    print(
        f"  issuance rate on the full journal: {full['rate'] / empty['rate']:.0%} of the empty one {prewarmed}"
        f" (goal >= 80%); {full['cold_rate'] / empty['cold_rate']:.0%} right after a start without the prewarm"
    )
    print(f"  journal bytes per certificate: {(full['bytes'] - empty['bytes']) / added:.0f}"
          f" (full journal {full['bytes'] / 1e9:.2f} GB)")  # fmt: skip
    print(f"  audit verify --since-checkpoint read {empty['verify_since_entries']:.0f} / {full['verify_since_entries']:.0f}"
          f" entries of {empty['audit']:.0f} / {full['audit']:.0f}")  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
