"""docs/audit.md's worked example, checked against the code and against a verifier written from the doc alone."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import shutil
import struct
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes as hashes_mod
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.audit import (
    AuditLog,
    canonical_json,
    checkpoint_message,
    entry_hash,
    export,
    key_fingerprint,
    verify,
)
from appliance.audit.claims import EVENT_CHECKPOINT, CheckpointPolicy, claim_data
from appliance.audit.encoding import GENESIS_HASH, entry_preimage
from appliance.issuance.journal import Journal
from hsm.keys import HsmEcPrivateKey
from tests.appliance.audit.conftest import fill, tamper
from tests.appliance.audit.test_verify import MATRIX

DOC = Path(__file__).resolve().parents[3] / "docs" / "audit.md"


def _sections() -> dict[str, dict[str, str]]:
    text = DOC.read_text(encoding="utf-8")
    m = re.search(
        r"<!-- audit-worked-example:begin -->\n```text\n(.*?)```\n<!-- audit-worked-example:end -->",
        text,
        re.S,
    )
    assert m, "worked example block missing from docs/audit.md"
    sections: dict[str, dict[str, str]] = {}
    current: dict[str, str] = {}
    for line in m.group(1).splitlines():
        if not line.strip():
            continue
        if re.fullmatch(r"entry \d+|checkpoint", line):
            current = sections[line] = {"bytes": ""}
        elif line.startswith("  "):
            hexpart, _, _comment = line.partition("#")
            current["bytes"] += hexpart.replace(" ", "")
        elif " = " in line:
            key, _, value = line.partition(" = ")
            current[key.strip()] = value
    return sections


def _doc_entry_hash(seq: int, time: float, actor: str, event: str, data: str, prev: bytes) -> bytes:
    """An auditor's own implementation, from the document's encoding section only."""

    def lp(b: bytes) -> bytes:
        return len(b).to_bytes(4, "big") + b

    pre = (
        b"birthline-audit-entry-v1"
        + seq.to_bytes(8, "big")
        + struct.pack(">d", time)
        + lp(actor.encode())
        + lp(event.encode())
        + lp(data.encode())
        + prev
    )
    return hashlib.sha256(pre).digest()


def test_worked_example_matches_the_code() -> None:
    sections = _sections()
    assert set(sections) == {"entry 1", "entry 2", "entry 3", "checkpoint"}
    prev = GENESIS_HASH
    for name in ("entry 1", "entry 2", "entry 3"):
        s = sections[name]
        seq, time = int(s["seq"]), float(s["time"])
        actor, event, data = json.loads(s["actor"]), json.loads(s["event"]), s["data"]
        assert bytes.fromhex(s["prev_hash"]) == prev
        pre = entry_preimage(seq, time, actor, event, data, prev)
        assert bytes.fromhex(s["bytes"]) == pre, f"{name}: documented preimage differs from the code"
        digest = entry_hash(seq, time, actor, event, data, prev)
        assert s["hash"] == digest.hex() == hashlib.sha256(bytes.fromhex(s["bytes"])).hexdigest()
        assert _doc_entry_hash(seq, time, actor, event, data, prev) == digest
        prev = digest
    # entry 2's data is the canonical form of the input the document describes
    assert sections["entry 2"]["data"] == canonical_json(
        {"device_serial": "SN-0001", "subject": "Gerät 7", "public_key_sha256": b"\x00\x01\x02\x03"}
    )
    # entry 3 is a claim as the appliance writes it, for the example key (private key 1, the generator point)
    example_key = ec.derive_private_key(1, ec.SECP256R1()).public_key()
    assert json.loads(sections["entry 3"]["event"]) == EVENT_CHECKPOINT
    assert sections["entry 3"]["data"] == canonical_json(
        claim_data("audit", key_fingerprint(example_key), CheckpointPolicy(1000, 300.0), "interval")
    )
    cp = sections["checkpoint"]
    assert int(cp["seq"]) == 3 and bytes.fromhex(cp["head_hash"]) == prev
    assert bytes.fromhex(cp["bytes"]) == checkpoint_message(int(cp["seq"]), prev)
    assert bytes.fromhex(cp["bytes"]) == b"birthline-audit-checkpoint-v1" + (3).to_bytes(8, "big") + prev


def _doc_verify(path: Path, pin: ec.EllipticCurvePublicKey) -> str:
    """An auditor's verifier of an export, from the document's encoding, export format and "The rules" alone:
    returns the verdict ("intact", "unsigned-tail" or "not-intact")."""
    entries, rows = [], {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] == "entry":
            entries.append(rec)
        elif rec["type"] == "checkpoint":
            rows[rec["seq"]] = rec
    problems = 0
    # 1. the chain
    prev, hashes = bytes(32), {}
    for n, rec in enumerate(entries, 1):
        if rec["seq"] != n or bytes.fromhex(rec["prev_hash"]) != prev:
            problems += 1
        digest = _doc_entry_hash(n, rec["time"], rec["actor"], rec["event"], rec["data"], prev)
        if digest.hex() != rec["hash"]:
            problems += 1
        hashes[n], prev = digest, digest
    # 2. signatures
    good = set()
    for seq, row in rows.items():
        message = b"birthline-audit-checkpoint-v1" + seq.to_bytes(8, "big") + bytes.fromhex(row["head_hash"])
        try:
            pin.verify(bytes.fromhex(row["signature"]), message, ec.ECDSA(hashes_mod.SHA256()))
        except InvalidSignature:
            problems += 1
            continue
        if hashes.get(seq, b"").hex() != row["head_hash"]:
            problems += 1
            continue
        good.add(seq)
    # 3. claims
    pin_sha256 = hashlib.sha256(
        pin.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    ).hexdigest()
    claims = [rec["seq"] for rec in entries if rec["event"] == "audit.checkpoint"]
    problems += sum(1 for seq in claims[:-1] if seq not in rows)
    problems += sum(
        1
        for seq in claims
        if seq in good and json.loads(entries[seq - 1]["data"])["key_sha256"] != pin_sha256
    )
    # 4. coverage, 5. the bound
    signed, last = max(good, default=0), len(entries)
    if last > signed:
        stated = [seq for seq in claims if seq in good]
        if stated:
            policy = json.loads(entries[stated[-1] - 1]["data"])["policy"]
            age = entries[-1]["time"] - entries[signed]["time"]
            if last - signed > policy["max_unsigned_entries"] or age > policy["max_unsigned_s"]:
                problems += 1
    return "not-intact" if problems else ("unsigned-tail" if last > signed else "intact")


def test_doc_verifier_checks_a_real_export(
    audit: AuditLog, journal: Journal, audit_key: HsmEcPrivateKey, tmp_path: Path
) -> None:
    """The document's export format, encoding and rules are enough to verify what the appliance really writes,
    and to reach the same verdict as `verify` on the tampered logs of the matrix."""
    audit.checkpoint(audit_key)  # the shape of test_verify's `stopped` log: claims at 2, 21 and 31
    fill(audit, 17)
    audit.record("operator:jürgen", "auth.login", {"note": "Gerät 7 \U0001f600", "t": 0.1})
    audit.checkpoint(audit_key)
    fill(audit, 9)
    pin = audit_key.public_key()

    def both(j: Journal, name: str) -> tuple[str, str]:
        out = tmp_path / f"{name}.jsonl"
        export(j, out)
        return _doc_verify(out, pin), verify(out, public_key=pin).status

    assert both(journal, "live") == ("unsigned-tail", "unsigned-tail")  # entries 22..30 not signed yet
    assert audit.checkpoint(audit_key, reason="final").seq == 31
    assert both(journal, "stopped") == ("intact", "intact")
    journal.call(lambda: journal.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    for n, (name, (fn, _alone, pinned, _head)) in enumerate(MATRIX.items()):
        copy = tmp_path / f"copy-{n}.sqlite"
        shutil.copy(journal.path, copy)
        with Journal(copy) as j:
            with tamper(j) as db:
                fn(db)
            assert both(j, f"copy-{n}") == (pinned, pinned), name


def test_doc_verifier_reaches_the_bound(journal: Journal, audit_key: HsmEcPrivateKey, tmp_path: Path) -> None:
    now = [1_700_000_000.0]
    log = AuditLog(journal, clock=lambda: now[0], policy=CheckpointPolicy(every_entries=10, every_s=60))
    log.checkpoint(audit_key)
    fill(log, 20)
    out = tmp_path / "audit.jsonl"
    export(journal, out)
    assert _doc_verify(out, audit_key.public_key()) == verify(out).status == "unsigned-tail"
    now[0] += 121
    fill(log, 1)
    export(journal, out)
    assert _doc_verify(out, audit_key.public_key()) == verify(out).status == "not-intact"


def test_documented_problem_kinds_are_exactly_the_codes() -> None:
    verify_module = importlib.import_module(
        "appliance.audit.verify"
    )  # the package exports verify(), the function

    table = DOC.read_text(encoding="utf-8").split("| kind | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = set(
        re.findall(r"`([a-z-]+)`", "".join(line.split("|")[1] for line in table.splitlines()[2:]))
    )
    assert documented == set(verify_module.PROBLEM_KINDS)
