"""Verify the audit log (in the journal, or an exported JSON Lines file) and export it for auditors.

verify() recomputes the whole chain from genesis (or, with since_checkpoint, from a checkpoint an earlier
verification found good: see there) and reports every problem it finds, each with the entry's seq and what is
wrong: edited entries, deleted or reordered entries, a chain re-hashed after an edit (caught by a
signed checkpoint, or by the auditor's copy of the head), checkpoints re-signed with another key (caught by
the recorded, and ideally pinned, audit public key), checkpoints the log claims but no longer holds, an
unsigned run longer than the log promises, and a truncated tail (caught by the auditor's head). It also says
how far signatures cover the log: INTACT only when every entry is covered. Verification needs no HSM: only the
audit public key.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TextIO

from cryptography.hazmat.primitives.asymmetric import ec

from appliance.audit.claims import EVENT_CHECKPOINT, Claim, parse_claim
from appliance.audit.encoding import GENESIS_HASH, HASH_SIZE, canonical_json, entry_hash, key_fingerprint
from appliance.audit.log import AuditEntry, AuditError, Checkpoint, Head, load_public_key
from appliance.files import check_write_target
from appliance.issuance.journal import Journal
from appliance.text import load_json

EXPORT_FORMAT = "birthline-audit-export"
EXPORT_VERSION = 1
MOVE_WINDOW = 8  # how far either side a moved entry is looked for, to name its original seq

# Problem kinds (stable strings: the CLI prints them and auditors may grep for them).
MALFORMED = "malformed"
OUT_OF_ORDER = "out-of-order"
MISSING = "missing"
EDITED = "edited"
MOVED = "moved"
CHAIN_BROKEN = "chain-broken"
NON_CANONICAL = "non-canonical"
CHECKPOINT_MISMATCH = "checkpoint-mismatch"
CHECKPOINT_SIGNATURE = "checkpoint-signature"
CHECKPOINT_KEY = "checkpoint-key"
KEY_MISMATCH = "key-mismatch"
TRUNCATED = "truncated"
HEAD_MISMATCH = "head-mismatch"
EXPORT_HEAD = "export-head"
CHECKPOINT_MISSING = "checkpoint-missing"
OVERDUE = "unsigned-overdue"
PROBLEM_KINDS = (
    MALFORMED, OUT_OF_ORDER, MISSING, EDITED, MOVED, CHAIN_BROKEN, NON_CANONICAL, CHECKPOINT_MISMATCH,
    CHECKPOINT_SIGNATURE, CHECKPOINT_KEY, KEY_MISMATCH, TRUNCATED, HEAD_MISMATCH, EXPORT_HEAD,
    CHECKPOINT_MISSING, OVERDUE,
)  # fmt: skip

# The verdicts (`birthline audit verify` exits 0, 3 and 1 for them).
INTACT = "intact"  # no problem, and every entry is covered by a checkpoint signature
UNSIGNED_TAIL = "unsigned-tail"  # no problem, but the last entries are covered by no signature (yet)
NOT_INTACT = "not-intact"  # at least one problem


@dataclass(frozen=True)
class AuditProblem:
    seq: int | None  # the entry (or checkpoint) concerned; None for the log as a whole
    kind: str
    message: str

    def __str__(self) -> str:
        where = "log" if self.seq is None else f"seq {self.seq}"
        return f"{where}: {self.kind}: {self.message}"


@dataclass
class VerifyReport:
    source: str
    entries: int = 0
    head: Head = (0, GENESIS_HASH)  # the last entry as stored: (seq, hash)
    checkpoints: int = 0
    last_good_checkpoint: int | None = None  # highest checkpoint whose signature and hash both hold
    claims: int = 0  # audit.checkpoint entries in the chain
    chained_since: int | None = None  # the first of them; checkpoints before it were not chained
    signed_through: int = 0  # entries 1..signed_through are covered by a good signature
    unsigned: tuple[int, int] | None = None  # (first, last) entries no signature covers
    unsigned_span_s: float | None = None  # entry time of the last minus the first of them
    policy: dict[str, Any] | None = None  # the bound on unsigned entries the log states (stated_at, max_...)
    key_fingerprints: dict[str, str] = field(default_factory=dict)  # label -> SHA-256 of SPKI, hex
    pinned: bool = False
    since_checkpoint: int | None = None  # incremental: entries before this checkpoint's seq were not checked
    problems: list[AuditProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No problem found: the chain and every claim the log makes hold (entries may still be unsigned)."""
        return not self.problems

    @property
    def intact(self) -> bool:
        """No problem, and every entry is covered by a checkpoint signature."""
        return self.ok and self.unsigned is None

    @property
    def status(self) -> str:
        return NOT_INTACT if self.problems else (UNSIGNED_TAIL if self.unsigned is not None else INTACT)

    def problem(self, seq: int | None, kind: str, message: str) -> None:
        self.problems.append(AuditProblem(seq, kind, message))

    def text(self) -> str:
        seq, digest = self.head
        verdict = {INTACT: "INTACT", UNSIGNED_TAIL: "UNSIGNED TAIL", NOT_INTACT: "NOT INTACT"}[self.status]
        lines = [
            f"{self.source}: {verdict}"
            + ("" if self.since_checkpoint is None else f" (checked from seq {self.since_checkpoint} on)"),
            f"  entries {self.entries}, head seq {seq} hash {digest.hex()}",
            f"  checkpoints {self.checkpoints}, last good checkpoint "
            + ("none" if self.last_good_checkpoint is None else f"seq {self.last_good_checkpoint}")
            + (
                f"; {self.claims} chained into the log since seq {self.chained_since}"
                if self.chained_since is not None
                else "; none chained into the log"
            ),
        ]
        if self.since_checkpoint is not None:
            lines.append(
                f"  incremental: entries before seq {self.since_checkpoint} were NOT checked; they are trusted"
                f" through the checkpoint at seq {self.since_checkpoint}, whose signature was verified again"
            )
        if self.unsigned is None:
            lines.append(f"  signed through seq {self.signed_through}: every entry is covered by a signature")
        else:
            first, last = self.unsigned
            bound = (
                "no bound stated"
                if self.policy is None
                else f"the log allows {self.policy['max_unsigned_entries']} entries and"
                f" {self.policy['max_unsigned_s']:g} s"
            )
            lines.append(
                f"  signed through seq {self.signed_through}; entries {first}..{last} are covered by NO signature"
                f" ({last - first + 1} entries over {self.unsigned_span_s or 0.0:.0f} s; {bound})"
            )
        for label, fp in sorted(self.key_fingerprints.items()):
            lines.append(
                f"  audit key {label!r} sha256 {fp}{' (pinned)' if self.pinned else ' (NOT pinned)'}"
            )
        lines += [f"  warning: {w}" for w in self.warnings]
        if self.problems:
            lines.append(f"  {len(self.problems)} problem(s):")
            lines += [f"    {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True)
class Malformed:
    seq: int | None
    reason: str


class AuditSource(Protocol):
    name: str

    def keys(self) -> dict[str, bytes]: ...
    def checkpoints(self, since: int = 0) -> list[Checkpoint | Malformed]: ...
    def entries(self, since: int = 0) -> Iterator[AuditEntry | Malformed]: ...
    def head_record(self) -> dict[str, Any] | None: ...


def _entry(row: tuple[Any, ...]) -> AuditEntry | Malformed:
    seq = row[0] if isinstance(row[0], int) else None
    try:
        if not isinstance(row[0], int) or not isinstance(row[1], float | int):
            raise TypeError("seq or time has the wrong type")
        if not all(isinstance(v, str) for v in row[2:5]) or not all(isinstance(v, bytes) for v in row[5:7]):
            raise TypeError("actor, event, data or a hash has the wrong type")
        if len(row[5]) != HASH_SIZE or len(row[6]) != HASH_SIZE:
            raise ValueError("a hash is not 32 bytes")
        return AuditEntry.from_row(row)
    except (TypeError, ValueError) as exc:
        return Malformed(seq, str(exc))


def _checkpoint(row: tuple[Any, ...]) -> Checkpoint | Malformed:
    seq = row[0] if isinstance(row[0], int) else None
    try:
        if not isinstance(row[1], bytes) or len(row[1]) != HASH_SIZE or not isinstance(row[4], bytes):
            raise ValueError("head hash or signature malformed")
        return Checkpoint.from_row(row)
    except (TypeError, ValueError) as exc:
        return Malformed(seq, str(exc))


class SqliteSource:
    """The live tables; use inside one read transaction (a consistent WAL snapshot), on the journal thread."""

    def __init__(self, conn: sqlite3.Connection, name: str) -> None:
        self.conn = conn
        self.name = name

    def keys(self) -> dict[str, bytes]:
        return {str(r[0]): bytes(r[1]) for r in self.conn.execute("SELECT label, public_key FROM audit_key")}

    def checkpoints(self, since: int = 0) -> list[Checkpoint | Malformed]:
        """The checkpoint rows from seq `since` on (all by default); a row whose seq is not an integer is kept."""
        cur = self.conn.execute(
            f"SELECT {Checkpoint.COLUMNS} FROM audit_checkpoint WHERE NOT (typeof(seq) = 'integer' AND seq < ?)"
            " ORDER BY seq",
            (since,),
        )
        return [_checkpoint(r) for r in cur]

    def entries(self, since: int = 0) -> Iterator[AuditEntry | Malformed]:
        """The entries from seq `since` on, in seq order (a range of the rowid b-tree: no scan of the rest)."""
        sql = (
            f"SELECT {AuditEntry.COLUMNS} FROM audit" + (" WHERE seq >= ?" if since else "") + " ORDER BY seq"
        )
        for row in self.conn.execute(sql, (since,) if since else ()):
            yield _entry(row)

    def head_record(self) -> dict[str, Any] | None:
        return None


def _unhex(value: Any) -> bytes:
    if not isinstance(value, str):
        raise TypeError("expected a hex string")
    return bytes.fromhex(value)


class ExportSource:
    """An exported JSON Lines file (see export()); read again for every pass."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = str(path)
        self.bad_lines: list[Malformed] = []
        self._keys: dict[str, bytes] = {}
        self._checkpoints: list[Checkpoint | Malformed] = []
        self._head: dict[str, Any] | None = None
        self._header = False
        for lineno, rec in self._records():
            kind = rec.get("type")
            try:
                if kind == "header":
                    if rec.get("format") != EXPORT_FORMAT or rec.get("version") != EXPORT_VERSION:
                        raise ValueError(f"not a {EXPORT_FORMAT} v{EXPORT_VERSION} file")
                    self._header = True
                elif kind == "key":
                    self._keys[str(rec["label"])] = _unhex(rec["public_key"])
                elif kind == "checkpoint":
                    self._checkpoints.append(
                        _checkpoint(
                            (
                                rec["seq"],
                                _unhex(rec["head_hash"]),
                                rec["time"],
                                rec["key_label"],
                                _unhex(rec["signature"]),
                            )
                        )
                    )
                elif kind == "head":
                    self._head = rec
                elif kind == "unparseable":
                    raise ValueError(rec["error"])
                elif kind != "entry":
                    raise ValueError(f"unknown record type {kind!r}")
            except (KeyError, TypeError, ValueError) as exc:
                self.bad_lines.append(Malformed(None, f"line {lineno}: {type(exc).__name__}: {exc}"))
        if not self._header:
            self.bad_lines.append(Malformed(None, f"no {EXPORT_FORMAT} header line"))

    def _records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        with self.path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = load_json(line)
                except ValueError as exc:
                    rec = {"type": "unparseable", "error": str(exc)}
                if not isinstance(rec, dict):
                    rec = {"type": "unparseable", "error": "not a JSON object"}
                yield lineno, rec

    def keys(self) -> dict[str, bytes]:
        return dict(self._keys)

    def checkpoints(self, since: int = 0) -> list[Checkpoint | Malformed]:
        kept = [c for c in self._checkpoints if c.seq is None or c.seq >= since]
        return sorted(kept, key=lambda c: -1 if c.seq is None else c.seq)

    def entries(self, since: int = 0) -> Iterator[AuditEntry | Malformed]:
        for lineno, rec in self._records():
            if rec.get("type") != "entry":
                continue
            if since and isinstance(rec.get("seq"), int) and rec["seq"] < since:
                continue
            try:
                row = (
                    rec["seq"],
                    rec["time"],
                    rec["actor"],
                    rec["event"],
                    rec["data"],
                    _unhex(rec["prev_hash"]),
                    _unhex(rec["hash"]),
                )
            except (KeyError, TypeError, ValueError) as exc:
                seq = rec.get("seq")
                yield Malformed(seq if isinstance(seq, int) else None, f"line {lineno}: {exc}")
                continue
            yield _entry(row)

    def head_record(self) -> dict[str, Any] | None:
        return self._head


PublicKeyPin = ec.EllipticCurvePublicKey | bytes  # the key itself, or SHA-256 of its SPKI DER (32 bytes)


def verify(
    source: Journal | Path | str,
    *,
    expected_head: Head | None = None,
    public_key: PublicKeyPin | None = None,
    since_checkpoint: int | None = None,
) -> VerifyReport:
    """Recompute the chain from genesis and check every checkpoint; report every problem found.

    source: the journal, or the path of an exported file. expected_head: the (seq, hash) an auditor kept from
    an earlier `audit head` or export; the log must still contain that seq with that hash (truncation, or a
    rewrite after it). public_key: the auditor's pinned audit key (or its SPKI SHA-256); without it the key
    recorded in the log is trusted, and the report warns.

    since_checkpoint: incremental verification from the checkpoint at that seq, one an earlier verification of
    this log found good (its `last_good_checkpoint`). Its signature is verified again (pinned key, else the
    recorded one) and its entry must still hash to the signed head; from there the chain, the later checkpoints
    and claims, the coverage and the expected head are checked exactly as a full verification does. Entries
    BEFORE it are not read: an edit there that leaves the stored hashes alone is not seen (one that re-hashes
    the chain through the checkpoint's entry is: that entry's hash is no longer the signed one). A full
    verification stays the auditor's check; this one is the cheap periodic one between them.
    """
    if since_checkpoint is not None:
        if since_checkpoint < 1:
            raise ValueError("since_checkpoint is the seq of a signed entry (1 or more)")
        if expected_head is not None and expected_head[0] < since_checkpoint:
            raise ValueError(
                f"the expected head (seq {expected_head[0]}) is before the checkpoint the verification starts"
                f" from (seq {since_checkpoint}): it cannot be checked incrementally"
            )
    if isinstance(source, Journal):
        journal = source

        def run() -> VerifyReport:
            conn = journal.conn
            conn.execute("BEGIN")  # one snapshot for every pass
            try:
                return _verify(
                    SqliteSource(conn, str(journal.path)), expected_head, public_key, since_checkpoint
                )
            finally:
                conn.execute("COMMIT")

        try:
            return journal.call(run)
        except sqlite3.Error as exc:
            raise AuditError(f"audit log cannot be read: {exc}") from exc
    exported = ExportSource(Path(source))
    report = _verify(exported, expected_head, public_key, since_checkpoint)
    for bad in exported.bad_lines:
        report.problem(bad.seq, MALFORMED, bad.reason)
    return report


def _verify(
    source: AuditSource, expected_head: Head | None, pin: PublicKeyPin | None, since: int | None = None
) -> VerifyReport:
    report = VerifyReport(source.name, pinned=pin is not None, since_checkpoint=since)
    pin_fp = None if pin is None else (pin if isinstance(pin, bytes) else key_fingerprint(pin))
    if pin_fp is not None and len(pin_fp) != HASH_SIZE:
        raise ValueError("a public key fingerprint is the 32-byte SHA-256 of the SubjectPublicKeyInfo DER")

    # Keys: the recorded audit public keys, checked against the auditor's pin.
    keys: dict[str, ec.EllipticCurvePublicKey | None] = {}
    for label, der in sorted(source.keys().items()):
        fp = key_fingerprint(der)
        report.key_fingerprints[label] = fp.hex()
        if pin_fp is not None and fp != pin_fp:
            report.problem(
                None,
                KEY_MISMATCH,
                f"the audit key recorded as {label!r} (sha256 {fp.hex()}) is not the pinned key"
                f" (sha256 {pin_fp.hex()}): checkpoints signed with it prove nothing",
            )
            keys[label] = None
            continue
        try:
            keys[label] = load_public_key(der)
        except ValueError as exc:
            report.problem(None, MALFORMED, f"audit key {label!r}: {exc}")
            keys[label] = None
    if pin is None:
        report.warnings.append(
            "no pinned audit public key: the key recorded in the log was trusted; pass the auditor's copy"
            " (--public-key) so a forger who replaced key and signatures is caught"
        )

    # Checkpoint signatures first (they need no entries).
    want: dict[int, Checkpoint] = {}
    good_sig: dict[int, bytes] = {}  # seq -> fingerprint of the key that verified it
    for cp in source.checkpoints(since or 0):
        report.checkpoints += 1
        if isinstance(cp, Malformed):
            report.problem(cp.seq, MALFORMED, f"checkpoint: {cp.reason}")
            continue
        want[cp.seq] = cp
        key = pin if isinstance(pin, ec.EllipticCurvePublicKey) else keys.get(cp.key_label)
        if key is None:
            why = "is not recorded" if cp.key_label not in keys else "is not usable (see above)"
            report.problem(
                cp.seq, CHECKPOINT_KEY, f"checkpoint signed with key {cp.key_label!r}, which {why}"
            )
        elif cp.verifies_with(key):
            good_sig[cp.seq] = key_fingerprint(key)
        else:
            report.problem(
                cp.seq,
                CHECKPOINT_SIGNATURE,
                f"checkpoint signature does not verify with the {'pinned' if pin is not None else 'recorded'}"
                f" audit key {cp.key_label!r}: re-signed with another key, or altered",
            )
        if cp.seq == 0 and cp.head_hash != GENESIS_HASH:
            report.problem(0, CHECKPOINT_MISMATCH, "checkpoint of the empty log has a non-zero head hash")

    if since is not None and since not in want:
        report.problem(
            since,
            CHECKPOINT_MISSING,
            f"no checkpoint at seq {since}, the one this verification was to start from: checkpoints were"
            " deleted (or it never was one: take last_good_checkpoint from an earlier verification)",
        )

    # The chain, streamed from genesis (or from the trusted checkpoint's entry); claims collected on the way.
    prev_seq, prev_hash = 0, GENESIS_HASH
    # Incremental: the checkpoint's own entry comes first and its prev_hash is taken as stored (its hash, which
    # covers prev_hash, is what the checkpoint signed).
    anchor: int | None = since
    # Stored hashes at checkpoint seqs, claims and the expected head.
    seen: dict[int, bytes] = {0: GENESIS_HASH}
    interesting = set(want) | ({expected_head[0]} if expected_head else set())
    first_after = {seq + 1 for seq in want} | {
        1 if since is None else since
    }  # where an unsigned run can start
    times: dict[int, float] = {}
    claims: dict[int, Claim | None] = {}  # None: a claim whose data is not what the appliance writes
    last_time = 0.0
    for e in source.entries(since or 0):
        if isinstance(e, Malformed):
            report.problem(e.seq, MALFORMED, f"entry: {e.reason}")
            continue
        report.entries += 1
        if anchor is not None:
            prev_seq, prev_hash, anchor = anchor - 1, e.prev_hash, None  # a missing anchor is a gap below
        if e.seq <= prev_seq:
            report.problem(
                e.seq, OUT_OF_ORDER, f"entry {e.seq} comes after entry {prev_seq}: duplicated or reordered"
            )
            _check_entry(report, e)
            continue
        if e.seq > prev_seq + 1:
            first, last = prev_seq + 1, e.seq - 1
            span = f"entry {first}" if first == last else f"entries {first}..{last}"
            report.problem(
                first, MISSING, f"{span} missing: the log jumps from {prev_seq} to {e.seq} (deleted)"
            )
        elif e.prev_hash != prev_hash:
            report.problem(
                e.seq,
                CHAIN_BROKEN,
                f"prev_hash {e.prev_hash.hex()[:16]}... is not the hash of entry {prev_seq}"
                f" ({prev_hash.hex()[:16]}...): an entry before it was re-hashed, removed or inserted",
            )
        _check_entry(report, e)
        if e.event == EVENT_CHECKPOINT:
            try:
                claims[e.seq] = parse_claim(e.seq, e.data)
            except ValueError as exc:
                claims[e.seq] = None
                report.problem(e.seq, MALFORMED, f"checkpoint claim: {exc}")
            seen[e.seq] = e.hash
        if e.seq in interesting:
            seen[e.seq] = e.hash
        if e.seq in first_after:
            times[e.seq] = e.time
        prev_seq, prev_hash, last_time = e.seq, e.hash, e.time
    report.head = (prev_seq, prev_hash)
    report.claims = len(claims)
    report.chained_since = min(claims, default=None)

    # Checkpoint signatures against the chain.
    good: set[int] = set()
    for seq, cp in sorted(want.items()):
        stored = seen.get(seq)
        if stored is None:
            where = "beyond the end of the log" if seq > prev_seq else "missing from the log"
            report.problem(
                seq,
                TRUNCATED,
                f"a checkpoint signed entry {seq}, which is {where} (entries deleted or truncated)",
            )
        elif stored != cp.head_hash:
            report.problem(
                seq,
                CHECKPOINT_MISMATCH,
                f"entry {seq} hash {stored.hex()[:16]}... is not the signed head {cp.head_hash.hex()[:16]}...:"
                " the log was rewritten after this checkpoint",
            )
        elif seq in good_sig:
            good.add(seq)
    report.last_good_checkpoint = max(good, default=None)

    # The log's own claims: every claim but the last must have its signature, made with the key it names.
    last_claim = max(claims, default=None)
    for seq, claim in sorted(claims.items()):
        if seq not in want:
            if seq != last_claim:
                report.problem(
                    seq,
                    CHECKPOINT_MISSING,
                    f"entry {seq} claims a checkpoint whose signature is not in the log: checkpoints were"
                    " deleted (a later claim is only written once the earlier one is signed)",
                )
        elif claim is not None and seq in good and good_sig[seq] != claim.key_sha256:
            report.problem(
                seq,
                CHECKPOINT_KEY,
                f"the claim names audit key sha256 {claim.key_sha256.hex()[:16]}... but its signature verifies"
                f" with sha256 {good_sig[seq].hex()[:16]}...: key and signatures were replaced",
            )

    # Coverage: a good signature covers its entry and, through the chain, every entry before it.
    signed = report.last_good_checkpoint or (0 if since is None else since - 1)
    report.signed_through = signed
    stated = max((c for c in good if claims.get(c) is not None), default=None)
    policy = None if stated is None else claims[stated]
    if policy is not None:
        report.policy = {
            "stated_at": policy.seq,
            "max_unsigned_entries": policy.max_unsigned_entries,
            "max_unsigned_s": policy.max_unsigned_s,
        }
    if prev_seq > signed:
        count = prev_seq - signed
        age = max(0.0, last_time - times.get(signed + 1, last_time))
        report.unsigned = (signed + 1, prev_seq)
        report.unsigned_span_s = age
        if policy is not None and (count > policy.max_unsigned_entries or age > policy.max_unsigned_s):
            report.problem(
                signed + 1,
                OVERDUE,
                f"entries {signed + 1}..{prev_seq} ({count} entries written over {age:.0f} s) are covered by"
                f" no signature; the claim at seq {policy.seq} promises at most {policy.max_unsigned_entries}"
                f" entries and {policy.max_unsigned_s:g} s unsigned: checkpoints were removed with the entries"
                f" after seq {signed} rewritten, or the appliance failed to checkpoint",
            )
    if not claims:
        report.warnings.append(
            "no checkpoint is chained into this log (a log written before Birthline chained them): removing"
            " checkpoint rows cannot be detected, and no bound on unsigned entries is stated"
        )

    # The auditor's head, kept outside the appliance.
    if expected_head is not None:
        seq, digest = expected_head
        stored = seen.get(seq)
        if stored is None:
            report.problem(
                seq,
                TRUNCATED,
                f"the auditor's head is entry {seq} but the log "
                + (f"ends at {prev_seq}: the tail was truncated" if seq > prev_seq else "no longer has it"),
            )
        elif stored != digest:
            report.problem(
                seq,
                HEAD_MISMATCH,
                f"entry {seq} hash {stored.hex()[:16]}... is not the auditor's head {digest.hex()[:16]}...:"
                " the log was rewritten",
            )

    rec = source.head_record()
    if rec is not None:
        try:
            file_head = (int(rec["seq"]), _unhex(rec["hash"]))
        except (KeyError, TypeError, ValueError) as exc:
            report.problem(None, EXPORT_HEAD, f"the export's head record is malformed: {exc}")
        else:
            if file_head != report.head:
                report.problem(
                    file_head[0], EXPORT_HEAD, "the export's head record does not match its last entry"
                )
    _diagnose_moves(report, source, since or 0)
    return report


def _check_entry(report: VerifyReport, e: AuditEntry) -> None:
    try:
        computed = e.computed_hash()
    except (ValueError, UnicodeEncodeError) as exc:
        report.problem(e.seq, MALFORMED, f"entry cannot be encoded: {exc}")
        return
    if computed != e.hash:
        report.problem(e.seq, EDITED, "contents do not match the stored hash: the entry was edited")
        return
    try:
        canonical = canonical_json(load_json(e.data))
    except (ValueError, TypeError):
        canonical = None
    if canonical != e.data:
        report.problem(
            e.seq, NON_CANONICAL, "data is not canonical JSON: this entry was not written by the appliance"
        )


def _diagnose_moves(report: VerifyReport, source: AuditSource, since: int = 0) -> None:
    """Name the original seq of entries whose hash fails only because they were moved (swap, renumbering)."""
    edited = {p.seq: i for i, p in enumerate(report.problems) if p.kind == EDITED and p.seq is not None}
    if not edited:
        return
    for e in source.entries(since):
        if isinstance(e, Malformed) or e.seq not in edited:
            continue
        for delta in range(1, MOVE_WINDOW + 1):
            for original in (e.seq - delta, e.seq + delta):
                if (
                    original >= 1
                    and entry_hash(original, e.time, e.actor, e.event, e.data, e.prev_hash) == e.hash
                ):
                    report.problems[edited.pop(e.seq)] = AuditProblem(
                        e.seq,
                        MOVED,
                        f"this is entry {original}, moved here: entries were reordered or renumbered",
                    )
                    break
            else:
                continue
            break


# -- export ---------------------------------------------------------------------------------------------------------
def _hex(value: object) -> object:
    return value.hex() if isinstance(value, bytes) else value


def _dumps(rec: dict[str, Any]) -> str:
    return json.dumps(rec, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def _checkpoint_json(cp: Checkpoint) -> dict[str, Any]:
    return {
        "seq": cp.seq,
        "head_hash": cp.head_hash.hex(),
        "time": cp.time,
        "key_label": cp.key_label,
        "signature": cp.signature.hex(),
    }


def _head_json(conn: sqlite3.Connection) -> dict[str, Any]:
    row = conn.execute("SELECT seq, hash, time FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    cp = conn.execute(
        f"SELECT {Checkpoint.COLUMNS} FROM audit_checkpoint ORDER BY seq DESC LIMIT 1"
    ).fetchone()
    keys = {
        str(r[0]): key_fingerprint(bytes(r[1])).hex()
        for r in conn.execute("SELECT label, public_key FROM audit_key")
    }
    return {
        "type": "head",
        "seq": 0 if row is None else int(row[0]),
        "hash": (GENESIS_HASH if row is None else bytes(row[1])).hex(),
        "time": None if row is None else float(row[2]),
        "checkpoint": None if cp is None else _checkpoint_json(Checkpoint.from_row(cp)),
        "public_keys_sha256": keys,
    }


def head_record(journal: Journal) -> dict[str, Any]:
    """The current head as the JSON record an auditor keeps (also the last line of an export)."""

    def q() -> dict[str, Any]:
        return _head_json(journal.conn)

    return journal.call(q)


def export(journal: Journal, out: Path | TextIO) -> dict[str, Any]:
    """Write the whole log as JSON Lines (one consistent snapshot) and return the final head record.

    Lines: a header, the audit keys, every entry in seq order, every checkpoint, then the head record. A Path is
    written to a temporary file, fsynced and renamed into place.
    """
    if isinstance(out, Path):
        check_write_target(out)  # never replace a link or a non-file, as every other writer refuses to
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                head = export(journal, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return head

    def write() -> dict[str, Any]:
        conn = journal.conn
        conn.execute("BEGIN")

        def emit(rec: dict[str, Any]) -> None:
            out.write(_dumps(rec) + "\n")

        try:
            emit(
                {
                    "type": "header",
                    "format": EXPORT_FORMAT,
                    "version": EXPORT_VERSION,
                    "exported_at": time.time(),
                }
            )
            for label, der, created in conn.execute(
                "SELECT label, public_key, created_at FROM audit_key ORDER BY label"
            ):
                emit(
                    {
                        "type": "key",
                        "label": label,
                        "public_key": bytes(der).hex(),
                        "sha256": key_fingerprint(bytes(der)).hex(),
                        "created_at": created,
                    }
                )
            # Rows exactly as stored, even malformed ones: verify() judges them, export never hides them.
            for seq, t, actor, event, data, prev, digest in conn.execute(
                f"SELECT {AuditEntry.COLUMNS} FROM audit ORDER BY seq"
            ):
                emit(
                    {
                        "type": "entry",
                        "seq": seq,
                        "time": t,
                        "actor": actor,
                        "event": event,
                        "data": data,
                        "prev_hash": _hex(prev),
                        "hash": _hex(digest),
                    }
                )
            for row in conn.execute(f"SELECT {Checkpoint.COLUMNS} FROM audit_checkpoint ORDER BY seq"):
                emit({"type": "checkpoint", **_checkpoint_json(Checkpoint.from_row(row))})
            head = _head_json(conn)
            emit(head)
            return head
        finally:
            conn.execute("COMMIT")

    try:
        return journal.call(write)
    except sqlite3.Error as exc:
        raise AuditError(f"audit log cannot be read: {exc}") from exc


def read_head(path: Path) -> Head:
    """The (seq, hash) from a head record file (`audit head` output) or from the last head line of an export."""
    found: Head | None = None
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        rec = load_json(line)
        if isinstance(rec, dict) and "seq" in rec and "hash" in rec and rec.get("type", "head") == "head":
            found = (int(rec["seq"]), bytes.fromhex(str(rec["hash"])))
    if found is None:
        raise ValueError(f"{path}: no head record (a JSON object with seq and hash)")
    if len(found[1]) != HASH_SIZE:
        raise ValueError(f"{path}: the head hash is not 32 bytes")
    return found
