"""Signing a batch and storing its certificates: the HSM signs the TBS of every request whose intent committed,
each signature is verified and its certificate assembled (finish.py), and the certificates, their upstream
outbox rows and their audit entry are stored in one transaction. A certificate is released (its caller answered)
only after that commits; if signing or storing fails, the batch's intents are burned (their serials are never
reused), and if even that cannot be recorded no new issuance starts until it can (fail closed).

A mixin of IssueService, whose state it uses (declared below): split from service.py by responsibility.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.der import tbs_subject
from appliance.errors import BirthlineError, IssuanceFailed, ReasonCode
from appliance.issuance.finish import finish_batch
from appliance.issuance.health import hsm_code
from appliance.issuance.items import IssueResult, Item
from appliance.issuance.journal import Journal
from appliance.issuance.observe import IssuanceObserver
from appliance.issuance.policy import AuditSink
from appliance.issuance.prepare import Preparer
from appliance.issuance.workers import PreparePool
from hsm.errors import HsmError
from hsm.keys import HsmPrivateKey

_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


class SignSteps:
    journal: Journal
    key: HsmPrivateKey
    audit: AuditSink | None
    observer: IssuanceObserver | None
    clock: Callable[[], float]
    forward_upstream: bool
    stats: dict[str, int]
    _preparer: Preparer
    _pool: PreparePool | None
    _hsm_fault: str | None
    _unsettled: list[int]

    if TYPE_CHECKING:  # IssueService's and IntentSteps' own; declared here for the type checker only

        def _note(
            self, conn: sqlite3.Connection, actor: str, event: str, data: Mapping[str, object]
        ) -> None: ...
        def _fail(self, items: list[Item], exc: BirthlineError) -> None: ...
        def _crash(self, point: str) -> None: ...
        def _result(
            self, der: bytes, serial: str, device: str, row_id: int | None, reused: bool
        ) -> IssueResult: ...

    async def _sign_and_store(self, items: list[Item]) -> bool:
        """Sign, verify and store; False if that failed (the items are then failed and their intents burned)."""
        ids = [i.row_id for i in items if i.row_id is not None]
        started = time.perf_counter()
        try:
            raws = await self.key.asign_unverified([i.prep.tbs.tbs for i in items if i.prep is not None])
            signed = []
            for item, raw in zip(items, raws, strict=True):
                assert item.prep is not None
                signed.append((item.prep.tbs, raw))
            ders = await finish_batch(self._preparer, self._pool, signed, self.key.label)
        except HsmError as exc:
            if self.observer is not None:
                self.observer.signed(len(items), time.perf_counter() - started)
            # Whatever went wrong in the HSM, the next batch first proves with a probe signature that it works
            # again, rather than reserving serials (and units) only to burn them.
            self._hsm_fault = exc.message
            await self._burn(ids, f"hsm: {type(exc).__name__}")
            self._fail(items, IssuanceFailed(f"HSM: {exc.message}", hsm_code(exc)))
            return False
        if self.observer is not None:
            self.observer.signed(len(items), time.perf_counter() - started)
        self._crash("after-sign")
        certs: list[tuple[int, bytes]] = []
        outbox: list[tuple[str, int, str, bytes, bytes | None, bytes | None, bytes | None, float, float]] = []
        issued_at = self.clock()
        for item, der in zip(items, ders, strict=True):
            assert item.prep is not None and item.row_id is not None
            certs.append((item.row_id, der))
            # The upstream record: the device's CSR (p10cr), or for a CRMF-enrolled device its key and the
            # subject we certified (cr with raVerified). Built and RA-protected later, by the forwarder.
            req = item.request
            if not self.forward_upstream:
                continue
            if req.csr and item.update is None:
                outbox.append(("p10cr", item.row_id, item.prep.serial_hex, os.urandom(16), req.csr, None, None,
                               issued_at, issued_at))  # fmt: skip
            else:
                # A key update goes upstream as kur for the upstream's certificate of the device (forwarder).
                key = req.public_key_der or x509.load_der_x509_csr(req.csr).public_key().public_bytes(*_SPKI)
                outbox.append(("kur" if item.update is not None else "cr", item.row_id, item.prep.serial_hex,
                               os.urandom(16), None, key, tbs_subject(item.prep.tbs.tbs), issued_at, issued_at))  # fmt: skip

        def store(conn: sqlite3.Connection) -> None:
            cur = conn.executemany(
                "UPDATE issuance SET state='issued', cert_der=?, issued_at=? WHERE id=? AND state='intent'",
                [(der, issued_at, row_id) for row_id, der in certs],
            )
            if cur.rowcount != len(certs):  # rolled back whole: nothing of the batch is stored
                raise IssuanceFailed(
                    f"{len(certs) - cur.rowcount} intent(s) vanished before storing", ReasonCode.INTERNAL
                )
            conn.executemany(
                "INSERT INTO outbox (kind, issuance_id, cert_serial, transaction_id, csr_der, public_key_der,"
                " subject_der, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                outbox,
            )
            if self.audit is not None:  # the list costs ~2 us a certificate: not built for nobody
                self._note(conn, "appliance", "issuance.issued", {
                    "items": [{"id": row_id, "cert_sha256": hashlib.sha256(der).hexdigest()} for row_id, der in certs]
                })  # fmt: skip

        try:
            await self.journal.atransaction(store, "storing certificates")
        except BirthlineError as exc:
            # The certificates were signed but not stored: they must never be released. Burn the intents.
            await self._burn(ids, "store failed")
            self._fail(items, exc)
            return False
        self._crash("after-store")
        for item, (_, der) in zip(items, certs, strict=True):
            assert item.prep is not None
            self.stats["issued"] += 1
            item.future.set_result(
                self._result(der, item.prep.serial_hex, item.request.device_serial, item.row_id, False)
            )
        return True

    async def _burn(self, ids: list[int], reason: str) -> None:
        def txn(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE issuance SET state='burned', burn_reason=? WHERE id=? AND state='intent'",
                [(reason, i) for i in ids],
            )
            self._note(conn, "appliance", "issuance.burned", {"reason": reason, "ids": ids})

        try:
            await self.journal.atransaction(txn, "burning unreleased intents")
        except BirthlineError:
            # Remember them; no new issuance starts until they are settled (fail closed).
            self._unsettled.extend(ids)

    async def _settle(self) -> None:
        if self._unsettled:
            ids, self._unsettled = self._unsettled, []
            await self._burn(ids, "store failed")
            if self._unsettled:
                raise IssuanceFailed(
                    "the journal cannot record earlier failed issuances; issuance is stopped",
                    ReasonCode.JOURNAL_UNAVAILABLE,
                )
