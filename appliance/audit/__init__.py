"""The tamper-evident audit log: a SHA-256 hash chain in the journal, with checkpoints chained into it as claims
and signed in the HSM.

See docs/audit.md for the encodings (an auditor can write a verifier from it) and how callers use it.
"""

from appliance.audit.checkpointer import Checkpointer
from appliance.audit.claims import EVENT_CHECKPOINT, CheckpointPolicy
from appliance.audit.encoding import (
    GENESIS_HASH,
    canonical_json,
    checkpoint_message,
    entry_hash,
    key_fingerprint,
)
from appliance.audit.log import (
    AUDIT_KEY_LABEL,
    AuditEntry,
    AuditError,
    AuditLog,
    Checkpoint,
    Head,
    ensure_audit_key,
    load_public_key,
)
from appliance.audit.verify import AuditProblem, VerifyReport, export, head_record, read_head, verify

__all__ = [
    "AUDIT_KEY_LABEL",
    "EVENT_CHECKPOINT",
    "GENESIS_HASH",
    "AuditEntry",
    "AuditError",
    "AuditLog",
    "AuditProblem",
    "Checkpoint",
    "CheckpointPolicy",
    "Checkpointer",
    "Head",
    "VerifyReport",
    "canonical_json",
    "checkpoint_message",
    "ensure_audit_key",
    "entry_hash",
    "export",
    "head_record",
    "key_fingerprint",
    "load_public_key",
    "read_head",
    "verify",
]
