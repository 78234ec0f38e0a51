"""The intent transaction of a batch: each request decided (clock, conflicts, work-order policy) and recorded in one
transaction, a SAVEPOINT per request, with its audit entries. Only a request whose intent row commits is signed
(IssueService._sign_and_store); a product in RA mode gets its upstream request and outbox row here instead.

A mixin of IssueService, whose state it uses (declared below): split from service.py by responsibility.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Mapping

from appliance.ca import CaRecord
from appliance.der import tbs_subject
from appliance.errors import IssuancePending, IssuanceRefused, ReasonCode
from appliance.issuance.checks import check_conflicts
from appliance.issuance.clockguard import ClockGuard
from appliance.issuance.conflicts import Present
from appliance.issuance.items import Item
from appliance.issuance.observe import IssuanceObserver
from appliance.issuance.policy import LOCAL, AuditSink, AuthorisationPolicy
from appliance.issuance.refusals import RefusalLimiter
from appliance.profiles import Profile


class IntentSteps:
    ca: CaRecord
    policy: AuthorisationPolicy
    audit: AuditSink | None
    observer: IssuanceObserver | None
    upstream_retry_s: float | None
    clock_guard: ClockGuard
    _profiles: dict[str, Profile]
    _refusals: RefusalLimiter

    def _note(self, conn: sqlite3.Connection, actor: str, event: str, data: Mapping[str, object]) -> None:
        """Append to the audit log inside `conn`'s transaction: the event commits or rolls back with the rows it
        describes, and if the log cannot be written the whole transaction fails (AUDIT_UNAVAILABLE)."""
        if self.audit is not None:
            self.audit.append(conn, actor, event, data)

    def _record_intents(
        self, conn: sqlite3.Connection, items: list[Item], refused: list[Item], now: float
    ) -> None:
        """One transaction for the whole batch; a SAVEPOINT per request so one refusal undoes only its own rows.
        Every refusal of the batch, including those found before (bad CSR, bad serial), is audited here."""
        # One audit entry per kind per batch, listing its requests: the chain still covers every issuance and
        # refusal, at the cost of one append per group commit rather than one per certificate.
        intents = self._decide(conn, items, now)
        if intents:
            self._note(conn, "appliance", "issuance.intent", {"ca": self.ca.name, "items": intents})
        refusals = [
            {"station": i.request.station, "request_id": i.request.request_id,
             "device_serial": i.request.device_serial, "code": i.error.code.name, "reason": i.error.message}
            for i in [*refused, *(i for i in items if i.error is not None)]
            if i.error is not None and not isinstance(i.error, IssuancePending)
        ]  # fmt: skip
        # Per station, the first refusal_burst refusals of a window in full, the rest counted (refusals.py).
        refusals = [r for r in refusals if self._refusals.admit(str(r["station"]), str(r["code"]), now)]
        if refusals:
            self._note(conn, "appliance", "issuance.refused", {"items": refusals})
        self._note_summaries(conn, now)

    def _note_summaries(self, conn: sqlite3.Connection, now: float, *, final: bool = False) -> None:
        summaries = self._refusals.due(now, all_windows=final)
        if summaries:
            self._note(conn, "appliance", "issuance.refused-summary", {"items": summaries})

    def _decide(self, conn: sqlite3.Connection, items: list[Item], now: float) -> list[dict[str, object]]:
        if (untrusted := self.clock_guard.refusal(conn, now)) is not None:
            for item in items:
                item.error = untrusted
            return []
        intents: list[dict[str, object]] = []
        forwarded: list[dict[str, object]] = []
        self.policy.begin(conn)
        present = Present(
            conn, self.ca.name, [i.request.device_serial for i in items],
            [i.prep.public_key_sha256 for i in items if i.prep is not None],
            [i.prep.serial_hex for i in items if i.prep is not None],
        )  # fmt: skip
        for item in items:
            assert item.prep is not None
            req, prep = item.request, item.prep
            conn.execute("SAVEPOINT item")
            try:
                check_conflicts(
                    conn, item, present, ca=self.ca.name, policy=self.policy, observed=self.observer is not None,
                    retry_s=self.upstream_retry_s,
                )  # fmt: skip
                grant = LOCAL
                if item.reuse is None and item.ra_done is None:
                    profile = self._profiles[prep.profile]
                    if item.update is not None:
                        grant = self.policy.authorise_update(conn, req, profile, item.update.id) or LOCAL
                    else:
                        grant = self.policy.authorise(conn, req, profile) or LOCAL
                    item.grant = grant
                if grant.mode == "upstream":
                    if req.local_only:
                        raise IssuanceRefused(
                            f"work order {grant.work_order} is for a product in upstream (RA) issuance mode; this"
                            " request can only be issued here (an appliance-generated key is kept nowhere to wait"
                            " for the upstream CA)",
                            ReasonCode.UNKNOWN_PROFILE,
                        )
                    forwarded.append(self._queue_upstream(conn, item, grant.work_order, now))
                    present.forwarded(req.device_serial, prep.public_key_sha256)
                elif item.reuse is None and item.ra_done is None:
                    old = item.update
                    if old is not None:
                        # The old row leaves the one-live-row-per-device index before the new one enters it; the
                        # link is made once the new row has its id (0 never outlives this savepoint).
                        conn.execute("UPDATE issuance SET updated_by = 0 WHERE id = ?", (old.id,))
                    cur = conn.execute(
                        "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256,"
                        " csr_sha256, cert_serial, tbs_sha256, state, created_at, updates)"
                        " VALUES (?,?,?,?,?,?,?,?,?,'intent',?,?)",
                        (
                            req.request_id, req.station, prep.profile, self.ca.name, req.device_serial,
                            prep.public_key_sha256, prep.csr_sha256, prep.serial_hex, prep.tbs.sha256, now,
                            None if old is None else old.id,
                        ),
                    )  # fmt: skip
                    item.row_id = cur.lastrowid
                    present.issued(req.device_serial, prep.public_key_sha256, prep.serial_hex)
                    if old is not None:
                        conn.execute("UPDATE issuance SET updated_by = ? WHERE id = ?", (item.row_id, old.id))
                    if self.audit is not None:
                        intents.append({
                            "id": item.row_id, "station": req.station, "request_id": req.request_id,
                            "device_serial": req.device_serial, "profile": prep.profile, "cert_serial": prep.serial_hex,
                            "tbs_sha256": prep.tbs.sha256.hex(), "public_key_sha256": prep.public_key_sha256.hex(),
                            **({"updates": old.cert_serial} if old is not None else {}),
                        })  # fmt: skip
                conn.execute("RELEASE item")
            except (IssuanceRefused, IssuancePending) as exc:
                conn.execute("ROLLBACK TO item")
                conn.execute("RELEASE item")
                item.error = exc
        self.clock_guard.issued(now)
        if forwarded:
            self._note(conn, "appliance", "issuance.forwarded", {"ca": self.ca.name, "items": forwarded})
        return intents

    def _queue_upstream(
        self, conn: sqlite3.Connection, item: Item, work_order: str | None, now: float
    ) -> dict[str, object]:
        """RA mode: record the authorised request and its outbox row (same SAVEPOINT as the policy's unit);
        nothing is signed here. The request is then answered "pending"."""
        if self.upstream_retry_s is None:
            raise IssuanceRefused(
                f"work order {work_order} is for a product in upstream (RA) issuance mode, and this appliance"
                " has no upstream CA configured ([upstream] url)",
                ReasonCode.UNKNOWN_PROFILE,
            )
        assert item.prep is not None
        req, prep = item.request, item.prep
        cur = conn.execute(
            "INSERT INTO ra_request (request_id, station, profile, ca, device_serial, public_key_sha256, csr_sha256,"
            " state, created_at) VALUES (?,?,?,?,?,?,?,'pending',?)",
            (req.request_id, req.station, prep.profile, self.ca.name, req.device_serial, prep.public_key_sha256,
             prep.csr_sha256 if req.csr else None, now),
        )  # fmt: skip
        ra_id = int(cur.lastrowid or 0)
        if req.csr:
            kind, csr, key, subject = "p10cr", req.csr, None, None
        else:
            # CRMF-enrolled (CMP ir/cr): the upstream gets the key and the subject the profile built (raVerified).
            kind, csr, key, subject = "cr", None, req.public_key_der, tbs_subject(prep.tbs.tbs)
        conn.execute(
            "INSERT INTO outbox (kind, ra_request_id, cert_serial, transaction_id, csr_der, public_key_der,"
            " subject_der, next_attempt_at, created_at) VALUES (?,?,'',?,?,?,?,?,?)",
            (kind, ra_id, os.urandom(16), csr, key, subject, now, now),
        )
        item.error = IssuancePending(
            "authorised; the upstream CA issues this certificate (RA mode)", self.upstream_retry_s, ra_id
        )
        return {"ra_request": ra_id, "station": req.station, "request_id": req.request_id,
                "device_serial": req.device_serial, "profile": prep.profile, "work_order": work_order,
                "public_key_sha256": prep.public_key_sha256.hex()}  # fmt: skip
