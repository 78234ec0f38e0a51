"""verify() against real tampering: SQL UPDATE/DELETE on the journal file, as an attacker with the file would."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from pytest_mock import MockerFixture

from appliance.audit import AuditLog, Checkpoint, export, key_fingerprint, read_head, verify
from appliance.audit.claims import EVENT_CHECKPOINT, CheckpointPolicy
from appliance.audit.encoding import checkpoint_message, entry_hash, spki_der
from appliance.audit.verify import (
    CHAIN_BROKEN,
    CHECKPOINT_KEY,
    CHECKPOINT_MISMATCH,
    CHECKPOINT_MISSING,
    CHECKPOINT_SIGNATURE,
    EDITED,
    EXPORT_HEAD,
    HEAD_MISMATCH,
    INTACT,
    KEY_MISMATCH,
    MISSING,
    MOVED,
    NON_CANONICAL,
    NOT_INTACT,
    OUT_OF_ORDER,
    TRUNCATED,
    UNSIGNED_TAIL,
    VerifyReport,
)
from appliance.issuance.journal import Journal
from hsm.errors import DeviceError
from hsm.keys import HsmEcPrivateKey
from tests.appliance.audit.conftest import fill, rehash_from, sign_rows, tamper


def kinds(report: VerifyReport) -> list[tuple[int | None, str]]:
    return [(p.seq, p.kind) for p in report.problems]


@pytest.fixture
def live(audit: AuditLog, audit_key: HsmEcPrivateKey) -> AuditLog:
    """A running appliance's log: the key registered (1), a claim (2), entries 3..20, a claim (21), and entries
    22..30 that the next checkpoint will sign."""
    assert audit.checkpoint(audit_key).seq == 2
    fill(audit, 18)
    assert audit.checkpoint(audit_key).seq == 21
    fill(audit, 9)
    return audit


@pytest.fixture
def stopped(live: AuditLog, audit_key: HsmEcPrivateKey) -> AuditLog:
    """The same appliance after a clean stop: the final claim (31) signs everything."""
    assert live.checkpoint(audit_key, reason="final").seq == 31
    return live


# -- untampered ------------------------------------------------------------------------------------------------------
def test_stopped_log_is_intact_with_pinned_key(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    report = verify(journal, public_key=audit_key.public_key(), expected_head=stopped.head())
    assert report.status == INTACT and report.intact and report.ok, report.text()
    assert report.entries == 31 and report.head == stopped.head()
    assert report.checkpoints == 3 and report.last_good_checkpoint == 31
    assert (report.claims, report.chained_since, report.signed_through, report.unsigned) == (3, 2, 31, None)
    assert report.key_fingerprints == {"audit": key_fingerprint(audit_key.public_key()).hex()}
    assert report.text().splitlines()[0].endswith(": INTACT")
    assert "every entry is covered by a signature" in report.text()
    # the fingerprint alone pins too
    assert verify(journal, public_key=key_fingerprint(audit_key.public_key())).intact
    unpinned = verify(journal)
    assert unpinned.intact and any("pinned" in w for w in unpinned.warnings)


def test_live_log_has_an_unsigned_tail_within_its_stated_bound(
    live: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    report = verify(journal, public_key=audit_key.public_key(), expected_head=live.head())
    assert report.status == UNSIGNED_TAIL and report.ok and not report.intact, report.text()
    assert (report.signed_through, report.unsigned, report.last_good_checkpoint) == (21, (22, 30), 21)
    assert report.policy == {"stated_at": 21, "max_unsigned_entries": 2000, "max_unsigned_s": 600.0}
    text = report.text()
    assert text.splitlines()[0].endswith(": UNSIGNED TAIL") and "INTACT" not in text
    assert "entries 22..30 are covered by NO signature" in text


def test_claims_are_entries_stating_key_and_policy(stopped: AuditLog, audit_key: HsmEcPrivateKey) -> None:
    claims = [e for e in stopped.entries() if e.event == EVENT_CHECKPOINT]
    assert [e.seq for e in claims] == [2, 21, 31]
    data = json.loads(claims[-1].data)
    assert data == {
        "key_label": "audit",
        "key_sha256": key_fingerprint(audit_key.public_key()).hex(),
        "policy": {
            "every_entries": 1000,
            "every_s": 300.0,
            "max_unsigned_entries": 2000,
            "max_unsigned_s": 600.0,
        },
        "reason": "final",
    }
    # each signature signs its own claim: (seq, hash) of that entry
    last = stopped.last_checkpoint()
    assert last is not None and (last.seq, last.head_hash) == (31, claims[-1].hash)


def test_intact_log_of_thousands_of_entries(
    audit: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    fill(audit, 3000)
    audit.checkpoint(audit_key)  # key registered at 3001, claim 3002: signs everything before it
    fill(audit, 2000)
    audit.checkpoint(audit_key)
    report = verify(journal, public_key=audit_key.public_key(), expected_head=audit.head())
    assert report.intact, report.text()
    assert report.entries == 5003 and report.last_good_checkpoint == 5003


# -- the tamper matrix -------------------------------------------------------------------------------------------
# Each tampering of a cleanly stopped log (claims 2, 21, 31, all signed), judged three ways: by the log alone,
# with the auditor's pinned key, and with the pinned key and the head the auditor kept (entry 31).
FORGER = ec.generate_private_key(ec.SECP256R1())


def _edit(db: sqlite3.Connection) -> None:
    db.execute("""UPDATE audit SET data='{"i":1,"serial":"SN-99999"}' WHERE seq=7""")


def _delete(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM audit WHERE seq=12")


def _reorder(db: sqlite3.Connection) -> None:
    db.execute("UPDATE audit SET seq=-1 WHERE seq=5")
    db.execute("UPDATE audit SET seq=5 WHERE seq=6")
    db.execute("UPDATE audit SET seq=6 WHERE seq=-1")


def _truncate(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM audit WHERE seq > 25")


def _truncate_and_drop_rows(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM audit WHERE seq > 25")
    db.execute("DELETE FROM audit_checkpoint WHERE seq > 25")


def _truncate_to_a_signed_claim(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM audit WHERE seq > 21")
    db.execute("DELETE FROM audit_checkpoint WHERE seq > 21")


def _rewrite(db: sqlite3.Connection) -> None:
    rehash_from(db, 10, {12: '{"i":0,"serial":"SN-FORGED"}'})


def _rewrite_and_drop_rows(db: sqlite3.Connection) -> None:
    """The defect found: checkpoint rows deleted, the log rewritten from entry 10 on."""
    _rewrite(db)
    db.execute("DELETE FROM audit_checkpoint WHERE seq >= 10")


def _rewrite_and_drop_claims(db: sqlite3.Connection) -> None:
    """The same, with the claims after entry 10 removed from the chain as well (renumbered, re-hashed)."""
    db.execute("DELETE FROM audit_checkpoint WHERE seq >= 10")
    db.execute(f"DELETE FROM audit WHERE seq >= 10 AND event = '{EVENT_CHECKPOINT}'")
    for new, (old,) in enumerate(
        db.execute("SELECT seq FROM audit WHERE seq >= 10 ORDER BY seq").fetchall(), 10
    ):
        db.execute("UPDATE audit SET seq=? WHERE seq=?", (new, old))
    _rewrite(db)


def _drop_checkpoints(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM audit_checkpoint")


def _drop_last_checkpoint(db: sqlite3.Connection) -> None:
    db.execute("DELETE FROM audit_checkpoint WHERE seq = 31")


def _resign_rows(db: sqlite3.Connection) -> None:
    sign_rows(db, FORGER)


def _replace_key_and_resign(db: sqlite3.Connection) -> None:
    db.execute("UPDATE audit_key SET public_key=? WHERE label='audit'", (spki_der(FORGER.public_key()),))
    sign_rows(db, FORGER)


def _forge_everything(db: sqlite3.Connection) -> None:
    """A complete forgery with the forger's own key: key registration, claims, hashes and signatures."""
    spki, fp = spki_der(FORGER.public_key()), key_fingerprint(FORGER.public_key()).hex()
    db.execute("UPDATE audit_key SET public_key=? WHERE label='audit'", (spki,))
    edits = {}
    for seq, event, data in db.execute("SELECT seq, event, data FROM audit").fetchall():
        obj = json.loads(data)
        if event == "audit.key-registered":
            obj.update(public_key=spki.hex(), public_key_sha256=fp)
        elif event == EVENT_CHECKPOINT:
            obj.update(key_sha256=fp)
        else:
            continue
        edits[seq] = json.dumps(obj, sort_keys=True, separators=(",", ":"))
    rehash_from(db, 1, edits)
    sign_rows(db, FORGER)


def _append(db: sqlite3.Connection) -> None:
    seq, prev = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    t, actor, event, data = 1.7e9, "mallory", "user.add", '{"role":"administrator","user":"mallory"}'
    db.execute(
        "INSERT INTO audit VALUES (?,?,?,?,?,?,?)",
        (seq + 1, t, actor, event, data, prev, entry_hash(seq + 1, t, actor, event, data, bytes(prev))),
    )


MATRIX = {
    # tampering: (the log alone, with the pinned key, with the pinned key and the kept head)
    "edit": (_edit, NOT_INTACT, NOT_INTACT, NOT_INTACT),
    "delete": (_delete, NOT_INTACT, NOT_INTACT, NOT_INTACT),
    "reorder": (_reorder, NOT_INTACT, NOT_INTACT, NOT_INTACT),
    "truncate": (_truncate, NOT_INTACT, NOT_INTACT, NOT_INTACT),
    "truncate, drop rows": (_truncate_and_drop_rows, UNSIGNED_TAIL, UNSIGNED_TAIL, NOT_INTACT),
    "truncate to a signed claim": (_truncate_to_a_signed_claim, INTACT, INTACT, NOT_INTACT),
    "rewrite and re-hash": (_rewrite, NOT_INTACT, NOT_INTACT, NOT_INTACT),
    "rewrite, drop checkpoints": (_rewrite_and_drop_rows, NOT_INTACT, NOT_INTACT, NOT_INTACT),
    "rewrite, drop checkpoints and claims": (
        _rewrite_and_drop_claims,
        UNSIGNED_TAIL,
        UNSIGNED_TAIL,
        NOT_INTACT,
    ),
    "drop checkpoints": (_drop_checkpoints, NOT_INTACT, NOT_INTACT, NOT_INTACT),
    "drop the last checkpoint": (_drop_last_checkpoint, UNSIGNED_TAIL, UNSIGNED_TAIL, UNSIGNED_TAIL),
    "re-sign with another key": (_resign_rows, NOT_INTACT, NOT_INTACT, NOT_INTACT),
    "replace the key, re-sign": (_replace_key_and_resign, NOT_INTACT, NOT_INTACT, NOT_INTACT),
    "forge everything with another key": (_forge_everything, INTACT, NOT_INTACT, NOT_INTACT),
    "append": (_append, UNSIGNED_TAIL, UNSIGNED_TAIL, UNSIGNED_TAIL),
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_tamper_matrix(stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey, name: str) -> None:
    fn, alone, pinned, with_head = MATRIX[name]
    kept = stopped.head()
    with tamper(journal) as db:
        fn(db)
    pin = audit_key.public_key()
    got = (
        verify(journal).status,
        verify(journal, public_key=pin).status,
        verify(journal, public_key=pin, expected_head=kept).status,
    )
    assert got == (alone, pinned, with_head)
    for report in (verify(journal), verify(journal, public_key=pin, expected_head=kept)):
        # INTACT is only ever said of a log whose every entry a signature covers
        assert (report.status == INTACT) == (report.ok and report.signed_through == report.head[0])


# -- what each check reports ---------------------------------------------------------------------------------------
def test_edited_entry_is_reported_at_its_seq(stopped: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        db.execute("""UPDATE audit SET data='{"i":1,"serial":"SN-99999"}' WHERE seq=7""")
        db.execute("UPDATE audit SET actor='operator:mallory' WHERE seq=25")
    report = verify(journal)
    assert kinds(report) == [(7, EDITED), (25, EDITED)]
    assert "edited" in str(report.problems[0]) and str(report.problems[0]).startswith("seq 7:")
    assert report.text().splitlines()[0].endswith(": NOT INTACT")


def test_deleted_middle_entry_is_a_gap(stopped: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        db.execute("DELETE FROM audit WHERE seq=12")
        db.execute("DELETE FROM audit WHERE seq BETWEEN 22 AND 24")
    report = verify(journal)
    assert kinds(report) == [(12, MISSING), (22, MISSING)]
    assert "entries 22..24 missing" in report.problems[1].message


def test_deleted_entry_with_renumbering_is_caught(live: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        db.execute("DELETE FROM audit WHERE seq=25")
        for seq in range(26, 31):
            db.execute("UPDATE audit SET seq=? WHERE seq=?", (seq - 1, seq))
    report = verify(journal)
    assert (25, CHAIN_BROKEN) in kinds(report)
    assert [(s, k) for s, k in kinds(report) if k == MOVED] == [(s, MOVED) for s in range(25, 30)]
    assert "this is entry 26" in next(p.message for p in report.problems if p.seq == 25 and p.kind == MOVED)


def test_swapped_entries_are_reported_as_moved(live: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        _reorder(db)
    report = verify(journal)
    moved = {p.seq: p.message for p in report.problems if p.kind == MOVED}
    assert set(moved) == {5, 6}
    assert "entry 6" in moved[5] and "entry 5" in moved[6]
    assert {(5, CHAIN_BROKEN), (6, CHAIN_BROKEN), (7, CHAIN_BROKEN)} <= set(kinds(report))


def test_rehashed_chain_after_an_edit_is_caught_by_every_later_checkpoint(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    """The attacker edits entry 9 and recomputes every hash from there: the chain is self-consistent again."""
    with tamper(journal) as db:
        rehash_from(db, 9, {9: '{"i":0,"serial":"SN-FORGED"}'})
    report = verify(journal, public_key=audit_key.public_key())
    assert kinds(report) == [(21, CHECKPOINT_MISMATCH), (31, CHECKPOINT_MISMATCH)]
    assert "rewritten after this checkpoint" in report.problems[0].message
    assert report.last_good_checkpoint == 2 and report.signed_through == 2


def test_rewrite_with_checkpoint_rows_deleted_is_caught_by_the_claims(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    """The defect found: rows deleted and the log rewritten from entry 10 on was reported INTACT (exit 0)."""
    with tamper(journal) as db:
        _rewrite_and_drop_rows(db)
    report = verify(journal, public_key=audit_key.public_key())
    assert report.status == NOT_INTACT
    assert kinds(report) == [
        (21, CHECKPOINT_MISSING)
    ]  # the last claim (31) may be unsigned: a crash's window
    assert "checkpoints were deleted" in report.problems[0].message
    assert (report.signed_through, report.unsigned) == (2, (3, 31))


def test_rewrite_with_the_claims_removed_is_an_unsigned_tail_or_overdue(
    journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    """Without its claims the rewritten part is unsigned: never INTACT; past the stated bound, a failure."""
    small = AuditLog(journal, policy=CheckpointPolicy(every_entries=10, every_s=60))
    small.checkpoint(audit_key)  # 1 key, 2 claim: at most 20 entries unsigned
    for _ in range(3):
        fill(small, 9)
        small.checkpoint(audit_key)
    assert small.head()[0] == 32 and verify(journal).intact
    with tamper(journal) as db:
        _rewrite_and_drop_claims(db)
    report = verify(journal, public_key=audit_key.public_key())
    assert report.status == NOT_INTACT and report.signed_through == 2 and report.unsigned == (3, 29)
    assert [p.kind for p in report.problems] == ["unsigned-overdue"]
    assert "promises at most 20 entries" in report.problems[0].message


def test_unsigned_tail_bound_counts_entries_and_seconds(journal: Journal, audit_key: HsmEcPrivateKey) -> None:
    now = [1_700_000_000.0]
    log = AuditLog(journal, clock=lambda: now[0], policy=CheckpointPolicy(every_entries=10, every_s=60))
    log.checkpoint(audit_key)  # states: at most 20 entries, 120 s
    fill(log, 20)  # 20 entries unsigned: the bound itself
    assert verify(journal).status == UNSIGNED_TAIL
    fill(log, 1)
    report = verify(journal)
    assert report.status == NOT_INTACT and [p.kind for p in report.problems] == ["unsigned-overdue"]
    log.checkpoint(audit_key)
    assert verify(journal).intact
    fill(log, 1)
    now[0] += 120  # the oldest unsigned entry is 120 s older than the newest: the bound itself
    fill(log, 1)
    assert verify(journal).status == UNSIGNED_TAIL and verify(journal).unsigned_span_s == 120
    now[0] += 0.5
    fill(log, 1)
    assert [p.kind for p in verify(journal).problems] == ["unsigned-overdue"]


def test_rehashed_tail_after_the_last_checkpoint_is_caught_by_the_auditors_head(
    live: AuditLog, journal: Journal
) -> None:
    kept = live.head()
    with tamper(journal) as db:
        rehash_from(db, 30, {30: '{"i":99}'})
    assert verify(journal).status == UNSIGNED_TAIL  # nothing inside the appliance can tell it was changed...
    assert kinds(verify(journal, expected_head=kept)) == [(30, HEAD_MISMATCH)]  # ...the auditor's head can


def test_checkpoint_resigned_with_another_key(stopped: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        seq, head = db.execute("SELECT seq, head_hash FROM audit_checkpoint WHERE seq=21").fetchone()
        sig = FORGER.sign(checkpoint_message(seq, bytes(head)), ec.ECDSA(hashes.SHA256()))
        db.execute("UPDATE audit_checkpoint SET signature=? WHERE seq=21", (sig,))
    report = verify(journal)
    assert kinds(report) == [(21, CHECKPOINT_SIGNATURE)]


def test_replaced_key_and_signatures_are_caught_by_the_claims_and_the_pinned_key(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    with tamper(journal) as db:
        _replace_key_and_resign(db)
    # the claims in the chain name the real key: caught even without a pin
    assert kinds(verify(journal)) == [(2, CHECKPOINT_KEY), (21, CHECKPOINT_KEY), (31, CHECKPOINT_KEY)]
    pinned = verify(journal, public_key=audit_key.public_key())
    assert kinds(pinned) == [(None, KEY_MISMATCH), (2, CHECKPOINT_SIGNATURE), (21, CHECKPOINT_SIGNATURE),
                             (31, CHECKPOINT_SIGNATURE)]  # fmt: skip
    by_fp = verify(journal, public_key=key_fingerprint(audit_key.public_key()))
    assert (None, KEY_MISMATCH) in kinds(by_fp) and not by_fp.ok


def test_a_complete_forgery_is_caught_only_by_the_pinned_key(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    with tamper(journal) as db:
        _forge_everything(db)
    unpinned = verify(journal)
    assert unpinned.intact and any("pinned" in w for w in unpinned.warnings)
    assert "(NOT pinned)" in unpinned.text()
    assert (None, KEY_MISMATCH) in kinds(verify(journal, public_key=audit_key.public_key()))


def test_truncated_tail_against_an_earlier_exported_head(
    live: AuditLog, journal: Journal, tmp_path: Path
) -> None:
    head = export(journal, tmp_path / "audit.jsonl")
    kept = read_head(tmp_path / "audit.jsonl")
    assert kept == (30, bytes.fromhex(head["hash"]))
    with tamper(journal) as db:
        db.execute("DELETE FROM audit WHERE seq > 24")
    assert (
        verify(journal).status == UNSIGNED_TAIL
    )  # the cut is after the last checkpoint: unsigned, not a gap
    report = verify(journal, expected_head=kept)
    assert kinds(report) == [(30, TRUNCATED)]
    assert "ends at 24" in report.problems[0].message
    # Cutting into a checkpointed range is caught by the checkpoint as well.
    with tamper(journal) as db:
        db.execute("DELETE FROM audit WHERE seq > 15")
    assert kinds(verify(journal, expected_head=kept)) == [(21, TRUNCATED), (30, TRUNCATED)]


def test_appended_entries_are_never_intact(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    """The defect found: an entry appended to a stopped appliance's log passed even with the auditor's head."""
    kept = stopped.head()
    with tamper(journal) as db:
        _append(db)
    report = verify(journal, public_key=audit_key.public_key(), expected_head=kept)
    assert report.status == UNSIGNED_TAIL and report.unsigned == (32, 32), report.text()
    # An appended claim does not help: without a signature it covers nothing...
    with tamper(journal) as db:
        seq, prev = db.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        data = json.loads(stopped.entries(start=31)[0].data)
        text = json.dumps(data, sort_keys=True, separators=(",", ":"))
        h = entry_hash(seq + 1, 1.7e9, "appliance", EVENT_CHECKPOINT, text, bytes(prev))
        db.execute("INSERT INTO audit VALUES (?,?,?,?,?,?,?)", (seq + 1, 1.7e9, "appliance", EVENT_CHECKPOINT,
                                                                text, prev, h))  # fmt: skip
    report = verify(journal, public_key=audit_key.public_key(), expected_head=kept)
    assert report.status == UNSIGNED_TAIL and report.unsigned == (32, 33)
    # ...and signing it with another key is a failure.
    with tamper(journal) as db:
        sig = FORGER.sign(checkpoint_message(33, h), ec.ECDSA(hashes.SHA256()))
        db.execute("INSERT INTO audit_checkpoint VALUES (33, ?, 1.7e9, 'audit', ?)", (h, sig))
    assert kinds(verify(journal, public_key=audit_key.public_key())) == [(33, CHECKPOINT_SIGNATURE)]


def test_truncation_to_a_signed_claim_needs_the_auditors_head(stopped: AuditLog, journal: Journal) -> None:
    """What the log cannot tell by itself (docs/audit.md): cut back to a signed claim, it is a shorter whole."""
    kept = stopped.head()
    with tamper(journal) as db:
        _truncate_to_a_signed_claim(db)
    assert verify(journal).intact
    assert kinds(verify(journal, expected_head=kept)) == [(31, TRUNCATED)]


def test_every_problem_is_reported_not_just_the_first(stopped: AuditLog, journal: Journal) -> None:
    kept = stopped.head()
    with tamper(journal) as db:
        db.execute("UPDATE audit SET event='test.forged' WHERE seq=3")
        db.execute("DELETE FROM audit WHERE seq=10")
        db.execute(
            "UPDATE audit_checkpoint SET signature=? WHERE seq=2",
            (FORGER.sign(b"x", ec.ECDSA(hashes.SHA256())),),
        )
        db.execute("DELETE FROM audit WHERE seq > 27")
    assert kinds(verify(journal, expected_head=kept)) == [
        (2, CHECKPOINT_SIGNATURE),
        (3, EDITED),
        (10, MISSING),
        (31, TRUNCATED),
        (31, TRUNCATED),
    ]


def test_a_claim_not_written_by_the_appliance_is_malformed(stopped: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        rehash_from(db, 21, {21: '{"key_label":"audit","reason":"interval"}'})
        db.execute("DELETE FROM audit_checkpoint WHERE seq >= 21")
    report = verify(journal)
    assert (21, "malformed") in kinds(report) and (21, CHECKPOINT_MISSING) in kinds(report)


def test_non_canonical_data_with_a_valid_hash_is_not_the_appliances(live: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        rehash_from(db, 30, {30: '{"serial": "SN-1", "i": 1}'})
    assert kinds(verify(journal)) == [(30, NON_CANONICAL)]


# -- the crash window between a claim and its signature ----------------------------------------------------------
def test_a_claim_left_unsigned_by_a_failure_is_signed_by_the_next_checkpoint(
    audit: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey, mocker: MockerFixture
) -> None:
    """The HSM fails between claim and signature (injected: a removed device cannot be produced here)."""
    audit.checkpoint(audit_key)
    fill(audit, 5)  # 3..7
    mocker.patch.object(type(audit_key), "sign", side_effect=DeviceError("removed"))
    with pytest.raises(DeviceError):
        audit.checkpoint(audit_key)  # claim 8 committed, its signature never made
    mocker.stopall()
    report = verify(journal)
    assert (
        report.status == UNSIGNED_TAIL and report.ok and report.unsigned == (3, 8)
    )  # the last claim: no problem
    fill(audit, 2)  # 9, 10
    cp = audit.checkpoint(audit_key)  # signs claim 8 first, then claims 11
    assert cp.seq == 11
    rows = journal.call(lambda: [r[0] for r in journal.conn.execute("SELECT seq FROM audit_checkpoint")])
    assert rows == [2, 8, 11]
    assert verify(journal).intact


# -- exports -------------------------------------------------------------------------------------------------------
def test_export_then_offline_verify_round_trip(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey, tmp_path: Path
) -> None:
    stopped.record("operator:jürgen", "auth.login", {"station": "Gerät 7", "x": 1.1})
    stopped.checkpoint(audit_key)
    out = tmp_path / "export" / "audit.jsonl"
    head = export(journal, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["type"] for x in lines[:2]] == ["header", "key"]
    assert [x["type"] for x in lines[-5:]] == ["checkpoint"] * 4 + ["head"]
    assert sum(x["type"] == "entry" for x in lines) == 33
    assert head == lines[-1] and head["seq"] == 33 and head["checkpoint"]["seq"] == 33
    assert out.read_text().isascii()
    journal.close()  # the auditor has only the file
    report = verify(out, public_key=audit_key.public_key(), expected_head=read_head(out))
    assert report.intact, report.text()
    assert report.entries == 33 and report.last_good_checkpoint == 33


def test_tampered_export_file_is_caught_offline(stopped: AuditLog, journal: Journal, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    export(journal, out)
    lines = out.read_text().splitlines()
    edited = []
    for line in lines:
        rec = json.loads(line)
        if rec.get("type") == "entry" and rec["seq"] == 4:
            rec["actor"] = "operator:mallory"
        if rec.get("type") == "entry" and rec["seq"] == 8:
            continue
        edited.append(json.dumps(rec))
    out.write_text("\n".join(edited) + "\n")
    assert kinds(verify(out)) == [(4, EDITED), (8, MISSING)]
    # dropping the checkpoint lines: the claims in the entries still ask for them
    out.write_text("\n".join(line for line in lines if '"type":"checkpoint"' not in line) + "\n")
    assert kinds(verify(out)) == [(2, CHECKPOINT_MISSING), (21, CHECKPOINT_MISSING)]
    # dropping the tail lines of the file: the file's own head record no longer matches
    entries_end = max(i for i, line in enumerate(lines) if '"type":"entry"' in line)
    out.write_text("\n".join(lines[: entries_end - 5] + lines[entries_end + 1 :]) + "\n")
    assert (31, EXPORT_HEAD) in kinds(verify(out))


def test_reordered_lines_in_an_export_file(live: AuditLog, journal: Journal, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    export(journal, out)
    lines = out.read_text().splitlines()
    i = next(n for n, line in enumerate(lines) if json.loads(line).get("seq") == 5 and '"entry"' in line)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    out.write_text("\n".join(lines) + "\n")
    report = verify(out)
    assert (5, OUT_OF_ORDER) in kinds(report) and not report.ok


# -- checkpoint() ----------------------------------------------------------------------------------------------------
def test_checkpoint_is_stored_and_verifiable(audit: AuditLog, audit_key: HsmEcPrivateKey) -> None:
    audit.record("appliance", "test.event", {})
    cp = audit.checkpoint(audit_key)
    # the key was registered first (entry 2), then claimed (3), and the claim signed
    assert cp.seq == 3 and cp.key_label == "audit"
    assert [e.event for e in audit.entries()] == ["test.event", "audit.key-registered", EVENT_CHECKPOINT]
    assert cp.verifies_with(audit_key.public_key()) and cp.head_hash == audit.head()[1]
    assert audit.last_checkpoint() == cp
    assert audit.checkpoint(audit_key) == cp  # the head is signed: no second claim
    assert audit.head()[0] == 3
    assert audit.public_keys() == {"audit": spki_der(audit_key.public_key())}
    assert isinstance(cp, Checkpoint)


async def test_async_checkpoint(audit: AuditLog, audit_key: HsmEcPrivateKey, journal: Journal) -> None:
    await audit.arecord("operator:alice", "auth.login", {})
    cp = await audit.acheckpoint(audit_key)
    assert cp.seq == 3 and cp.verifies_with(audit_key.public_key())
    assert verify(journal, public_key=audit_key.public_key()).last_good_checkpoint == 3
    assert await audit.acheckpoint(audit_key) == cp


def test_claims_from_two_writers_keep_the_rule(
    audit: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey, tmp_path: Path
) -> None:
    """Another process (a person's `audit checkpoint` beside the daemon) claims through its own connection."""
    audit.checkpoint(audit_key)
    with Journal(journal.path) as other_journal:
        other = AuditLog(other_journal)
        for i in range(4):
            fill(audit if i % 2 else other, 3)
            (other if i % 2 else audit).checkpoint(audit_key)
    report = verify(journal)
    assert report.intact and report.claims == 5, report.text()


# -- incremental verification from a checkpoint --------------------------------------------------------------------
# The stopped log: claims 2, 21, 31, all signed. An auditor's full verify found checkpoint 21 good; later runs
# start from it (since_checkpoint=21): entries 21..31 are read, entries 1..20 are not.
def test_incremental_verify_of_an_intact_log_reads_only_from_the_checkpoint(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    pin = audit_key.public_key()
    full = verify(journal, public_key=pin, expected_head=stopped.head())
    report = verify(journal, public_key=pin, expected_head=stopped.head(), since_checkpoint=21)
    assert report.status == INTACT and report.intact, report.text()
    assert (report.entries, report.checkpoints, report.claims) == (11, 2, 2)  # entries 21..31, rows 21 and 31
    assert (report.head, report.last_good_checkpoint, report.signed_through) == (full.head, 31, 31)
    assert report.policy == full.policy and report.since_checkpoint == 21 and full.since_checkpoint is None
    text = report.text()
    assert text.splitlines()[0].endswith(": INTACT (checked from seq 21 on)")
    assert "entries before seq 21 were NOT checked" in text
    # the live log: the unsigned tail is judged as a full verification judges it
    live = verify(journal, since_checkpoint=31)
    assert live.intact and live.entries == 1


def test_incremental_verify_does_not_see_an_edit_before_its_checkpoint(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    """The documented limit: an entry before the checkpoint, edited with its stored hashes left alone."""
    with tamper(journal) as db:
        db.execute("""UPDATE audit SET data='{"i":1,"serial":"SN-99999"}' WHERE seq=7""")
    pin = audit_key.public_key()
    assert kinds(verify(journal, public_key=pin)) == [(7, EDITED)]  # the full verification sees it
    assert (
        verify(journal, public_key=pin, since_checkpoint=21).status == INTACT
    )  # the incremental one does not
    assert kinds(verify(journal, public_key=pin, since_checkpoint=2)) == [(7, EDITED)]  # from before it: seen


def test_incremental_verify_catches_a_rehash_through_its_checkpoint(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    """An edit before the checkpoint with every later hash recomputed changes the checkpoint's entry."""
    with tamper(journal) as db:
        rehash_from(db, 9, {9: '{"i":0,"serial":"SN-FORGED"}'})
    report = verify(journal, public_key=audit_key.public_key(), since_checkpoint=21)
    assert kinds(report) == [(21, CHECKPOINT_MISMATCH), (31, CHECKPOINT_MISMATCH)]


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("""UPDATE audit SET data='{"i":1,"serial":"SN-99999"}' WHERE seq=25""", [(25, EDITED)]),
        ("UPDATE audit SET actor='operator:mallory' WHERE seq=21", [(21, EDITED)]),  # the checkpoint's own entry
        ("DELETE FROM audit WHERE seq=27", [(27, MISSING)]),
        ("DELETE FROM audit WHERE seq=21", [(21, MISSING), (21, TRUNCATED)]),
        ("UPDATE audit_checkpoint SET signature=X'3006020101020101' WHERE seq=21", [(21, CHECKPOINT_SIGNATURE)]),
        ("DELETE FROM audit_checkpoint WHERE seq=21", [(21, CHECKPOINT_MISSING), (21, CHECKPOINT_MISSING)]),
        ("DELETE FROM audit_checkpoint WHERE seq=31", []),  # the last claim: a crash's window, an unsigned tail
    ],
    ids=["edit after", "edit the checkpoint entry", "delete after", "delete the checkpoint entry",
         "bad checkpoint signature", "delete the checkpoint row", "delete the last row"],
)  # fmt: skip
def test_incremental_verify_catches_tampering_from_its_checkpoint_on(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey, sql: str, expected: list[tuple[int, str]]
) -> None:
    with tamper(journal) as db:
        db.execute(sql)
    pin = audit_key.public_key()
    report = verify(journal, public_key=pin, since_checkpoint=21)
    assert kinds(report) == expected, report.text()
    assert report.status == (UNSIGNED_TAIL if not expected else NOT_INTACT)
    # whatever the incremental verification reports, the full one reports too
    assert set(kinds(report)) <= set(kinds(verify(journal, public_key=pin))) | {(21, CHECKPOINT_MISSING)}


def test_incremental_verify_of_an_export_file(
    stopped: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey, tmp_path: Path
) -> None:
    out = tmp_path / "audit.jsonl"
    export(journal, out)
    report = verify(out, public_key=audit_key.public_key(), since_checkpoint=21)
    assert report.intact and report.entries == 11, report.text()
    records = [json.loads(line) for line in out.read_text().splitlines()]
    for rec in records:
        if rec.get("type") == "entry" and rec["seq"] in (7, 25):
            rec["actor"] = "operator:mallory"
    out.write_text("".join(json.dumps(rec) + "\n" for rec in records))
    assert kinds(verify(out, since_checkpoint=21)) == [(25, EDITED)]  # 7 is before the checkpoint
    assert kinds(verify(out)) == [(7, EDITED), (25, EDITED)]


def test_incremental_verify_refuses_a_head_before_its_checkpoint(stopped: AuditLog, journal: Journal) -> None:
    with pytest.raises(ValueError, match="before the checkpoint"):
        verify(journal, expected_head=(5, bytes(32)), since_checkpoint=21)
    with pytest.raises(ValueError, match="1 or more"):
        verify(journal, since_checkpoint=0)
