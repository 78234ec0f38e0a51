"""What production control needs from the audit log: the core's AuditSink protocol, re-exported."""

from appliance.issuance.policy import AuditSink

__all__ = ["AuditSink"]
