"""The EST operations (RFC 7030 4) of one appliance: who the client is (appliance/est/auth.py), what its CSR says
(appliance/est/csr.py), and the answer of the one issuance core (IssueService), the same work orders, quotas, key
policy, journal and audit as every other front end.

The certificate of an enrolment is confirmed as soon as it is handed to the HTTP layer: EST has no confirmation
message (RFC 7030 4.2.3), and the answer is the certificate. A client that lost it sends the same CSR again and
is answered with the same certificate (the core's retry rule: same device, same key).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.cmp.trust import SignerTrust
from appliance.errors import BirthlineError, ConfigError, Problem, ReasonCode
from appliance.est.auth import Authenticator, Client, ClientKind, TlsPeer
from appliance.est.csr import EstCsr, device_serial, read_csr, same_name
from appliance.est.csrattrs import csr_attributes
from appliance.est.errors import RETRY_AFTER_S, EstError, from_core, refuse
from appliance.est.keygen import generate_key, keygen_algorithm
from appliance.est.labels import EstLabel, EstSettings
from appliance.est.wire import certs_only, decode_body
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink, IssueRequest
from appliance.issuance.refusals import RefusalLimiter
from appliance.issuance.service import IssueService

log = logging.getLogger(__name__)
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class Issued:
    certificate: bytes
    """DER of the new certificate."""
    device_serial: str
    cert_serial: str


class EstResponder:
    """The EST operations over the issuance services (one per issuing CA a label issues from)."""

    def __init__(
        self,
        service: IssueService,
        journal: Journal,
        labels: Mapping[str, EstLabel],
        settings: EstSettings,
        *,
        management_ca: x509.Certificate | None = None,
        services: Mapping[str, IssueService] | None = None,
        on_revoked: Callable[[], None] | None = None,
        audit: AuditSink | None = None,
        refusal_burst: int = 60,
        refusal_window_s: float = 60.0,
    ) -> None:
        self.service = service
        self.audit = audit
        self._refusals = RefusalLimiter(refusal_burst, refusal_window_s)
        self.services = {service.ca.name: service, **(services or {})}
        missing = sorted({lb.issuing_ca for lb in labels.values() if lb.issuing_ca} - set(self.services))
        if missing:
            raise ConfigError([Problem("est.labels", f"issuing CA {name!r} of a label has no issuance service")
                               for name in missing])  # fmt: skip
        self.journal = journal
        self.labels = dict(labels)
        self.settings = settings
        self.on_revoked = on_revoked
        issuing = {name: svc.ca.certificate for name, svc in self.services.items()}
        own_chain = [x509.load_der_x509_certificate(c) for svc in self.services.values() for c in svc.chain]
        self.trust = SignerTrust(journal, issuing, management_ca=management_ca, own_chain=own_chain,
                                 default_ca=service.ca.name)  # fmt: skip
        self.auth = Authenticator(journal, self.trust, settings, service.ca.name)
        self.stats = {"cacerts": 0, "enrolled": 0, "reenrolled": 0, "keygen": 0, "refused": 0, "pending": 0}
        self._keygen_free = settings.keygen_in_flight

    # -- refusals of this layer -------------------------------------------------------------------------------------
    async def refused(self, label: str, operation: str, peer: str, exc: EstError) -> None:
        """A refusal of the EST layer (who the client is, what its request is): audited per label within a budget
        (issuance/refusals.py: the first `refusal_burst` of each `refusal_window_s` in full, the rest counted and
        summarised). The core audits its own refusals (exc.core)."""
        if exc.core or self.audit is None:
            return
        self.stats["refused"] += 1
        now = time.time()
        entries: list[tuple[str, str, dict[str, Any]]] = []
        if self._refusals.admit(label, exc.code.name, now):
            entries.append((label, "est.refused", {
                "label": label, "operation": operation, "status": exc.status, "code": exc.code.name,
                "reason": " ".join(exc.message.split())[:500], "peer": peer,
            }))  # fmt: skip
        entries += [
            (str(s["label"]), "est.refusals-suppressed", s) for s in self._refusals.due(now, key="label")
        ]
        await self._audit_entries(entries)

    async def flush_refusals(self) -> None:
        """At shutdown: the summaries of the windows still open."""
        summaries = self._refusals.due(time.time(), all_windows=True, key="label")
        await self._audit_entries([(str(s["label"]), "est.refusals-suppressed", s) for s in summaries])

    async def _audit_entries(self, entries: list[tuple[str, str, dict[str, Any]]]) -> None:
        audit = self.audit
        if not entries or audit is None:
            return

        def txn(conn: sqlite3.Connection) -> None:
            for label, event, data in entries:
                audit.append(conn, f"est:{label}", event, data)

        try:
            await self.journal.atransaction(txn, "auditing an EST refusal")
        except BirthlineError as exc:
            log.warning("EST refusal not audited: %s", exc.message)

    # -- labels ------------------------------------------------------------------------------------------------
    def label(self, name: str | None) -> EstLabel:
        """The label of a request path: `name`, or the default label for /.well-known/est/<operation>."""
        chosen = self.settings.default_label if name is None else name
        label = self.labels.get(chosen) if chosen else None
        if label is None:
            raise refuse(404, ReasonCode.BAD_REQUEST, "no such EST label" if name is not None else
                         "this appliance has no default EST label: use /.well-known/est/<label>/...")  # fmt: skip
        return label

    def service_of(self, label: EstLabel) -> IssueService:
        return self.services[label.issuing_ca or self.service.ca.name]

    # -- /cacerts ----------------------------------------------------------------------------------------------
    def cacerts(self, label: EstLabel) -> bytes:
        """The label's issuing CA and the certificates above it up to the root, certs-only (RFC 7030 4.1.3)."""
        self.stats["cacerts"] += 1
        service = self.service_of(label)
        return certs_only([x509.load_der_x509_certificate(c) for c in service.chain])

    # -- /csrattrs ---------------------------------------------------------------------------------------------
    def csrattrs(self, label: EstLabel) -> bytes:
        """The label's CSR attributes from the profile it issues with (RFC 7030 4.5)."""
        service = self.service_of(label)
        profile = service.profiles[label.profile or service.default_profile]
        return csr_attributes(profile, channel_binding=label.channel_binding == "required")

    # -- /simpleenroll, /simplereenroll ---------------------------------------------------------------------------
    async def simpleenroll(
        self, label: EstLabel, tls: TlsPeer, authorization: str | None, peer: str, body: bytes
    ) -> Issued:
        client = await self.auth.enrolling(label, tls, authorization, peer)
        csr = self._csr(label, tls, body)
        serial = device_serial(csr.subject)
        if client.kind is ClientKind.DEVICE and serial != client.device_serial:
            raise refuse(403, ReasonCode.NOT_AUTHORISED, f"the CSR names device {serial!r}, the birth"
                         f" certificate device {client.device_serial!r}")  # fmt: skip
        request = IssueRequest(serial, csr.der, label.station, self._request_id(label, csr), label.profile,
                               front_end="est")  # fmt: skip
        issued = await self._issue(label, request, client)
        self.stats["enrolled"] += 1
        return issued

    async def simplereenroll(self, label: EstLabel, tls: TlsPeer, body: bytes) -> Issued:
        """Renewal or rekey of the TLS client certificate (RFC 7030 4.2.2): the same subject, the same device,
        the profile the certificate was issued with; the journal links the old certificate and the new one."""
        client = await self.auth.renewing(label, tls)
        assert client.own is not None and client.certificate is not None
        csr = self._csr(label, tls, body)
        if not same_name(csr.subject, client.certificate.subject):
            raise refuse(400, ReasonCode.BAD_CSR, "simplereenroll: the CSR's subject must be the subject of the"
                         " certificate being renewed (RFC 7030 4.2.2)")  # fmt: skip
        old_key = client.certificate.public_key().public_bytes(*_SPKI)
        if csr.public_key_der == old_key:
            raise refuse(400, ReasonCode.KEY_POLICY, "simplereenroll needs a new key: this appliance certifies a"
                         " key once (a renewal is a rekey here)")  # fmt: skip
        if client.replaced_by_key is not None and (
            csr.public_key_der is None
            or hashlib.sha256(csr.public_key_der).digest() != client.replaced_by_key
        ):
            raise refuse(403, ReasonCode.NOT_AUTHORISED, f"certificate {client.own.cert_serial} is not the current"
                         f" certificate of device {client.own.device_serial!r}: it was replaced (only the"
                         " renewal that replaced it is answered again)")  # fmt: skip
        if device_serial(csr.subject) != client.own.device_serial:
            raise refuse(400, ReasonCode.BAD_DEVICE_SERIAL, "simplereenroll: the CSR names another device")
        if client.own.ca != (label.issuing_ca or self.service.ca.name):
            raise refuse(403, ReasonCode.NOT_AUTHORISED, f"the certificate being renewed is from CA"
                         f" {client.own.ca!r}; label {label.name!r} issues from another CA")  # fmt: skip
        request = IssueRequest(client.own.device_serial, csr.der, label.station, self._request_id(label, csr),
                               client.own.profile, replaces=client.own.cert_serial, front_end="est")  # fmt: skip
        issued = await self._issue(label, request, client)
        self.stats["reenrolled"] += 1
        return issued

    # -- /serverkeygen -------------------------------------------------------------------------------------------
    async def serverkeygen(
        self, label: EstLabel, tls: TlsPeer, authorization: str | None, peer: str, body: bytes
    ) -> tuple[bytes, Issued]:
        """The appliance generates the device's key (RFC 7030 4.4) and certifies it: the PKCS#8 DER of the key and
        the certificate. The key is returned over this TLS connection, unencrypted (4.4.2); it is stored nowhere
        and never logged, so a lost answer cannot be asked for again (the device then needs a rework)."""
        if not label.serverkeygen:
            raise refuse(404, ReasonCode.BAD_REQUEST, f"EST label {label.name!r} does not serve serverkeygen")
        client = await self.auth.enrolling(label, tls, authorization, peer)
        csr = self._csr(label, tls, body)
        if not csr.signature_valid:
            raise refuse(400, ReasonCode.BAD_POP, "the CSR's signature does not verify")
        if csr.wants_encrypted_key:
            raise refuse(501, ReasonCode.BAD_REQUEST, "an encrypted server-generated key (DecryptKeyIdentifier,"
                         " AsymmetricDecryptKeyIdentifier) is not supported: the key is returned over this TLS"
                         " connection; send the CSR without those attributes")  # fmt: skip
        serial = device_serial(csr.subject)
        if client.kind is ClientKind.DEVICE and serial != client.device_serial:
            raise refuse(403, ReasonCode.NOT_AUTHORISED, f"the CSR names device {serial!r}, the birth"
                         f" certificate device {client.device_serial!r}")  # fmt: skip
        service = self.service_of(label)
        profile = service.profiles.get(label.profile or service.default_profile)
        if profile is None:
            raise refuse(400, ReasonCode.UNKNOWN_PROFILE, "the label's profile is not configured")
        algorithm = keygen_algorithm(profile.key_algorithms, csr.key_algorithm)
        if algorithm is None:
            raise refuse(400, ReasonCode.KEY_POLICY, "the label's profile allows no key type this appliance"
                         " generates (ec-p256, ec-p384, rsa-2048/3072/4096, ed25519)")  # fmt: skip
        if self._keygen_free <= 0:
            raise refuse(503, ReasonCode.BUSY, "too many key generations at once; try again",
                         retry_after_s=float(RETRY_AFTER_S))  # fmt: skip
        self._keygen_free -= 1
        try:
            key = await asyncio.to_thread(generate_key, algorithm)
        finally:
            self._keygen_free += 1
        spki = key.public_key().public_bytes(*_SPKI)
        request = IssueRequest(serial, b"", label.station, f"est-keygen:{label.name}:{secrets.token_hex(12)}",
                               label.profile, public_key_der=spki, front_end="est", local_only=True)  # fmt: skip
        issued = await self._issue(label, request, client)
        self.stats["keygen"] += 1
        pkcs8 = key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())  # fmt: skip
        return pkcs8, issued

    # -- the parts -----------------------------------------------------------------------------------------------
    def _csr(self, label: EstLabel, tls: TlsPeer, body: bytes) -> EstCsr:
        csr = read_csr(decode_body(body), self.settings.max_csr_bytes)
        kind, value = tls.binding
        if csr.challenge_password is not None:
            if value is None:
                raise refuse(400, ReasonCode.BAD_POP, f"the CSR carries a challengePassword but this connection's"
                             f" {kind} value cannot be read here: send the CSR without it")  # fmt: skip
            expected = base64.b64encode(value)
            if not hmac.compare_digest(csr.challenge_password.strip(), expected):
                raise refuse(400, ReasonCode.BAD_POP, f"the CSR's challengePassword is not this TLS connection's"
                             f" {kind} value (base64): the CSR was not made for this connection (RFC 7030 3.5)")  # fmt: skip
        elif label.channel_binding == "required":
            raise refuse(400, ReasonCode.BAD_POP, f"EST label {label.name!r} requires channel binding: put this"
                         f" connection's {kind} value (base64) in the CSR's challengePassword (RFC 7030 3.5)")  # fmt: skip
        return csr

    @staticmethod
    def _request_id(label: EstLabel, csr: EstCsr) -> str:
        return f"est:{label.name}:{hashlib.sha256(csr.der).hexdigest()[:32]}"

    async def _issue(self, label: EstLabel, request: IssueRequest, client: Client) -> Issued:
        service = self.service_of(label)
        try:
            result = await service.issue(request)
        except BirthlineError as exc:
            error = from_core(exc)
            self.stats["pending" if error.status == 202 else "refused"] += 1
            raise error from None
        digest = hashlib.sha256(result.certificate).digest()
        if result.upstream:
            await service.confirm_upstream(result.issuance_id, digest)
        else:
            await service.confirm(result.cert_serial, digest)
            if request.replaces is not None and self.on_revoked is not None:
                self.on_revoked()  # the renewal revoked the certificate it replaced
        log.debug("EST label %s: %s certificate %s for device %s (client %s: %s)", label.name,
                 "renewed" if request.replaces else "issued", result.cert_serial, result.device_serial,
                 client.kind.value, client.who)  # fmt: skip
        return Issued(result.certificate, result.device_serial, result.cert_serial)


__all__ = ["EstError", "EstResponder", "Issued", "TlsPeer"]
