"""Compose the core from a Config: HSM token, journal, CA records and the issuance service.

The CLI, the demo and the daemon all open the appliance through here, so there is one way to do it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from appliance.alarms import Alarms
from appliance.audit.log import AuditLog
from appliance.ca import CaRecord, load_ca
from appliance.config import Config
from appliance.errors import IssuanceFailed, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuthorisationPolicy
from appliance.issuance.service import IssueService
from appliance.production.policy import WorkOrderPolicy
from hsm.errors import HsmError
from hsm.token import Token


@dataclass
class Core:
    config: Config
    token: Token
    journal: Journal

    @functools.cached_property
    def audit(self) -> AuditLog:
        return AuditLog(self.journal)

    @functools.cached_property
    def alarms(self) -> Alarms:
        """The appliance's open alarms (appliance/alarms.py): one registry per process, shared by every
        component composed from this core."""
        return Alarms()

    def issuing_ca(self) -> CaRecord:
        return load_ca(self.journal, self.config.issuance.issuing_ca)

    def issue_service(
        self,
        policy: AuthorisationPolicy | None = None,
        *,
        prepare_workers: int | None = None,
        admission: Callable[[], str | None] | None = None,
    ) -> IssueService:
        """Issuance as every front end gets it: the work-order policy (unless a test passes another) and the
        audit log. prepare_workers overrides the configuration: a one-shot CLI command need not start processes."""
        ca = self.issuing_ca()
        if ca.state != "active":
            raise IssuanceFailed(
                f"issuing CA {ca.name!r} is {ca.state}: import its certificate first",
                ReasonCode.UNKNOWN_PROFILE,
            )
        return IssueService(
            self.journal,
            ca,
            self.token.get_key(ca.key_label),
            self.config.profiles,
            default_profile=self.config.issuance.default_profile,
            policy=policy or WorkOrderPolicy(ca.name),
            audit=self.audit,
            batch_max=self.config.journal.batch_max,
            max_csr_bytes=self.config.issuance.max_csr_bytes,
            clock_skew_s=self.config.issuance.clock_skew_s,
            prepare_workers=self.config.issuance.prepare_workers
            if prepare_workers is None
            else prepare_workers,
            pipeline_depth=self.config.issuance.pipeline_depth,
            refusal_burst=self.config.issuance.refusal_burst,
            refusal_window_s=self.config.issuance.refusal_window_s,
            admission=admission,
            alarms=self.alarms,
            upstream_retry_s=self.config.upstream.pending_retry_s if self.config.upstream.enabled else None,
        )


@contextlib.contextmanager
def open_core(config: Config) -> Iterator[Core]:
    config.appliance.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        token = Token.open(config.hsm)
    except HsmError as exc:
        raise IssuanceFailed(f"HSM: {exc.message}", ReasonCode.HSM_UNAVAILABLE) from exc
    try:
        with Journal(config.journal.path) as journal:
            yield Core(config, token, journal)
    finally:
        token.close()


@contextlib.asynccontextmanager
async def running_issuer(
    core: Core, policy: AuthorisationPolicy | None = None, *, prepare_workers: int | None = None
) -> AsyncIterator[IssueService]:
    async with core.issue_service(policy, prepare_workers=prepare_workers) as service:
        yield service


def _profiles_document(config: Config) -> dict[str, Any]:
    def plain(value: Any) -> Any:
        if isinstance(value, frozenset | set):
            return sorted(value)
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        return value

    return {
        name: {k: plain(v) for k, v in dataclasses.asdict(p).items()}
        for name, p in sorted(config.profiles.items())
    }


def record_start(core: Core, actor: str = "appliance") -> bool:
    """Audit the start of the daemon and, when the certificate profiles differ from the last start, the new
    profiles in full, so an auditor sees every profile change even though profiles live in the config file.
    Returns whether the profiles changed."""
    document = _profiles_document(core.config)
    digest = hashlib.sha256(json.dumps(document, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def txn(conn: sqlite3.Connection) -> bool:
        row = conn.execute("SELECT value FROM meta WHERE key='profiles_sha256'").fetchone()
        changed = row is None or row[0] != digest
        if changed:
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('profiles_sha256', ?)", (digest,))
            core.audit.append(
                conn, actor, "profile.changed", {"profiles_sha256": digest, "profiles": document}
            )
        core.audit.append(conn, actor, "appliance.started", {
            "config": str(core.config.source), "issuing_ca": core.config.issuance.issuing_ca,
            "profiles_sha256": digest,
        })  # fmt: skip
        return changed

    return core.journal.call(lambda: core.journal.transaction(txn, "recording the start"))
