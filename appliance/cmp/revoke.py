"""Revocation requests over CMP (RFC 9483 4.2, 5.1.3, 5.3.2): rr -> rp.

Who may revoke: the certificate's own key (an rr signed by the certificate to be revoked, on any label), or a
PKI management entity the label trusts (station_signature or trusted_ca) on a label with allow_rr. An rr
protected by a MAC is refused (wrongIntegrity): the RFC wants a signature, by the key or by an RA.
What: exactly one RevDetails naming a certificate of one of this appliance's issuing CAs by issuer and serial;
a subject or public key in the template must be that certificate's; crlEntryDetails holds at most one reason
code (an absent one is unspecified, as openssl cmp sends it by default); certificateHold and removeFromCRL are
not offered (revocation is final).
Every refusal of a request that passed the message checks is an rp with status rejection.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.cmp.errors import CmpError, FailInfo
from appliance.cmp.labels import CmpLabel
from appliance.cmp.model import BodyType, PKIStatusInfo, RevokedCertId, RpBody, RrBody
from appliance.cmp.transactions import Answer, Auth, revocation_rejection
from appliance.cmp.trust import SignerKind
from appliance.crashpoints import crash_point
from appliance.errors import BirthlineError
from appliance.issuance.journal import Journal
from appliance.issuance.policy import AuditSink
from appliance.va.revocation import Reason, RevocationError, Source, revoke_in_transaction

_SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
_REASONS: dict[x509.ReasonFlags, Reason] = {
    x509.ReasonFlags.unspecified: Reason.UNSPECIFIED,
    x509.ReasonFlags.key_compromise: Reason.KEY_COMPROMISE,
    x509.ReasonFlags.ca_compromise: Reason.CA_COMPROMISE,
    x509.ReasonFlags.affiliation_changed: Reason.AFFILIATION_CHANGED,
    x509.ReasonFlags.superseded: Reason.SUPERSEDED,
    x509.ReasonFlags.cessation_of_operation: Reason.CESSATION_OF_OPERATION,
    x509.ReasonFlags.privilege_withdrawn: Reason.PRIVILEGE_WITHDRAWN,
}


class Revoker:
    def __init__(
        self,
        journal: Journal,
        audit: AuditSink,
        issuing_cas: Mapping[str, x509.Certificate],
        *,
        on_revoked: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.journal = journal
        self.audit = audit
        self.issuing_cas = dict(issuing_cas)
        self.on_revoked = on_revoked
        self.clock = clock
        self.stats = {"revoked": 0}

    async def revoke(self, label: CmpLabel, body: RrBody, auth: Auth) -> Answer:
        try:
            return await self._revoke(label, body, auth)
        except (BirthlineError, ValueError) as exc:
            return revocation_rejection(exc)

    async def _revoke(self, label: CmpLabel, body: RrBody, auth: Auth) -> Answer:
        signer = auth.signer
        if signer is None:
            raise CmpError("a revocation request must be signed, by the certificate's key or by a trusted RA"
                           " (RFC 9483 4.2), not MAC-protected", fail_info=FailInfo.WRONG_INTEGRITY)  # fmt: skip
        if len(body.requests) != 1:
            raise CmpError("rr must carry exactly one RevDetails (RFC 9483 4.2)")
        (details,) = body.requests
        if details.serial_number is None or details.issuer is None:
            raise CmpError("rr needs the issuer and serialNumber of the certificate",
                           fail_info=FailInfo.ADD_INFO_NOT_AVAILABLE)  # fmt: skip
        if details.reason_count > 1:
            raise CmpError(f"crlEntryDetails holds {details.reason_count} reason codes: one is allowed"
                           " (RFC 9483 4.2)")  # fmt: skip
        reason = _REASONS.get(details.reason or x509.ReasonFlags.unspecified)
        if reason is None:
            raise CmpError("this revocation reason is not offered (revocation is final)")
        own = (signer.kind is SignerKind.OWN and signer.certificate.serial_number == details.serial_number
               and signer.certificate.issuer == details.issuer)  # fmt: skip
        if not own and not (label.allow_rr and signer.kind in (SignerKind.RA, SignerKind.STATION)):
            raise CmpError(f"only the certificate's own key, or an RA on a label that allows rr, may revoke it"
                           f" (label {label.name!r})", fail_info=FailInfo.NOT_AUTHORIZED)  # fmt: skip
        ca = next((n for n, c in self.issuing_cas.items() if c.subject == details.issuer), None)
        serial = format(details.serial_number, "x")
        actor = f"cmp:{label.name}"

        def txn(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT cert_serial, ca, device_serial, state, cert_der FROM issuance WHERE cert_serial=? AND ca=?",
                (serial, ca),
            ).fetchone()
            if ca is None or row is None or row[3] not in ("issued", "confirmed", "reworked", "scrapped"):
                raise CmpError("no certificate with this issuer and serial was issued here",
                               fail_info=FailInfo.BAD_CERT_ID)  # fmt: skip
            cert = x509.load_der_x509_certificate(bytes(row[4]))
            if cert.not_valid_after_utc.timestamp() < self.clock():
                # RFC 9483 5.1.3: the certificate must not be expired (or revoked: certRevoked covers both).
                raise CmpError("the certificate has expired", fail_info=FailInfo.CERT_REVOKED)
            if details.subject is not None and details.subject != cert.subject:
                raise CmpError(
                    "the template's subject is not the certificate's", fail_info=FailInfo.BAD_CERT_ID
                )
            if (
                details.public_key_der is not None
                and details.public_key_der != cert.public_key().public_bytes(*_SPKI)
            ):
                raise CmpError(
                    "the template's public key is not the certificate's", fail_info=FailInfo.BAD_CERT_ID
                )
            result = revoke_in_transaction(conn, self.audit, actor, [(str(row[0]), str(row[1]), str(row[2]))],
                                           reason, Source.CMP, now=self.clock(),
                                           selector={"cmp_label": label.name, "signer": signer.kind.value})  # fmt: skip
            return bool(result.changed)

        try:
            changed = await self.journal.atransaction(txn, f"revoking {serial} over CMP")
        except RevocationError as exc:
            raise CmpError(exc.message, fail_info=FailInfo.CERT_REVOKED) from None
        crash_point("after-revoke")
        if not changed:
            raise CmpError("the certificate is already revoked", fail_info=FailInfo.CERT_REVOKED)
        self.stats["revoked"] += 1
        if self.on_revoked is not None:
            self.on_revoked()
        rev = RevokedCertId(x509.DirectoryName(details.issuer), details.serial_number)
        return Answer(BodyType.RP, RpBody((PKIStatusInfo.accepted(),), (rev,)))
