"""Who signed a CMP message, and may they (RFC 9483 3.5: the CMP protection certificate is validated, its
revocation status included).

A signature that verified (appliance/cmp/protection.py) names a certificate; it is trusted on a label as

- STATION: the label's station's own TLS certificate (its registered fingerprint, issued by the management CA);
  disabling or rotating the station is its revocation;
- RA: a certificate that chains, through the message's extraCerts, to one of the label's trusted_ca
  (a downstream RA, a station with a credential from its own CA);
- DEVICE: a birth certificate (IDevID) that chains to one of the label's idevid_roots (greenfield enrolment);
- OWN: a certificate this appliance issued (one of its issuing CAs), found in the journal byte for byte: a device
  updating its key (kur) or revoking its own certificate (rr).

Which of these a signer is depends on what the message is (Purpose), not only on which anchor a chain reaches: a
kur of the signer's own certificate, or an rr of it, is that certificate acting on itself (OWN) even where its
chain also reaches a label's idevid_roots or trusted_ca; an ir, cr or p10cr is never signed by a certificate
acting on itself (a certificate of this appliance that no anchor of the label covers may not sign one); other
messages (genm, nested, certConf, pollReq, a kur or rr on behalf of a device) take the first that applies. A
birth certificate (DEVICE) is never a certificate the label itself issues (its issuing CA): an operational
certificate under the same root as the birth certificates is refused as an ir signer.

Revocation, checked at every message, failing closed:
- a certificate of one of this appliance's issuing CAs: its journal row (released, not revoked) - read at the
  time of the message, so a supervisor's `birthline revoke` takes effect at once;
- any other certificate in a trusted_ca / idevid_roots chain: a CRL of its issuer, from the label's crl_files or
  fetched from the certificate's CRL distribution point (appliance/cmp/crls.py), signed by that issuer and
  current; no such CRL is "unknown": the message is refused (signerNotTrusted), unless the label says
  signer_revocation = "none".
A revoked certificate anywhere in the chain is refused with certRevoked.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization

from appliance.cmp.crls import CrlCache, CrlUnavailable, crl_urls
from appliance.cmp.errors import CmpError, FailInfo
from appliance.cmp.labels import CmpLabel
from appliance.cmp.model import BodyType, CertReqBody, PKIMessage, RrBody
from appliance.issuance.journal import Journal

_DER = serialization.Encoding.DER
_SHA256 = hashes.SHA256()
MAX_CHAIN = 6


class SignerKind(enum.Enum):
    STATION = "station"
    RA = "ra"
    DEVICE = "device"
    OWN = "own"


class Purpose(enum.Enum):
    """What the signer is asked to be trusted for (see the module docstring)."""

    ENROL = "enrol"
    """ir, cr, p10cr: a station, an RA or a birth certificate; never a certificate acting on itself."""
    SELF = "self"
    """kur of the signer's own certificate, rr of it: a certificate of this appliance is OWN, whatever its chain
    also reaches."""
    OTHER = "other"
    """Anything else: the first kind that applies (station, RA, birth certificate, this appliance's)."""


@dataclass(frozen=True)
class OwnCertificate:
    """A certificate of this appliance, as its journal row says it is now."""

    row_id: int
    ca: str
    cert_serial: str
    device_serial: str
    profile: str
    state: str
    updated_by: int | None


@dataclass(frozen=True)
class Signer:
    kind: SignerKind
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...] = ()
    """The issuers of `certificate` up to the trust anchor that was found (STATION, OWN: empty)."""
    own: OwnCertificate | None = None
    """When the signing certificate is one of this appliance's (OWN always; DEVICE when the idevid_roots include
    this appliance's root): its journal row."""

    @property
    def fingerprint(self) -> bytes:
        return self.certificate.fingerprint(_SHA256)


def purpose_of(msg: PKIMessage, signer: x509.Certificate) -> tuple[Purpose, bool]:
    """What a signed message asks its signer to be trusted for, and whether a revoked or expired certificate of
    this appliance still signs it (an rr of itself: answered with an rp, RFC 9483 4.2, 5.1.3)."""
    body = msg.body
    if msg.body_type in (BodyType.IR, BodyType.CR, BodyType.P10CR):
        return Purpose.ENROL, False
    if msg.body_type is BodyType.KUR and isinstance(body, CertReqBody):
        try:
            named = [r.old_cert_id() for r in body.requests]
        except CmpError:
            return Purpose.SELF, False  # the enroller refuses the malformed oldCertID
        issuer = x509.DirectoryName(signer.issuer)
        if all(n is None or (n[0] == issuer and n[1] == signer.serial_number) for n in named):
            return Purpose.SELF, False
    if isinstance(body, RrBody) and len(body.requests) == 1:
        details = body.requests[0]
        if details.issuer == signer.issuer and details.serial_number == signer.serial_number:
            return Purpose.SELF, True
    return Purpose.OTHER, False


def _fail(text: str, fail_info: FailInfo = FailInfo.SIGNER_NOT_TRUSTED) -> CmpError:
    return CmpError(text, fail_info=fail_info)


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc


def _is_ca(cert: x509.Certificate, anchor: bool) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return anchor  # an administrator's trust anchor may be an old v1 root without extensions
    except ValueError:
        return False


class SignerTrust:
    """Authenticates the signer of a message for a label. Journal reads go through the journal's thread; CRL
    fetches through `crls` (bounded, cached); certificate signature checks are cached per pair."""

    def __init__(
        self,
        journal: Journal,
        issuing_cas: Mapping[str, x509.Certificate],
        *,
        management_ca: x509.Certificate | None = None,
        own_chain: Sequence[x509.Certificate] = (),
        crls: CrlCache | None = None,
        clock: Callable[[], float] = time.time,
        default_ca: str | None = None,
    ) -> None:
        self.journal = journal
        self.issuing_cas = dict(issuing_cas)
        """This appliance's issuing CAs by name: their certificates' revocation is the journal's."""
        self.management_ca = management_ca
        self.default_ca = default_ca
        """The issuing CA of labels that name none ([issuance] issuing_ca)."""
        self._own_chain = tuple(own_chain)
        self._own_cas = {c.fingerprint(_SHA256) for c in (*issuing_cas.values(), *own_chain)}
        self.crls = crls or CrlCache(clock=clock)
        self.clock = clock
        self._issued: dict[tuple[bytes, bytes], bool] = {}

    def _now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.clock(), dt.UTC)

    # -- signatures between certificates ---------------------------------------------------------------------
    def issued_by(self, cert: x509.Certificate, ca: x509.Certificate) -> bool:
        # The answer never changes for a pair of certificates, and a peer signs every message with the same one.
        key = (cert.fingerprint(_SHA256), ca.fingerprint(_SHA256))
        known = self._issued.get(key)
        if known is None:
            known = cert.issuer == ca.subject
            if known:
                try:
                    cert.verify_directly_issued_by(ca)
                except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
                    known = False
            if len(self._issued) >= 4096:
                self._issued.clear()
            self._issued[key] = known
        return known

    def chain(
        self, cert: x509.Certificate, pool: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
    ) -> tuple[x509.Certificate, ...] | None:
        """The issuers of `cert` up to and including one of `anchors`, from `pool` (the message's extraCerts) and
        the anchors, each link's signature verified, each issuer a CA valid now; None when there is no such path.
        A certificate that is itself an anchor has an empty chain (it is pinned)."""
        if cert in anchors:
            return ()
        now = self._now()
        candidates = [*anchors, *(c for c in pool if c not in anchors)]

        def walk(current: x509.Certificate, path: list[x509.Certificate]) -> list[x509.Certificate] | None:
            if len(path) >= MAX_CHAIN:
                return None
            for parent in candidates:
                anchor = parent in anchors
                if parent in path or parent == current or parent.subject != current.issuer:
                    continue
                if not (
                    _valid_at(parent, now) and _is_ca(parent, anchor) and self.issued_by(current, parent)
                ):
                    continue
                if anchor:
                    return [*path, parent]
                found = walk(parent, [*path, parent])
                if found is not None:
                    return found
            return None

        found = walk(cert, [])
        return None if found is None else tuple(found)

    # -- this appliance's certificates -------------------------------------------------------------------------
    def own_ca_of(self, cert: x509.Certificate) -> str | None:
        """The name of the issuing CA of this appliance that issued `cert`, if one did."""
        for name, ca in self.issuing_cas.items():
            if self.issued_by(cert, ca):
                return name
        return None

    async def own(self, cert: x509.Certificate, ca: str, *, revoked_ok: bool = False) -> OwnCertificate:
        """The journal row of a certificate of this appliance. CmpError: certRevoked when it is revoked (unless
        `revoked_ok`: an rr of itself is answered at the request level), signerNotTrusted when it was never
        released (or is not in the journal as these bytes)."""
        serial = format(cert.serial_number, "x")
        der = cert.public_bytes(_DER)

        def q() -> tuple[Any, ...] | None:
            row = self.journal.conn.execute(
                "SELECT i.id, i.ca, i.cert_serial, i.device_serial, i.profile, i.state, i.updated_by, i.cert_der,"
                " r.reason FROM issuance i LEFT JOIN revocation r ON r.cert_serial = i.cert_serial"
                " WHERE i.cert_serial = ? AND i.ca = ?",
                (serial, ca),
            ).fetchone()
            return None if row is None else tuple(row)

        row = await self.journal.acall(q)
        if row is None or row[7] is None or bytes(row[7]) != der:
            raise _fail(f"certificate {serial} of CA {ca} is not one this appliance issued")
        if revoked_ok and row[5] in ("issued", "confirmed", "reworked", "scrapped"):
            pass
        elif row[8] is not None:
            raise _fail(f"certificate {serial} is revoked ({row[8]})", FailInfo.CERT_REVOKED)
        elif row[5] not in ("issued", "confirmed"):
            raise _fail(f"certificate {serial} is {row[5]}", FailInfo.CERT_REVOKED)
        return OwnCertificate(int(row[0]), str(row[1]), str(row[2]), str(row[3]), str(row[4]), str(row[5]),
                              None if row[6] is None else int(row[6]))  # fmt: skip

    async def own_by_serial(self, ca: str, serial_number: int) -> tuple[OwnCertificate, x509.Certificate]:
        """A certificate of this appliance named by issuer and serial (a kur forwarded by an RA names the one it
        updates): its row and the certificate. CmpError badCertId when there is no such certificate."""
        serial = format(serial_number, "x")

        def q() -> bytes | None:
            row = self.journal.conn.execute(
                "SELECT cert_der FROM issuance WHERE cert_serial = ? AND ca = ?", (serial, ca)
            ).fetchone()
            return None if row is None or row[0] is None else bytes(row[0])

        der = await self.journal.acall(q)
        if der is None:
            raise _fail(f"CA {ca} issued no certificate {serial}", FailInfo.BAD_CERT_ID)
        cert = x509.load_der_x509_certificate(der)
        if not _valid_at(cert, self._now()):
            raise _fail(f"certificate {serial} is not valid now", FailInfo.BAD_CERT_ID)
        return await self.own(cert, ca), cert

    # -- authentication ----------------------------------------------------------------------------------------
    async def authenticate(
        self,
        label: CmpLabel,
        signer: x509.Certificate,
        extra_certs: Sequence[x509.Certificate],
        station_fingerprint: bytes | None,
        purpose: Purpose = Purpose.OTHER,
        *,
        what: str = "message",
        revoked_ok: bool = False,
    ) -> Signer:
        """How `signer` (whose signature over the message verified) is trusted on `label` for a message `what`
        (its body's name) of `purpose`; CmpError otherwise, with a text that says what is wrong. `revoked_ok`
        (an rr of the signer's own certificate): a certificate of this appliance that is revoked or expired is
        still OWN, so the rr is answered with an rp saying so."""
        pool = tuple(extra_certs[1:])
        if purpose is Purpose.SELF:
            ca = self.own_ca_of(signer)
            if ca is not None:
                if not revoked_ok and not _valid_at(signer, self._now()):
                    raise _fail("the signer's certificate is not valid now")
                return Signer(SignerKind.OWN, signer, (), await self.own(signer, ca, revoked_ok=revoked_ok))
        if not _valid_at(signer, self._now()):
            raise _fail("the signer's certificate is not valid now")
        if (
            label.station_signature
            and self.management_ca is not None
            and station_fingerprint is not None
            and hashlib.sha256(signer.public_bytes(_DER)).digest() == station_fingerprint
            and self.issued_by(signer, self.management_ca)
        ):
            return Signer(SignerKind.STATION, signer)
        for kind, anchors in ((SignerKind.RA, label.trusted_cas), (SignerKind.DEVICE, label.idevid_roots)):
            if not anchors:
                continue
            chain = self.chain(signer, pool, anchors)
            if chain is None:
                continue
            own = await self._check_chain(label, signer, chain)
            if (
                kind is SignerKind.DEVICE
                and own is not None
                and own.ca == (label.issuing_ca or self.default_ca)
            ):
                if purpose is not Purpose.ENROL:
                    continue  # a certificate this label issued is this appliance's own (below)
                raise _fail(f"the signer is a certificate of CA {own.ca!r}, which this label issues from: an"
                            " operational certificate, not a birth certificate (idevid_roots anchors it too: anchor"
                            " idevid_roots at the CAs that issue birth certificates)")  # fmt: skip
            return Signer(kind, signer, chain, own)
        ca = self.own_ca_of(signer)
        if ca is not None and purpose is not Purpose.ENROL:
            return Signer(SignerKind.OWN, signer, (), await self.own(signer, ca))
        raise _fail(self._untrusted(label, signer, pool, purpose, what, ca)[:400])

    def _untrusted(
        self, label: CmpLabel, signer: x509.Certificate, pool: Sequence[x509.Certificate], purpose: Purpose,
        what: str, own_ca: str | None,
    ) -> str:  # fmt: skip
        """Why `signer` is not trusted on `label`: which anchors the label has, and where the path to them
        breaks (a missing issuer in extraCerts, or a link that does not verify)."""
        subject = signer.subject.rfc4514_string()[:120]
        configured = [
            n for n, a in (("trusted_ca", label.trusted_cas), ("idevid_roots", label.idevid_roots)) if a
        ]
        anchors = (*label.trusted_cas, *label.idevid_roots)
        if not configured:
            whom = f"an {what}" if purpose is Purpose.ENROL else f"a {what} of another CA"
            text = f"label {label.name!r} trusts no signer for {whom} (no trusted_ca or idevid_roots"
            text += ", and the signer is not the label's station)" if label.station_signature else ")"
        else:
            text = (f"the signer ({subject}) has no path to the {' or '.join(configured)} of label {label.name!r}:"
                    f" {self._break(signer, pool, anchors)}")  # fmt: skip
        if own_ca is not None and purpose is Purpose.ENROL:
            ca_cert = self.issuing_cas[own_ca]
            if not configured or self.chain(ca_cert, self._own_chain, anchors) is None:
                text += (f"; a certificate of this appliance signs only its own kur and rr (and genm) on a label"
                         f" that does not trust its CA ({own_ca})")  # fmt: skip
        return text

    def _break(
        self, cert: x509.Certificate, pool: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
    ) -> str:
        current = cert
        for _ in range(MAX_CHAIN):
            issuers = [c for c in (*anchors, *pool) if c.subject == current.issuer and c != current]
            if not issuers:
                return (f"the certificate of its issuer {current.issuer.rfc4514_string()[:120]!r} is neither an"
                        " anchor of the label nor in extraCerts (RFC 9483 3.3: send the protection certificate's"
                        " chain after it)")  # fmt: skip
            if any(c in anchors for c in issuers):
                break
            current = issuers[0]
        return ("a certificate of its chain is not valid now, is not a CA, or did not sign the certificate below"
                " it")  # fmt: skip

    async def _check_chain(
        self, label: CmpLabel, signer: x509.Certificate, chain: tuple[x509.Certificate, ...]
    ) -> OwnCertificate | None:
        """Revocation of every certificate of [signer, *chain] below the anchor; returns the signer's journal row
        when it is a certificate of this appliance."""
        path = (signer, *chain)
        own: OwnCertificate | None = None
        for i, cert in enumerate(path[:-1]):
            issuer = path[i + 1]
            if cert.fingerprint(_SHA256) in self._own_cas:
                continue  # this appliance's own CA hierarchy
            ca = next((n for n, c in self.issuing_cas.items() if c == issuer), None)
            if ca is not None:
                row = await self.own(cert, ca)
                own = row if i == 0 else own
            elif label.signer_revocation != "none":
                await self._check_crl(label, cert, issuer)
        return own

    async def _check_crl(self, label: CmpLabel, cert: x509.Certificate, issuer: x509.Certificate) -> None:
        now = self._now()
        reasons: list[str] = []
        usable: list[x509.CertificateRevocationList] = []
        for crl in label.crls:
            if crl.issuer == issuer.subject:
                why = self._unusable(crl, issuer, now)
                (reasons.append(f"configured CRL: {why}") if why else usable.append(crl))
        if not usable and label.crl_fetch:
            urls = crl_urls(cert)
            if not urls:
                reasons.append("the certificate names no http CRL distribution point")
            for url in urls:
                try:
                    crl = await self.crls.get(url)
                except CrlUnavailable as exc:
                    reasons.append(f"{url}: {exc}")
                    continue
                why = self._unusable(crl, issuer, now)
                if why:
                    reasons.append(f"{url}: {why}")
                else:
                    usable.append(crl)
                    break
        subject = cert.subject.rfc4514_string()[:120]
        if not usable:
            detail = "; ".join(reasons) or "no CRL is configured for its issuer"
            raise _fail(f"revocation status of {subject} is unknown: {detail}"[:400])
        for crl in usable:
            entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
            if entry is not None:
                raise _fail(f"certificate {subject} is revoked (CRL of its issuer)", FailInfo.CERT_REVOKED)

    @staticmethod
    def _unusable(crl: x509.CertificateRevocationList, issuer: x509.Certificate, now: dt.datetime) -> str:
        if crl.issuer != issuer.subject:
            return "issued by another CA"
        try:
            if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
                return "its signature does not verify with the issuer's key"
        except (TypeError, ValueError, UnsupportedAlgorithm):
            return "its signature cannot be checked"
        if crl.next_update_utc is None:
            return "it has no nextUpdate"
        if not crl.last_update_utc <= now < crl.next_update_utc:
            return (f"it is not current (thisUpdate {crl.last_update_utc:%Y-%m-%d %H:%M}, nextUpdate"
                    f" {crl.next_update_utc:%Y-%m-%d %H:%M})")  # fmt: skip
        return ""
