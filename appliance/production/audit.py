"""What production control needs from the audit log (appliance/audit.AuditLog has exactly this shape).

A Protocol rather than an import keeps this package testable on its own and lets tests pass a recorder.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping
from typing import Any, Protocol


class AuditSink(Protocol):
    def append(self, conn: sqlite3.Connection, actor: str, event: str, data: Mapping[str, Any]) -> Any:
        """Append inside the caller's open transaction (journal thread); raise to roll the change back."""

    def record(self, actor: str, event: str, data: Mapping[str, Any]) -> Any:
        """Append a standalone event in its own transaction."""
