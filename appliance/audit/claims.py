"""Checkpoint claims: the `audit.checkpoint` entries that chain every checkpoint into the log itself.

A checkpoint is an entry first (the claim: which key signs, and the checkpoint policy the log promises from
here on), then a signature over that entry's own (seq, hash), stored in audit_checkpoint. Each signature covers
every entry up to and including its claim, so the next checkpoint signs over the previous one, and a deleted
signature row leaves its claim behind in the chain, where verify finds it (docs/audit.md, "Checkpoints").
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from appliance.audit.encoding import HASH_SIZE

EVENT_CHECKPOINT = "audit.checkpoint"

# Why a checkpoint was made (informational: verify does not depend on it).
REASON_INTERVAL = "interval"  # the daemon's checkpointer: every N entries or T seconds
REASON_START = "start"  # the daemon found entries nobody signed (a crash, or writes while it was stopped)
REASON_FINAL = "final"  # the daemon's clean exit
REASON_EXIT = "exit"  # a command that wrote to the log, as it exits
REASON_ON_DEMAND = "on-demand"  # a person (`birthline audit checkpoint`) or a caller's explicit request


@dataclass(frozen=True)
class CheckpointPolicy:
    """When the appliance signs its head, and the bound it promises (and verify enforces) on unsigned entries.

    The checkpointer signs once `every_entries` entries are unsigned, or `every_s` seconds after its last
    signature if any entry is unsigned. The promise stated in every claim is twice that: at most
    `max_unsigned_entries` entries after the last signature, and no unsigned entry older than `max_unsigned_s`
    seconds when a later entry was written. The factor of two leaves room for the checkpointer's poll, the
    signing round trip and a loaded machine; anything beyond it means checkpoints were removed or not made.
    """

    every_entries: int = 1000
    every_s: float = 300.0

    def __post_init__(self) -> None:
        if self.every_entries < 1 or not (math.isfinite(self.every_s) and self.every_s > 0):
            raise ValueError("checkpoint every_entries and every_s must be positive")

    @property
    def max_unsigned_entries(self) -> int:
        return 2 * self.every_entries

    @property
    def max_unsigned_s(self) -> float:
        return 2.0 * self.every_s

    def to_json(self) -> dict[str, Any]:
        return {
            "every_entries": self.every_entries,
            "every_s": float(self.every_s),
            "max_unsigned_entries": self.max_unsigned_entries,
            "max_unsigned_s": self.max_unsigned_s,
        }


def claim_data(key_label: str, key_sha256: bytes, policy: CheckpointPolicy, reason: str) -> dict[str, Any]:
    """The data of an audit.checkpoint entry."""
    return {"key_label": key_label, "key_sha256": key_sha256, "policy": policy.to_json(), "reason": reason}


@dataclass(frozen=True)
class Claim:
    """An audit.checkpoint entry as verify reads it."""

    seq: int
    key_label: str
    key_sha256: bytes
    max_unsigned_entries: int
    max_unsigned_s: float


def parse_claim(seq: int, data: str) -> Claim:
    """Read a claim's data (the stored canonical JSON); ValueError if it is not what the appliance writes."""
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise ValueError("not a JSON object")
    label, fp, policy = obj.get("key_label"), obj.get("key_sha256"), obj.get("policy")
    if not isinstance(label, str) or not label:
        raise ValueError("key_label missing")
    if not isinstance(fp, str) or len(fp) != 2 * HASH_SIZE:
        raise ValueError("key_sha256 is not 64 hex digits")
    digest = bytes.fromhex(fp)  # ValueError for non-hex
    if not isinstance(policy, dict):
        raise ValueError("policy missing")
    entries, seconds = policy.get("max_unsigned_entries"), policy.get("max_unsigned_s")
    if isinstance(entries, bool) or not isinstance(entries, int) or entries < 1:
        raise ValueError("policy.max_unsigned_entries is not a positive integer")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not 0 < seconds < math.inf:
        raise ValueError("policy.max_unsigned_s is not a positive number")
    return Claim(seq, label, digest, entries, float(seconds))
