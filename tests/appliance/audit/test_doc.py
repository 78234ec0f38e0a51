"""docs/audit.md's worked example, checked against the code and against a verifier written from the doc alone."""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import struct
from pathlib import Path

from appliance.audit import AuditLog, canonical_json, checkpoint_message, entry_hash, export, verify
from appliance.audit.encoding import GENESIS_HASH, entry_preimage
from appliance.issuance.journal import Journal
from tests.appliance.audit.conftest import fill

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
    assert set(sections) == {"entry 1", "entry 2", "checkpoint"}
    prev = GENESIS_HASH
    for name in ("entry 1", "entry 2"):
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
    cp = sections["checkpoint"]
    assert bytes.fromhex(cp["head_hash"]) == prev
    assert bytes.fromhex(cp["bytes"]) == checkpoint_message(int(cp["seq"]), prev)
    assert bytes.fromhex(cp["bytes"]) == b"birthline-audit-checkpoint-v1" + (2).to_bytes(8, "big") + prev


def test_doc_verifier_checks_a_real_export(audit: AuditLog, journal: Journal, tmp_path: Path) -> None:
    """The document's export format and encoding are enough to verify what the appliance really writes."""
    fill(audit, 50)
    audit.record("operator:jürgen", "auth.login", {"note": "Gerät 7 \U0001f600", "t": 0.1})
    out = tmp_path / "audit.jsonl"
    export(journal, out)
    prev, n = GENESIS_HASH, 0
    for line in out.read_text().splitlines():
        rec = json.loads(line)
        if rec["type"] != "entry":
            continue
        n += 1
        assert rec["seq"] == n and bytes.fromhex(rec["prev_hash"]) == prev
        digest = _doc_entry_hash(rec["seq"], rec["time"], rec["actor"], rec["event"], rec["data"], prev)
        assert digest.hex() == rec["hash"]
        prev = digest
    assert n == 51 and json.loads(line)["hash"] == prev.hex()
    assert verify(out).ok


def test_documented_problem_kinds_are_exactly_the_codes() -> None:
    verify_module = importlib.import_module(
        "appliance.audit.verify"
    )  # the package exports verify(), the function

    table = DOC.read_text(encoding="utf-8").split("| kind | meaning |", 1)[1].split("\n\n", 1)[0]
    documented = set(
        re.findall(r"`([a-z-]+)`", "".join(line.split("|")[1] for line in table.splitlines()[2:]))
    )
    assert documented == set(verify_module.PROBLEM_KINDS)
