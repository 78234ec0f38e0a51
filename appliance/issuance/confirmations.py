"""Delivery confirmations: a station says it stored a certificate, and from then on it counts as delivered.
The service's confirmation batcher (ConfirmSteps, a mixin of IssueService whose state it uses, declared below)
runs these in one journal transaction for all that arrived together (record_confirmations)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import sqlite3
from collections.abc import Callable, Mapping, Sequence

from appliance.crashpoints import crash_point
from appliance.errors import BirthlineError, IssuanceFailed, IssuanceRefused, ReasonCode
from appliance.issuance.faults import IssuanceAlarms
from appliance.issuance.journal import Journal, work_order_of
from appliance.issuance.observe import Confirmation, IssuanceObserver
from appliance.issuance.policy import AuditSink

# A delivery confirmation: ("local", cert_serial) or ("ra", ra_request id), the hash, and who waits for it.
Confirm = tuple[str, str, bytes | None, "asyncio.Future[None]"]


class _NoAudit:
    def append(self, conn: sqlite3.Connection, actor: str, event: str, data: Mapping[str, object]) -> None:
        return None

    def record(self, actor: str, event: str, data: Mapping[str, object]) -> None:
        return None


_NO_AUDIT = _NoAudit()


def record_confirmations(
    conn: sqlite3.Connection,
    *,
    batch: Sequence[tuple[str, str, bytes | None, object]],
    clock: Callable[[], float],
    audit: AuditSink | None,
    errors: dict[int, BirthlineError],
    done: list[Confirmation],
) -> None:
    """In one transaction, each ("local", cert_serial | "ra", ra_request id, hash, waiter) of `batch`: a certificate
    issued is marked confirmed, one already confirmed is accepted again (the hash, if given, must be the stored
    certificate's); a refusal goes to `errors` by position, a confirmation to `done` (for the observer). A
    confirmed key update revokes the certificate it replaced where its product says so (revoke_replaced)."""
    now = clock()  # when the transaction runs, not when it was queued
    confirmed: list[str] = []
    upstream: list[int] = []
    for i, (kind, ref, cert_sha256, _) in enumerate(batch):
        if kind == "ra":
            row = conn.execute(
                "SELECT state, cert_der, station, device_serial, cert_serial, issued_at FROM ra_request"
                " WHERE id=?",
                (int(ref),),
            ).fetchone()
        else:
            row = conn.execute(
                "SELECT state, cert_der, station, device_serial, cert_serial, issued_at FROM issuance"
                " WHERE cert_serial=?",
                (ref,),
            ).fetchone()
        if row is None or row[0] not in ("issued", "confirmed"):
            what = f"request {ref} from the upstream CA" if kind == "ra" else f"with serial {ref}"
            errors[i] = IssuanceRefused(f"no issued certificate {what}", ReasonCode.BAD_REQUEST)
        elif cert_sha256 is not None and hashlib.sha256(row[1]).digest() != cert_sha256:
            errors[i] = IssuanceRefused(
                "the confirmed hash is not the issued certificate's: the station stored something else",
                ReasonCode.BAD_REQUEST,
            )
        elif row[0] == "issued" and kind == "ra":
            conn.execute(
                "UPDATE ra_request SET state='confirmed', confirmed_at=? WHERE id=?", (now, int(ref))
            )
            upstream.append(int(ref))
            done.append(Confirmation(str(row[2]), str(row[3]), str(row[4] or ""), now - float(row[5] or now)))
        elif row[0] == "issued":
            conn.execute(
                "UPDATE issuance SET state='confirmed', confirmed_at=? WHERE cert_serial=?", (now, ref)
            )
            confirmed.append(ref)
            done.append(Confirmation(str(row[2]), str(row[3]), ref, now - float(row[5] or now)))
    if confirmed:
        if audit is not None:
            audit.append(conn, "appliance", "issuance.confirmed", {"cert_serials": confirmed})
        revoke_replaced(conn, confirmed, now, audit)
    if upstream and audit is not None:
        audit.append(conn, "appliance", "issuance.confirmed", {"ra_requests": upstream})


def revoke_replaced(
    conn: sqlite3.Connection, confirmed: list[str], now: float, audit: AuditSink | None
) -> None:
    """A confirmed key update revokes the certificate it replaced (reason superseded) when its product says so
    (product.revoke_on_update): only now, so that a device that never got its new certificate can still
    retry with the old one. Audited as any revocation (cert.revoke), and sent upstream as rr by trigger."""
    from appliance.va.revocation import Reason, Source, revoke_in_transaction

    marks = ",".join("?" * len(confirmed))
    rows = conn.execute(
        f"SELECT n.id, n.cert_serial, o.cert_serial, o.ca, o.device_serial FROM issuance n"
        f" JOIN issuance o ON o.id = n.updates WHERE n.cert_serial IN ({marks})",
        confirmed,
    ).fetchall()
    for new_id, new_serial, old_serial, ca, device in rows:
        work_order = work_order_of(conn, int(new_id))
        policy = conn.execute(
            "SELECT p.revoke_on_update FROM work_order w JOIN product p ON p.name = w.product WHERE w.id=?",
            (work_order,),
        ).fetchone()
        if policy is not None and policy[0]:
            revoke_in_transaction(
                conn, audit or _NO_AUDIT, "appliance", [(str(old_serial), str(ca), str(device))],
                Reason.SUPERSEDED, Source.CMP, now=now, refuse_change=False,
                selector={"key_update": str(new_serial), "work_order": str(work_order)},
            )  # fmt: skip


class ConfirmSteps:
    journal: Journal
    audit: AuditSink | None
    observer: IssuanceObserver | None
    clock: Callable[[], float]
    batch_max: int
    _tg: asyncio.TaskGroup | None
    _confirms: asyncio.Queue[Confirm | None]
    _faults: IssuanceAlarms

    async def confirm(self, cert_serial: str, cert_sha256: bytes | None = None) -> None:
        """The station stored the certificate: from now on it counts as delivered.

        Confirmations that arrive together share one transaction, as issuances do: one fsync per station
        confirmation would cap a busy line at the disk's commit rate."""
        await self._confirm(("local", cert_serial, cert_sha256))

    async def confirm_upstream(self, ra_request: int, cert_sha256: bytes | None = None) -> None:
        """The same for a certificate the upstream CA issued in RA mode (IssueResult.upstream)."""
        await self._confirm(("ra", str(ra_request), cert_sha256))

    async def _confirm(self, what: tuple[str, str, bytes | None]) -> None:
        if self._tg is None:
            raise IssuanceFailed("the issuance service is not running", ReasonCode.BUSY)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._confirms.put((*what, fut))
        await fut

    async def _confirm_batcher(self) -> None:
        while (first := await self._confirms.get()) is not None:
            batch = [first]
            while len(batch) < self.batch_max and not self._confirms.empty():
                nxt = self._confirms.get_nowait()
                if nxt is None:
                    self._confirms.put_nowait(None)
                    break
                batch.append(nxt)
            errors: dict[int, BirthlineError] = {}
            done: list[Confirmation] = []
            record = functools.partial(
                record_confirmations,
                batch=batch,
                clock=self.clock,
                audit=self.audit,
                errors=errors,
                done=done,
            )
            try:
                await self.journal.atransaction(record, "confirming delivery")
            except BirthlineError as exc:
                self._faults.failed(exc)
                errors = dict.fromkeys(range(len(batch)), exc)
            else:
                crash_point("after-confirm")
                if done and self.observer is not None:
                    self.observer.confirmed(done)
            for i, (_, _, _, fut) in enumerate(batch):
                if fut.done():
                    continue
                if i in errors:
                    fut.set_exception(errors[i])
                else:
                    fut.set_result(None)
