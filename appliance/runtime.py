"""Compose the core from a Config: HSM token, journal, CA records and the issuance service.

The CLI, the demo and the daemon all open the appliance through here, so there is one way to do it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.alarms import Alarms
from appliance.audit.claims import REASON_EXIT
from appliance.audit.log import AUDIT_KEY_LABEL, AuditLog, ensure_audit_key
from appliance.ca import CaRecord, load_ca
from appliance.config import Config
from appliance.errors import BirthlineError, IssuanceFailed, ReasonCode
from appliance.files import refuse_shared_files, secure_state_dir
from appliance.issuance.activity import Activity
from appliance.issuance.journal import Journal, journal_files
from appliance.issuance.schema import MIGRATED_PREFIX
from hsm.errors import HsmError

if TYPE_CHECKING:
    # Imported where used: a read-only command (read_journal) loads neither issuance nor the HSM session layer.
    from appliance.issuance.policy import AuthorisationPolicy
    from appliance.issuance.service import IssueService
    from hsm.token import Token

log = logging.getLogger(__name__)


@dataclass
class Core:
    config: Config
    token: Token
    journal: Journal

    @functools.cached_property
    def audit(self) -> AuditLog:
        return AuditLog(self.journal, policy=self.config.audit.policy)

    @functools.cached_property
    def alarms(self) -> Alarms:
        """The appliance's open alarms (appliance/alarms.py): one registry per process, shared by every
        component composed from this core."""
        return Alarms()

    @functools.cached_property
    def activity(self) -> Activity:
        """Whether issuance is at work, shared by every IssueService of the process and the OCSP responder,
        which yields to it (appliance/issuance/activity.py)."""
        return Activity()

    def issuing_ca(self, name: str | None = None) -> CaRecord:
        return load_ca(self.journal, name or self.config.issuance.issuing_ca)

    def issue_service(
        self,
        policy: AuthorisationPolicy | None = None,
        *,
        prepare_workers: int | None = None,
        admission: Callable[[], str | None] | None = None,
        recover_intents: bool = True,
        ca_name: str | None = None,
    ) -> IssueService:
        """Issuance as every front end gets it: the work-order policy (unless a test passes another) and the
        audit log. prepare_workers overrides the configuration: a one-shot CLI command need not start processes.
        `ca_name`: another issuing CA than [issuance] issuing_ca (a CMP label's issuing_ca), with its own work
        orders (the policy only authorises products of the service's CA)."""
        from appliance.issuance.service import IssueService
        from appliance.production.policy import WorkOrderPolicy

        ca = self.issuing_ca(ca_name)
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
            # Counts suspended time too (CLOCK_MONOTONIC does not): only a set wall clock differs from it.
            steady_clock=lambda: time.clock_gettime(time.CLOCK_BOOTTIME),
            prepare_workers=self.config.issuance.prepare_workers
            if prepare_workers is None
            else prepare_workers,
            pipeline_depth=self.config.issuance.pipeline_depth,
            refusal_burst=self.config.issuance.refusal_burst,
            refusal_window_s=self.config.issuance.refusal_window_s,
            admission=admission,
            alarms=self.alarms,
            upstream_retry_s=self.config.upstream.pending_retry_s if self.config.upstream.enabled else None,
            quota_warning_percent=self.config.issuance.quota_warning_percent,
            max_queued=self.config.issuance.max_queued,
            recover_intents=recover_intents,
            forward_upstream=self.config.upstream.enabled,
            activity=self.activity,
        )


def check_state(config: Config) -> None:
    """Refuse state that group or others can reach: the journal holds station keys in clear and password
    hashes, the state directory also the TLS key and secret files. A directory that existed before keeps the
    mode it was given, so this runs at every open, not only when the directory is made."""
    secure_state_dir(config.appliance.state_dir, "the journal (station keys, password hashes) and TLS keys")
    refuse_shared_files(journal_files(config.journal.path), "the station keys and password hashes it holds")


@contextlib.contextmanager
def read_journal(config: Config) -> Iterator[Journal]:
    """The journal alone and read-only, for commands that only read (lists, reports, exports, audit verify): no
    HSM login, nothing created, and no mode checks, so a forensic copy can be read wherever it is."""
    with Journal(config.journal.path, read_only=True) as journal:
        yield journal


@contextlib.contextmanager
def open_core(config: Config) -> Iterator[Core]:
    """The core for one process. A process that wrote to the journal signs the audit log as it leaves (see
    sign_on_exit), so a log at rest has no unsigned entries whichever command wrote them."""
    from hsm.token import Token

    check_state(config)
    try:
        token = Token.open(config.hsm)
    except HsmError as exc:
        raise IssuanceFailed(
            f"HSM: {exc.message}: `birthline config check` checks the PIN file, the module, the token and one"
            " login, and says what to do",
            ReasonCode.HSM_UNAVAILABLE,
        ) from exc
    try:
        with Journal(config.journal.path) as journal:
            core = Core(config, token, journal)
            changes = journal.call(lambda: journal.conn.total_changes)
            try:
                yield core
            finally:
                sign_on_exit(core, changes)
    finally:
        token.close()


def sign_on_exit(core: Core, changes_at_open: int) -> None:
    """Checkpoint the audit log if this process wrote to the journal (its connection's change count moved) and
    the appliance has an audit key (after `birthline init`). The daemon's checkpointer has signed already; a
    CLI command's entries (a login, a change, a refusal) are signed here, whether or not the command succeeded.
    A failure (HSM, journal, a key that is not the recorded one) is logged, not raised, and leaves the entries
    for the next checkpoint (the daemon signs what it finds unsigned when it starts)."""
    journal = core.journal
    try:
        if journal.call(lambda: journal.conn.total_changes) == changes_at_open:
            return
        if not core.audit.public_keys() or not core.token.has_key(AUDIT_KEY_LABEL):
            return
        core.audit.checkpoint(ensure_audit_key(core.token), reason=REASON_EXIT)
    # It runs in a finally: it must not replace the command's own outcome. RuntimeError: the journal's thread
    # has already been shut down.
    except (BirthlineError, HsmError, sqlite3.Error, RuntimeError) as exc:
        log.warning("audit: the entries this command wrote stay unsigned until the next checkpoint: %s", exc)


@contextlib.asynccontextmanager
async def running_issuer(
    core: Core,
    policy: AuthorisationPolicy | None = None,
    *,
    prepare_workers: int | None = None,
    recover_intents: bool = True,
) -> AsyncIterator[IssueService]:
    async with core.issue_service(
        policy, prepare_workers=prepare_workers, recover_intents=recover_intents
    ) as service:
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
        # Migrations since the last start (the journal notes them in meta, in each migration's transaction).
        for key, note in conn.execute(
            "SELECT key, value FROM meta WHERE key LIKE ? ORDER BY CAST(substr(key, ?) AS INTEGER)",
            (f"{MIGRATED_PREFIX}%", len(MIGRATED_PREFIX) + 1),
        ).fetchall():
            core.audit.append(conn, actor, "journal.migrated", json.loads(note))
            conn.execute("DELETE FROM meta WHERE key = ?", (key,))
        core.audit.append(conn, actor, "appliance.started", {
            "config": str(core.config.source), "issuing_ca": core.config.issuance.issuing_ca,
            "profiles_sha256": digest,
        })  # fmt: skip
        return changed

    return core.journal.call(lambda: core.journal.transaction(txn, "recording the start"))
