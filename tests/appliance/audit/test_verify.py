"""verify() against real tampering: SQL UPDATE/DELETE on the journal file, as an attacker with the file would."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.audit import AuditLog, Checkpoint, export, key_fingerprint, read_head, verify
from appliance.audit.encoding import checkpoint_message, entry_hash, spki_der
from appliance.audit.verify import (
    CHAIN_BROKEN,
    CHECKPOINT_MISMATCH,
    CHECKPOINT_SIGNATURE,
    EDITED,
    EXPORT_HEAD,
    HEAD_MISMATCH,
    KEY_MISMATCH,
    MISSING,
    MOVED,
    NON_CANONICAL,
    OUT_OF_ORDER,
    TRUNCATED,
    VerifyReport,
)
from appliance.issuance.journal import Journal
from hsm.keys import HsmEcPrivateKey
from tests.appliance.audit.conftest import fill, tamper


def kinds(report: VerifyReport) -> list[tuple[int | None, str]]:
    return [(p.seq, p.kind) for p in report.problems]


@pytest.fixture
def log20(audit: AuditLog, audit_key: HsmEcPrivateKey) -> AuditLog:
    """Key registered (entry 1), 19 more entries, a checkpoint at 20, then 10 unsigned entries (head 30)."""
    audit.checkpoint(audit_key)  # registers the key: entry 1 is audit.key-registered; signs head 1
    fill(audit, 19)
    audit.checkpoint(audit_key)
    fill(audit, 10)
    return audit


def test_intact_log_verifies_with_pinned_key(
    log20: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    report = verify(journal, public_key=audit_key.public_key(), expected_head=log20.head())
    assert report.ok, report.text()
    assert report.entries == 30 and report.head == log20.head()
    assert report.checkpoints == 2 and report.last_good_checkpoint == 20
    assert report.key_fingerprints == {"audit": key_fingerprint(audit_key.public_key()).hex()}
    assert any("21..30" in w for w in report.warnings)  # unsigned tail is pointed out
    # the fingerprint alone pins too
    assert verify(journal, public_key=key_fingerprint(audit_key.public_key())).ok
    unpinned = verify(journal)
    assert unpinned.ok and any("pinned" in w for w in unpinned.warnings)


def test_intact_log_of_thousands_of_entries(
    audit: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    fill(audit, 3000)
    audit.checkpoint(audit_key)
    fill(audit, 2000)
    audit.checkpoint(audit_key)
    report = verify(journal, public_key=audit_key.public_key(), expected_head=audit.head())
    assert report.ok, report.text()
    assert report.entries == 5001 and report.last_good_checkpoint == 5001


def test_edited_entry_is_reported_at_its_seq(log20: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        db.execute("""UPDATE audit SET data='{"i":1,"serial":"SN-99999"}' WHERE seq=7""")
        db.execute("UPDATE audit SET actor='operator:mallory' WHERE seq=25")
    report = verify(journal)
    assert kinds(report) == [(7, EDITED), (25, EDITED)]
    assert "edited" in str(report.problems[0]) and str(report.problems[0]).startswith("seq 7:")


def test_deleted_middle_entry_is_a_gap(log20: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        db.execute("DELETE FROM audit WHERE seq=12")
        db.execute("DELETE FROM audit WHERE seq BETWEEN 22 AND 24")
    report = verify(journal)
    assert kinds(report) == [(12, MISSING), (22, MISSING)]
    assert "entries 22..24 missing" in report.problems[1].message


def test_deleted_entry_with_renumbering_is_caught(log20: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        db.execute("DELETE FROM audit WHERE seq=25")
        for seq in range(26, 31):
            db.execute("UPDATE audit SET seq=? WHERE seq=?", (seq - 1, seq))
    report = verify(journal)
    assert (25, CHAIN_BROKEN) in kinds(report)
    assert [(s, k) for s, k in kinds(report) if k == MOVED] == [(s, MOVED) for s in range(25, 30)]
    assert "this is entry 26" in next(p.message for p in report.problems if p.seq == 25 and p.kind == MOVED)


def test_swapped_entries_are_reported_as_moved(log20: AuditLog, journal: Journal) -> None:
    with tamper(journal) as db:
        db.execute("UPDATE audit SET seq=-1 WHERE seq=5")
        db.execute("UPDATE audit SET seq=5 WHERE seq=6")
        db.execute("UPDATE audit SET seq=6 WHERE seq=-1")
    report = verify(journal)
    moved = {p.seq: p.message for p in report.problems if p.kind == MOVED}
    assert set(moved) == {5, 6}
    assert "entry 6" in moved[5] and "entry 5" in moved[6]
    assert {(5, CHAIN_BROKEN), (6, CHAIN_BROKEN), (7, CHAIN_BROKEN)} <= set(kinds(report))


def test_rehashed_chain_after_an_edit_is_caught_by_the_checkpoint(
    log20: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    """The attacker edits entry 9 and recomputes every hash from there: the chain is self-consistent again."""
    with tamper(journal) as db:
        db.execute("""UPDATE audit SET data='{"i":0,"serial":"SN-FORGED"}' WHERE seq=9""")
        rows = db.execute(
            "SELECT seq, time, actor, event, data FROM audit WHERE seq >= 9 ORDER BY seq"
        ).fetchall()
        prev = bytes(db.execute("SELECT hash FROM audit WHERE seq=8").fetchone()[0])
        for seq, t, actor, event, data in rows:
            h = entry_hash(seq, t, actor, event, data, prev)
            db.execute("UPDATE audit SET prev_hash=?, hash=? WHERE seq=?", (prev, h, seq))
            prev = h
    report = verify(journal, public_key=audit_key.public_key())
    assert kinds(report) == [(20, CHECKPOINT_MISMATCH)]
    assert "rewritten after this checkpoint" in report.problems[0].message
    assert report.last_good_checkpoint == 1


def test_rehashed_tail_after_the_last_checkpoint_is_caught_by_the_auditors_head(
    log20: AuditLog, journal: Journal
) -> None:
    kept = log20.head()
    with tamper(journal) as db:
        db.execute("""UPDATE audit SET data='{"i":99}' WHERE seq=30""")
        t, actor, event, data, prev = db.execute(
            "SELECT time, actor, event, data, prev_hash FROM audit WHERE seq=30"
        ).fetchone()
        db.execute("UPDATE audit SET hash=? WHERE seq=30", (entry_hash(30, t, actor, event, data, prev),))
    assert verify(journal).ok  # nothing inside the appliance can tell...
    assert kinds(verify(journal, expected_head=kept)) == [(30, HEAD_MISMATCH)]  # ...the auditor's head can


def test_checkpoint_resigned_with_another_key(
    log20: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    forger = ec.generate_private_key(ec.SECP256R1())
    with tamper(journal) as db:
        seq, head = db.execute("SELECT seq, head_hash FROM audit_checkpoint WHERE seq=20").fetchone()
        sig = forger.sign(checkpoint_message(seq, bytes(head)), ec.ECDSA(hashes.SHA256()))
        db.execute("UPDATE audit_checkpoint SET signature=? WHERE seq=20", (sig,))
    report = verify(journal)
    assert kinds(report) == [(20, CHECKPOINT_SIGNATURE)]
    assert report.last_good_checkpoint == 1


def test_replaced_key_and_signatures_are_caught_only_by_the_pinned_key(
    log20: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey
) -> None:
    forger = ec.generate_private_key(ec.SECP256R1())
    with tamper(journal) as db:
        db.execute("UPDATE audit_key SET public_key=? WHERE label='audit'", (spki_der(forger.public_key()),))
        for seq, head in db.execute("SELECT seq, head_hash FROM audit_checkpoint").fetchall():
            sig = forger.sign(checkpoint_message(seq, bytes(head)), ec.ECDSA(hashes.SHA256()))
            db.execute("UPDATE audit_checkpoint SET signature=? WHERE seq=?", (sig, seq))
    unpinned = verify(journal)
    assert unpinned.ok and any("pinned" in w for w in unpinned.warnings)
    pinned = verify(journal, public_key=audit_key.public_key())
    assert kinds(pinned) == [(None, KEY_MISMATCH), (1, CHECKPOINT_SIGNATURE), (20, CHECKPOINT_SIGNATURE)]
    by_fp = verify(journal, public_key=key_fingerprint(audit_key.public_key()))
    assert (None, KEY_MISMATCH) in kinds(by_fp) and not by_fp.ok


def test_truncated_tail_against_an_earlier_exported_head(
    log20: AuditLog, journal: Journal, tmp_path: Path
) -> None:
    head = export(journal, tmp_path / "audit.jsonl")
    kept = read_head(tmp_path / "audit.jsonl")
    assert kept == (30, bytes.fromhex(head["hash"]))
    with tamper(journal) as db:
        db.execute("DELETE FROM audit WHERE seq > 24")
    assert verify(journal).ok  # the cut is after the last checkpoint: invisible from inside
    report = verify(journal, expected_head=kept)
    assert kinds(report) == [(30, TRUNCATED)]
    assert "ends at 24" in report.problems[0].message
    # Cutting into a checkpointed range is caught by the checkpoint as well.
    with tamper(journal) as db:
        db.execute("DELETE FROM audit WHERE seq > 15")
    assert kinds(verify(journal, expected_head=kept)) == [(20, TRUNCATED), (30, TRUNCATED)]


def test_every_problem_is_reported_not_just_the_first(log20: AuditLog, journal: Journal) -> None:
    forger = ec.generate_private_key(ec.SECP256R1())
    kept = log20.head()
    with tamper(journal) as db:
        db.execute("UPDATE audit SET event='test.forged' WHERE seq=3")
        db.execute("DELETE FROM audit WHERE seq=10")
        db.execute(
            "UPDATE audit_checkpoint SET signature=? WHERE seq=1",
            (forger.sign(b"x", ec.ECDSA(hashes.SHA256())),),
        )
        db.execute("DELETE FROM audit WHERE seq > 27")
    assert kinds(verify(journal, expected_head=kept)) == [
        (1, CHECKPOINT_SIGNATURE),
        (3, EDITED),
        (10, MISSING),
        (30, TRUNCATED),
    ]


def test_non_canonical_data_with_a_valid_hash_is_not_the_appliances(
    log20: AuditLog, journal: Journal
) -> None:
    with tamper(journal) as db:
        t, actor, event, prev = db.execute(
            "SELECT time, actor, event, prev_hash FROM audit WHERE seq=30"
        ).fetchone()
        data = '{"serial": "SN-1", "i": 1}'
        db.execute(
            "UPDATE audit SET data=?, hash=? WHERE seq=30",
            (data, entry_hash(30, t, actor, event, data, prev)),
        )
    assert kinds(verify(journal)) == [(30, NON_CANONICAL)]


def test_export_then_offline_verify_round_trip(
    log20: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey, tmp_path: Path
) -> None:
    log20.record("operator:jürgen", "auth.login", {"station": "Gerät 7", "x": 1.1})
    out = tmp_path / "export" / "audit.jsonl"
    head = export(journal, out)
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["type"] for x in lines[:2]] == ["header", "key"]
    assert [x["type"] for x in lines[-3:]] == ["checkpoint", "checkpoint", "head"]
    assert sum(x["type"] == "entry" for x in lines) == 31
    assert head == lines[-1] and head["seq"] == 31 and head["checkpoint"]["seq"] == 20
    assert out.read_text().isascii()
    journal.close()  # the auditor has only the file
    report = verify(out, public_key=audit_key.public_key(), expected_head=read_head(out))
    assert report.ok, report.text()
    assert report.entries == 31 and report.last_good_checkpoint == 20


def test_tampered_export_file_is_caught_offline(log20: AuditLog, journal: Journal, tmp_path: Path) -> None:
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
    # dropping the tail lines of the file: the file's own head record no longer matches
    out.write_text("\n".join(lines[:-6] + lines[-1:]) + "\n")
    assert (30, EXPORT_HEAD) in kinds(verify(out))


def test_checkpoint_is_stored_and_verifiable(audit: AuditLog, audit_key: HsmEcPrivateKey) -> None:
    audit.record("appliance", "test.event", {})
    cp = audit.checkpoint(audit_key)
    # the key was registered first (entry 2), then the head (2) was signed
    assert cp.seq == 2 and cp.key_label == "audit"
    assert audit.entries()[1].event == "audit.key-registered"
    assert cp.verifies_with(audit_key.public_key())
    assert audit.last_checkpoint() == cp
    assert audit.checkpoint(audit_key) == cp  # the same head is not signed twice
    assert audit.public_keys() == {"audit": spki_der(audit_key.public_key())}
    assert isinstance(cp, Checkpoint)


async def test_async_checkpoint(audit: AuditLog, audit_key: HsmEcPrivateKey, journal: Journal) -> None:
    await audit.arecord("operator:alice", "auth.login", {})
    cp = await audit.acheckpoint(audit_key)
    assert cp.seq == 2 and cp.verifies_with(audit_key.public_key())
    assert verify(journal, public_key=audit_key.public_key()).last_good_checkpoint == 2


def test_reordered_lines_in_an_export_file(log20: AuditLog, journal: Journal, tmp_path: Path) -> None:
    out = tmp_path / "audit.jsonl"
    export(journal, out)
    lines = out.read_text().splitlines()
    i = next(n for n, line in enumerate(lines) if json.loads(line).get("seq") == 5 and '"entry"' in line)
    lines[i], lines[i + 1] = lines[i + 1], lines[i]
    out.write_text("\n".join(lines) + "\n")
    report = verify(out)
    assert (5, OUT_OF_ORDER) in kinds(report) and not report.ok
