"""What a request is while the issuance service works on it (Item), and what it gets back (IssueResult)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.errors import BirthlineError
from appliance.issuance.journal import IssuanceRow
from appliance.issuance.policy import Grant, IssueRequest
from appliance.issuance.prepare import Prepared


@dataclass(frozen=True)
class IssueResult:
    certificate: bytes  # DER
    chain: tuple[bytes, ...]  # DER, issuing CA first, up to the root
    cert_serial: str  # hex
    device_serial: str
    issuance_id: int  # the issuance row's id; in RA mode the ra_request row's
    reused: bool  # answered from the journal: a retry of a request already issued
    upstream: bool = False  # RA mode: the upstream CA issued it (confirm with confirm_upstream)

    @property
    def certificate_pem(self) -> bytes:
        return x509.load_der_x509_certificate(self.certificate).public_bytes(serialization.Encoding.PEM)


@dataclass(eq=False)
class Item:
    request: IssueRequest
    future: asyncio.Future[IssueResult]
    prep: Prepared | None = None
    row_id: int | None = None
    reuse: IssuanceRow | None = None
    leader: Item | None = None  # same device and key already in flight: answer with its result
    error: BirthlineError | None = None
    followers: list[Item] = field(default_factory=list)
    ra_done: IssueResult | None = None  # RA mode: the upstream's certificate, already stored
    grant: Grant | None = None  # what the policy granted (the work order and its units left)
    update: IssuanceRow | None = None  # key update: the device's current certificate, which this one replaces
    origin: tuple[str | None, str | None] | None = (
        None  # a retry (reuse): its certificate's work order, product
    )

    @property
    def key(self) -> tuple[str, bytes]:
        assert self.prep is not None
        return (self.request.device_serial, self.prep.public_key_sha256)
