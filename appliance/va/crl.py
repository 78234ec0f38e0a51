"""Full CRLs per issuing CA, signed in the HSM with the CA key (RFC 5280 section 5).

Each CRL carries the CRL Number (monotonic per CA, persisted in the `crl` table with the DER), the Authority
Key Identifier, thisUpdate/nextUpdate (`validity_s`, default 24 h), and per entry the reasonCode (omitted for
unspecified, RFC 5280 5.3.1) and the invalidityDate when known. The latest DER is stored in the journal, so
serving a CRL never signs on the request path.

`CrlPublisher` regenerates a CA's CRL when one of its revocations changed (any process: it compares
MAX(revocation.change_seq) with the one the stored CRL lists), at half its validity, or when nudged.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.alarms import Alarms
from appliance.ca import CaRecord, list_cas, load_ca
from appliance.crashpoints import crash_point
from appliance.errors import BirthlineError
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.lifecycle import PollingTask
from appliance.va.revocation import Reason, Revocation, iso
from hsm.algorithms import default_hash
from hsm.errors import HsmError
from hsm.token import Token

log = logging.getLogger(__name__)

DEFAULT_CRL_VALIDITY_S = 24 * 3600.0


@dataclass(frozen=True)
class CrlInfo:
    ca: str
    number: int
    this_update: float
    next_update: float
    revoked_count: int
    revocation_seq: int
    der: bytes

    @property
    def refresh_at(self) -> float:
        """Half-life: regenerate from here on, so a relying party never holds an expired CRL."""
        return self.this_update + (self.next_update - self.this_update) / 2

    @property
    def pem(self) -> bytes:
        return x509.load_der_x509_crl(self.der).public_bytes(serialization.Encoding.PEM)


def _utc(t: float) -> dt.datetime:
    return dt.datetime.fromtimestamp(int(t), dt.UTC)


def _ski(cert: x509.Certificate) -> x509.SubjectKeyIdentifier:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key())


def issuing_cas(journal: Journal) -> list[CaRecord]:
    """The CAs this appliance publishes CRLs and answers OCSP for: active issuing CAs."""
    return [c for c in list_cas(journal) if c.role == "issuing" and c.state == "active"]


def build_crl(
    ca: CaRecord,
    key: object,
    entries: Sequence[Revocation],
    number: int,
    this_update: float,
    next_update: float,
) -> bytes:
    cert = ca.certificate
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(cert.subject)
        .last_update(_utc(this_update))
        .next_update(_utc(next_update))
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(_ski(cert)), critical=False
        )
    )
    for r in entries:
        entry = (
            x509.RevokedCertificateBuilder()
            .serial_number(r.serial_number)
            .revocation_date(_utc(r.revoked_at))
        )
        if r.reason != Reason.UNSPECIFIED:
            entry = entry.add_extension(x509.CRLReason(r.reason.flag), critical=False)
        if r.invalidity_date is not None:
            entry = entry.add_extension(
                x509.InvalidityDate(_utc(r.invalidity_date).replace(tzinfo=None)), False
            )
        builder = builder.add_revoked_certificate(entry.build())
    crl = builder.sign(key, default_hash(ca.key_algorithm))  # type: ignore[arg-type]
    return crl.public_bytes(serialization.Encoding.DER)


_CRL_COLS = "ca, crl_number, this_update, next_update, revoked_count, revocation_seq, der"


def _crl_row(row: Sequence[object]) -> CrlInfo:
    ca, number, tu, nu, count, seq, der = row
    return CrlInfo(str(ca), int(number), float(tu), float(nu), int(count), int(seq), bytes(der))  # type: ignore[arg-type, call-overload]


def load_crl(journal: Journal, ca: str) -> CrlInfo | None:
    row = journal.call(
        lambda: journal.conn.execute(f"SELECT {_CRL_COLS} FROM crl WHERE ca=?", (ca,)).fetchone()
    )
    return None if row is None else _crl_row(row)


def _revocation_seq(conn: sqlite3.Connection, ca: str) -> int:
    return int(
        conn.execute("SELECT COALESCE(MAX(change_seq), 0) FROM revocation WHERE ca=?", (ca,)).fetchone()[0]
    )


def generate_crl(
    journal: Journal,
    token: Token,
    audit: AuditSink,
    ca_name: str,
    *,
    validity_s: float = DEFAULT_CRL_VALIDITY_S,
    actor: str = "appliance",
    clock: Callable[[], float] = time.time,
) -> CrlInfo:
    """Sign a new full CRL for `ca_name` in the HSM, store it (number + 1) and audit it. Blocking: from async
    code run it in a thread. A CRL whose store fails was never published, so its number may be used again.

    Another publisher (the daemon's, while the CLI revokes) may store a CRL between our read and our store. If
    that CRL already lists every revocation we read, it is the answer; otherwise we sign again on top of it."""
    ca = load_ca(journal, ca_name)
    if ca.role != "issuing" or ca.state != "active":
        raise BirthlineError(f"CA {ca_name!r} is not an active issuing CA: no CRL")
    for _ in range(_PUBLISH_ATTEMPTS - 1):
        try:
            return _publish(journal, token, audit, ca, validity_s, actor, clock)
        except _Superseded as exc:
            current = load_crl(journal, ca_name)
            if current is not None and current.revocation_seq >= exc.seq:
                return current
    return _publish(journal, token, audit, ca, validity_s, actor, clock)


_PUBLISH_ATTEMPTS = 3


class _Superseded(BirthlineError):
    def __init__(self, ca_name: str, seq: int) -> None:
        super().__init__(f"another CRL for {ca_name!r} was published meanwhile; try again")
        self.seq = seq


def _publish(
    journal: Journal,
    token: Token,
    audit: AuditSink,
    ca: CaRecord,
    validity_s: float,
    actor: str,
    clock: Callable[[], float],
) -> CrlInfo:
    ca_name = ca.name

    def read(conn: sqlite3.Connection) -> tuple[int, int, list[Revocation]]:
        row = conn.execute("SELECT crl_number FROM crl WHERE ca=?", (ca_name,)).fetchone()
        rows = conn.execute(
            f"SELECT {Revocation.COLUMNS} FROM {Revocation.FROM} WHERE r.ca=? ORDER BY r.revoked_at, r.cert_serial",
            (ca_name,),
        ).fetchall()
        return (
            (0 if row is None else int(row[0])),
            _revocation_seq(conn, ca_name),
            [Revocation.from_row(r) for r in rows],
        )

    previous, seq, entries = journal.call(lambda: read(journal.conn))
    now = int(clock())
    number = previous + 1
    der = build_crl(ca, token.get_key(ca.key_label), entries, number, now, now + validity_s)
    crash_point("after-crl-sign")
    info = CrlInfo(ca_name, number, float(now), float(now + int(validity_s)), len(entries), seq, der)

    def store(conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT crl_number FROM crl WHERE ca=?", (ca_name,)).fetchone()
        if (0 if row is None else int(row[0])) != previous:
            raise _Superseded(ca_name, seq)
        conn.execute(
            f"INSERT OR REPLACE INTO crl ({_CRL_COLS}) VALUES (?,?,?,?,?,?,?)",
            (ca_name, number, info.this_update, info.next_update, len(entries), seq, der),
        )
        audit.append(conn, actor, "crl.generated", {
            "ca": ca_name, "crl_number": number, "this_update": iso(info.this_update),
            "next_update": iso(info.next_update), "entries": len(entries),
        })  # fmt: skip

    journal.call(journal.transaction, store, f"storing CRL {number} of {ca_name}")
    crash_point("after-crl-store")
    return info


class CrlPublisher(PollingTask):
    """Keeps a fresh CRL per active issuing CA. An async context manager running one named task
    ("va-crl-publisher") in its own TaskGroup; every `poll_s` it checks, per CA, whether a revocation changed
    since the stored CRL or the CRL is past half its validity, and regenerates it (signing in a worker
    thread, never on the event loop). A failure (HSM away, journal error) raises the warning alarm `va.crl`
    (logged once, not per tick) and is retried on the next tick, whose success clears it; the last good CRL keeps
    being served. `current(ca)` is what the HTTP layer serves."""

    TASK_NAME = "va-crl-publisher"
    ALARM = "va.crl"
    ADVICE = (
        "CRLs are signed in the HSM and stored in the journal: check the HSM (token present, the CA keys) and"
        " the journal's filesystem (free space, writable). The last good CRL is served until its nextUpdate;"
        " relying parties that need a fresh one fail after that"
    )

    def __init__(
        self,
        journal: Journal,
        token: Token,
        audit: AuditSink,
        *,
        validity_s: float = DEFAULT_CRL_VALIDITY_S,
        poll_s: float = 2.0,
        actor: str = "appliance",
        clock: Callable[[], float] = time.time,
        alarms: Alarms | None = None,
    ) -> None:
        if validity_s < 60 or poll_s <= 0:
            raise ValueError("CRL validity must be at least 60 s and poll_s positive")
        super().__init__(poll_s)
        self.journal = journal
        self.token = token
        self.audit = audit
        self.validity_s = validity_s
        self.actor = actor
        self.clock = clock
        self.generated = 0
        self.failures = 0
        self.last_error: BaseException | None = None
        self.alarms = alarms or Alarms()
        self._crls: dict[str, CrlInfo] = {}
        self._lock = asyncio.Lock()

    async def _started(self) -> None:
        await self.tick()

    async def _poll(self) -> None:
        await self.tick()

    def current(self, ca: str) -> CrlInfo | None:
        return self._crls.get(ca)

    @property
    def cas(self) -> list[str]:
        return sorted(self._crls)

    async def tick(self) -> None:
        """One pass over the CAs: load newer stored CRLs, regenerate stale ones. Never raises."""
        async with self._lock:
            failures = self.failures
            try:
                cas = await self.journal.acall(issuing_cas, self.journal)
            except BirthlineError as exc:
                self._failed(exc, "listing CAs")
                return
            for ca in cas:
                await self._check(ca.name)
            if self.failures == failures:
                self.alarms.clear(self.ALARM, "CRLs published")

    async def _check(self, ca: str) -> None:
        def state() -> tuple[CrlInfo | None, int]:
            row = self.journal.conn.execute(f"SELECT {_CRL_COLS} FROM crl WHERE ca=?", (ca,)).fetchone()
            return (None if row is None else _crl_row(row)), _revocation_seq(self.journal.conn, ca)

        try:
            stored, seq = await self.journal.acall(state)
            if stored is not None:
                self._crls[ca] = stored
            if stored is None or stored.revocation_seq != seq or self.clock() >= stored.refresh_at:
                self._crls[ca] = await asyncio.to_thread(
                    generate_crl, self.journal, self.token, self.audit, ca,
                    validity_s=self.validity_s, actor=self.actor, clock=self.clock,
                )  # fmt: skip
                self.generated += 1
                self.last_error = None
        except (BirthlineError, HsmError, sqlite3.Error, ValueError) as exc:
            self._failed(exc, f"CRL of {ca}")

    def _failed(self, exc: BaseException, what: str) -> None:
        self.failures += 1
        self.last_error = exc
        self.alarms.raise_alarm(
            self.ALARM, f"CRL publisher: {what} failed (retried every {self.poll_s:g} s): {exc}", self.ADVICE,
            severity="warning",
        )  # fmt: skip
