"""The station server's two ports into the issuance core: CoreEnroller (stations.server.Enroller: ENROLL,
CONFIRM and the CA chain, over the IssueService and the journal) and CoreLinkMonitor (stations.server.LinkMonitor:
link failures audited, logged once and alarmed). The daemon (appliance/daemon.py) composes them with the station
server. Like the daemon, this module may import the stations package, which the appliance core may not
(pyproject.toml's import-linter contracts).
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from dataclasses import dataclass

from appliance.errors import BirthlineError, IssuanceFailed, IssuancePending, IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.station_failures import LinkFailures
from stations.codes import Code
from stations.errors import StationError
from stations.server import EnrollPending, LinkFailure, clean_text

__all__ = ["CoreEnroller", "CoreLinkMonitor", "wire_code"]


def wire_code(exc: BirthlineError) -> Code:
    """ReasonCode numbers are the protocol's codes 1-18 and 99."""
    try:
        return Code(int(exc.code))
    except ValueError:
        return Code.INTERNAL


@dataclass(frozen=True)
class _Issued:
    cert_serial: str | None
    device_serial: str
    csr_sha256: bytes | None
    cert_der: bytes | None
    state: str
    ra_request: int | None = None  # RA mode: the upstream CA's certificate, in ra_request


# Where a station's request id may have been answered, in order: its own issuance; a retry under a new request
# id that the core answered from an earlier row; and the same two for RA mode (ra_request; station_request
# holds 'ra:<id>' for those).
_FIND_REQUEST = (
    "SELECT cert_serial, device_serial, csr_sha256, cert_der, state FROM issuance"
    " WHERE station=? AND request_id=? AND state!='burned' ORDER BY id DESC LIMIT 1",
    "SELECT i.cert_serial, i.device_serial, NULL, i.cert_der, i.state FROM station_request r"
    " JOIN issuance i ON i.cert_serial = r.cert_serial WHERE r.station=? AND r.request_id=?",
    "SELECT cert_serial, device_serial, csr_sha256, cert_der, state, id FROM ra_request"
    " WHERE station=? AND request_id=? ORDER BY id DESC LIMIT 1",
    "SELECT a.cert_serial, a.device_serial, NULL, a.cert_der, a.state, a.id FROM station_request r"
    " JOIN ra_request a ON a.id = CAST(substr(r.cert_serial, 4) AS INTEGER)"
    " WHERE r.station=? AND r.request_id=? AND r.cert_serial LIKE 'ra:%'",
)


class CoreEnroller:
    """stations.server.Enroller over the IssueService and the journal."""

    # How many answered ENROLLs to remember for their CONFIRM (a station confirms the device it just enrolled):
    # a hit saves CONFIRM's journal lookup, one hop onto the journal thread that every commit also needs.
    RECENT = 4096

    def __init__(self, service: IssueService, journal: Journal) -> None:
        self.service = service
        self.journal = journal
        # (station, request id hex) -> what _find would read for it now: the issued row's cert_der never
        # changes, and the confirm transaction re-reads the row's state anyway. Oldest first (dict order).
        self._recent: dict[tuple[str, str], _Issued] = {}

    def _note_recent(self, station: str, rid: str, issued: _Issued) -> None:
        recent = self._recent
        recent.pop((station, rid), None)
        recent[(station, rid)] = issued
        if len(recent) > self.RECENT:
            del recent[next(iter(recent))]

    async def ca_chain(self, station: str, profile: str | None) -> list[bytes]:
        # Every profile this appliance serves is issued by the one issuing CA of the service; a name it does
        # not serve is refused, as ENROLL would refuse it, so a station can check its profile before a device.
        if profile is not None and profile not in self.service.profiles:
            raise StationError(
                Code.UNKNOWN_PROFILE, f"no profile named {clean_text(profile, 64)!r} is served"
            )
        return list(self.service.chain)

    async def _find(self, station: str, request_id: str) -> _Issued | None:
        def q(conn: sqlite3.Connection) -> _Issued | None:
            for sql in _FIND_REQUEST:
                row = conn.execute(sql, (station, request_id)).fetchone()
                if row is not None:
                    return _Issued(*row)
            return None

        # On the journal's reader connection: an ENROLL's lookup never waits behind the commits queued on the
        # journal thread (appliance/issuance/reader.py); it sees every committed row, as it did there.
        return await self.journal.aread(q)

    async def _remember(self, station: str, request_id: str, cert_serial: str) -> None:
        def txn(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR IGNORE INTO station_request (station, request_id, cert_serial) VALUES (?,?,?)",
                (station, request_id, cert_serial),
            )

        await self.journal.atransaction(txn, "recording a station request")

    async def enroll(
        self, station: str, request_id: bytes, device_serial: str, csr: bytes, profile: str | None
    ) -> list[bytes]:
        rid = request_id.hex()
        if not csr.startswith(b"\x30"):
            # The wire carries DER only (protocol section 5): one encoding, so the CSR a request id was first
            # sent with is the same bytes on every retry (idempotency compares their hash).
            raise StationError(
                Code.BAD_CSR, "the CSR is not DER (a PKCS#10 SEQUENCE); PEM is not accepted here"
            )
        try:
            known = await self._find(station, rid)
            if known is not None and (
                known.device_serial != device_serial
                or (known.csr_sha256 is not None and known.csr_sha256 != hashlib.sha256(csr).digest())
            ):
                raise StationError(Code.BAD_REQUEST, "request id already used for another device or CSR")
            # Shielded: a dropped connection must not cancel a request the core has already queued.
            result = await asyncio.shield(
                self.service.issue(IssueRequest(device_serial, csr, station, rid, profile))
            )
            if result.reused:
                await self._remember(
                    station, rid, f"ra:{result.issuance_id}" if result.upstream else result.cert_serial
                )
            if not result.upstream:
                self._note_recent(
                    station,
                    rid,
                    _Issued(result.cert_serial, device_serial, None, result.certificate, "issued"),
                )
        except IssuancePending as exc:
            # RA mode: the upstream CA issues; the station sends the same ENROLL again after this.
            raise EnrollPending(int(exc.retry_after_s * 1000), clean_text(exc.message)) from None
        except (IssuanceRefused, IssuanceFailed) as exc:
            retry_after = exc.details.get("retry_after_s")
            if exc.code is ReasonCode.BUSY and isinstance(retry_after, float):
                # Shed (the issuance queue is full): PENDING carries the retry-after, and nothing was recorded,
                # so the same ENROLL sent again then is a new request.
                raise EnrollPending(int(retry_after * 1000), clean_text(exc.message)) from None
            raise StationError(wire_code(exc), clean_text(exc.message)) from None
        return [result.certificate, *result.chain]

    async def confirm(self, station: str, request_id: bytes, cert_sha256: bytes) -> None:
        try:
            rid = request_id.hex()
            known = self._recent.pop((station, rid), None) or await self._find(station, rid)
            if known is None or known.cert_der is None:
                raise StationError(Code.UNKNOWN_REQUEST, "no certificate was issued for this request id")
            if hashlib.sha256(known.cert_der).digest() != cert_sha256:
                raise StationError(
                    Code.CONFIRM_MISMATCH, "hash differs from the issued certificate: rewrite the device"
                )
            if known.ra_request is not None:
                await self.service.confirm_upstream(known.ra_request, cert_sha256)
            else:
                assert known.cert_serial is not None
                await self.service.confirm(known.cert_serial, cert_sha256)
        except (IssuanceRefused, IssuanceFailed) as exc:
            raise StationError(wire_code(exc), clean_text(exc.message)) from None


class CoreLinkMonitor:
    """stations.server.LinkMonitor over the core's LinkFailures (audit, log once, alarm)."""

    def __init__(self, failures: LinkFailures) -> None:
        self.failures = failures

    def link_failed(self, failure: LinkFailure) -> None:
        self.failures.failed(
            station=failure.station, peer=failure.peer, code=failure.code.name, text=failure.text,
            claimed=failure.claimed, blocked_s=failure.blocked_s,
        )  # fmt: skip

    def link_authenticated(self, station: str, peer: str) -> None:
        self.failures.authenticated(station)
