"""Who an EST client is (RFC 7030 3.3): a TLS client certificate, or HTTP Basic over the TLS connection, judged
per label.

- STATION: the label's station's own TLS client certificate (management CA, its registered fingerprint), with
  `station_certificate = true`; disabling or rotating the station is its revocation;
- DEVICE: a birth certificate chaining to the label's `idevid_roots` (greenfield), revocation checked: this
  appliance's certificates in the journal, others by CRL (the label's `signer_revocation`);
- PASSWORD: HTTP Basic with the label's user name and the password of its `password_file`;
- OWN (simplereenroll only): a certificate this appliance issued, current, valid and not revoked (its journal
  row, read now), renewing itself.

A TLS client certificate is judged by the same code as a CMP signer (appliance/cmp/trust.py, through
EstLabel.trust_view). TLS has already proved the client holds the certificate's key, and OpenSSL checked its
signature chain to one of the anchors the listener loads; which anchor counts for which label, and revocation,
are decided here.

Failed Basic logins are counted per peer address, on every label together: past `auth_failure_limit` within
`auth_failure_window_s` that address is answered 429 with Retry-After without any password being checked, so
guessing is paced; a successful login resets nothing (a failure leaves the count only when it is older than the
window). The log says so once per label and address and minute, never the password.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import enum
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance.alarms import LogOnce
from appliance.cmp.errors import CmpError, FailInfo
from appliance.cmp.trust import OwnCertificate, SignerKind, SignerTrust
from appliance.errors import ReasonCode
from appliance.est.csr import device_serial
from appliance.est.errors import EstError, refuse
from appliance.est.labels import EstLabel, EstSettings
from appliance.issuance.journal import Journal
from appliance.text import safe_repr

log = logging.getLogger(__name__)

MAX_PEERS = 4096  # failure counts kept at most (the oldest address is forgotten first)


@dataclass(frozen=True)
class TlsPeer:
    """What the TLS session says about the client."""

    version: str
    certificate: x509.Certificate | None = None
    chain: tuple[x509.Certificate, ...] = ()
    """The issuers OpenSSL verified above the client certificate (a pool for building its path to an anchor)."""
    binding: tuple[str, bytes | None] = ("tls-unique", None)
    """The channel binding type and value (appliance/est/binding.py)."""


class ClientKind(enum.Enum):
    STATION = "station"
    PASSWORD = "password"  # noqa: S105 - the kind of client, no secret
    DEVICE = "device"
    OWN = "own"


@dataclass(frozen=True)
class Client:
    kind: ClientKind
    who: str
    """For the log: the station, the Basic user, or the certificate's subject."""
    device_serial: str | None = None
    """DEVICE: the serial in the birth certificate; OWN: the device of the certificate being renewed."""
    own: OwnCertificate | None = None
    """DEVICE or OWN: the journal row when the certificate is this appliance's."""
    certificate: x509.Certificate | None = None
    replaced_by_key: bytes | None = None
    """OWN: the certificate was already renewed, to the key with this SHA-256 (of its SubjectPublicKeyInfo): only
    that renewal again (a client that lost the answer) is answered, with the same certificate."""


def _subject(cert: x509.Certificate) -> str:
    return safe_repr(cert.subject.rfc4514_string(), 120)


def _not_trusted(exc: CmpError) -> EstError:
    code = ReasonCode.DEVICE_SCRAPPED if "scrapped" in exc.message else ReasonCode.NOT_AUTHORISED
    what = "revoked" if exc.fail_info is FailInfo.CERT_REVOKED else "not trusted"
    return refuse(403, code, f"the TLS client certificate is {what}: {exc.message}")


class Authenticator:
    def __init__(
        self,
        journal: Journal,
        trust: SignerTrust,
        settings: EstSettings,
        default_ca: str,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.journal = journal
        self.trust = trust
        self.settings = settings
        self.default_ca = default_ca
        """The issuing CA of labels that name none ([issuance] issuing_ca)."""
        self.monotonic = monotonic
        self._failures: OrderedDict[str, list[float]] = OrderedDict()
        self._log = LogOnce(interval_s=60.0, max_causes=256)
        self.stats = {"basic_failed": 0, "basic_paced": 0}

    # -- the label's station ---------------------------------------------------------------------------------------
    async def station_fingerprint(self, label: EstLabel) -> bytes | None:
        """The label's station must be registered and enabled (read now: disabling it stops the label at once);
        returns its TLS certificate's fingerprint."""

        def q() -> tuple[int, bytes | None] | None:
            row = self.journal.conn.execute(
                "SELECT enabled, tls_fingerprint FROM stations WHERE name=?", (label.station,)
            ).fetchone()
            return None if row is None else (int(row[0]), row[1])

        row = await self.journal.acall(q)
        if row is None or not row[0]:
            raise refuse(403, ReasonCode.NOT_AUTHORISED,
                         f"the station of EST label {label.name!r} is not registered or is disabled")  # fmt: skip
        return None if row[1] is None else bytes(row[1])

    # -- simpleenroll ----------------------------------------------------------------------------------------
    async def enrolling(self, label: EstLabel, tls: TlsPeer, authorization: str | None, peer: str) -> Client:
        """The client of an enrolment on `label`: its TLS certificate if the label trusts it, else HTTP Basic."""
        fingerprint = await self.station_fingerprint(label)
        refused: EstError | None = None
        if tls.certificate is not None:
            try:
                return await self._certificate(label, tls, fingerprint)
            except EstError as exc:
                refused = exc
            management = self.trust.management_ca
            own = (
                hashlib.sha256(tls.certificate.public_bytes(serialization.Encoding.DER)).digest()
                == fingerprint
            )
            if management is not None and not own and self.trust.issued_by(tls.certificate, management):
                raise refused  # another station's certificate: no password makes it this label's
        if authorization is not None and authorization[:6].lower() == "basic " and label.basic:
            return self._basic(label, authorization[6:], peer)
        if label.basic:
            # A certificate this label does not take, and no password yet: the challenge, as without a certificate
            # (a beside-the-certificate password is still taken, above). A 403 here would leave a client that
            # sends Basic only when challenged (curl --anyauth, libest) unable to log in at all.
            why = (
                f" (the TLS client certificate was not taken: {refused.message})"
                if refused is not None
                else ""
            )
            raise refuse(401, ReasonCode.NOT_AUTHORISED, f"EST label {label.name!r} needs HTTP Basic"
                         f"{' or a TLS client certificate' if label.station_certificate or label.idevid_roots else ''}"
                         f"{why}", basic_realm=f"birthline est {label.name}")  # fmt: skip
        if refused is not None:
            raise refused
        # 403, not 401: a 401 must carry an HTTP authentication challenge, and no HTTP scheme sends a certificate.
        raise refuse(403, ReasonCode.NOT_AUTHORISED,
                     f"EST label {label.name!r} needs a TLS client certificate")  # fmt: skip

    async def _certificate(self, label: EstLabel, tls: TlsPeer, fingerprint: bytes | None) -> Client:
        cert = tls.certificate
        assert cert is not None
        view = label.trust_view()
        try:
            signer = await self.trust.authenticate(view, cert, (cert, *tls.chain), fingerprint)
        except CmpError as exc:
            if exc.fail_info is FailInfo.CERT_REVOKED or "scrapped" in exc.message:
                raise _not_trusted(exc) from None
            if self.trust.own_ca_of(cert) is not None:
                why = "a certificate of this appliance renews itself at simplereenroll"
            elif label.idevid_roots:
                why = exc.message  # where its path to the label's idevid_roots breaks
            else:
                takes = [w for w, on in (("its station's TLS client certificate", label.station_certificate),
                                         ("HTTP Basic", label.basic)) if on]  # fmt: skip
                why = f"the label takes {' or '.join(takes) or 'no TLS client certificate'}"
            raise refuse(403, ReasonCode.NOT_AUTHORISED, f"the TLS client certificate ({_subject(cert)}) does not"
                         f" authenticate an enrolment on EST label {label.name!r}: {why}") from None  # fmt: skip
        if signer.kind is SignerKind.STATION:
            return Client(ClientKind.STATION, label.station, certificate=cert)
        if signer.kind is SignerKind.DEVICE:
            own_ca = signer.own.ca if signer.own is not None else None
            if own_ca is not None and own_ca == (label.issuing_ca or self.default_ca):
                raise refuse(403, ReasonCode.NOT_AUTHORISED, f"the TLS client certificate was issued by CA"
                             f" {own_ca!r}, which label {label.name!r} issues from: it renews itself at"
                             " simplereenroll; a greenfield enrolment needs a birth certificate")  # fmt: skip
            try:
                serial = device_serial(cert.subject)
            except EstError:
                raise refuse(403, ReasonCode.NOT_AUTHORISED, "the birth certificate carries no device serial"
                             " (subject serialNumber)") from None  # fmt: skip
            return Client(ClientKind.DEVICE, _subject(cert), serial, signer.own, cert)
        raise refuse(403, ReasonCode.NOT_AUTHORISED, f"the TLS client certificate ({_subject(cert)}) does not"
                     f" authenticate an enrolment on label {label.name!r}: a certificate of this appliance renews"
                     " itself at simplereenroll")  # fmt: skip

    def _basic(self, label: EstLabel, encoded: str, peer: str) -> Client:
        now = self.monotonic()
        times = [t for t in self._failures.get(peer, ()) if now - t < self.settings.auth_failure_window_s]
        if len(times) >= self.settings.auth_failure_limit:
            self.stats["basic_paced"] += 1
            wait = self.settings.auth_failure_window_s - (now - times[0])
            raise refuse(429, ReasonCode.BUSY, f"too many failed HTTP Basic logins from this address; try again"
                         f" in {wait:.0f} s", retry_after_s=max(1.0, wait))  # fmt: skip
        try:
            user, sep, password = base64.b64decode(encoded.strip(), validate=True).partition(b":")
            name = user.decode()
        except (binascii.Error, ValueError):
            sep, name, password = b"", "", b""
        if sep and label.password_matches(name, password):
            # A success erases no failure: guesses on one label between right logins on another (or the same)
            # still add up; failures leave the count only by aging out of the window.
            return Client(ClientKind.PASSWORD, safe_repr(name, 64))
        self.stats["basic_failed"] += 1
        times.append(now)
        self._failures[peer] = times
        self._failures.move_to_end(peer)
        while len(self._failures) > MAX_PEERS:
            self._failures.popitem(last=False)
        self._log.log(log, logging.WARNING, f"basic:{label.name}:{peer}",
                      "EST label %s: HTTP Basic login failed from %s (%d in the window)", label.name, peer,
                      len(times))  # fmt: skip
        raise refuse(401, ReasonCode.NOT_AUTHORISED, "wrong user name or password",
                     basic_realm=f"birthline est {label.name}")  # fmt: skip

    # -- simplereenroll ------------------------------------------------------------------------------------------
    async def renewing(self, label: EstLabel, tls: TlsPeer) -> Client:
        """The certificate being renewed: the TLS client certificate, one of this appliance's, current, valid and
        not revoked (RFC 7030 4.2.2, 3.3.2)."""
        await self.station_fingerprint(label)
        cert = tls.certificate
        if cert is None:
            raise refuse(403, ReasonCode.NOT_AUTHORISED, "simplereenroll is authenticated by the certificate"
                         " being renewed: present it as the TLS client certificate")  # fmt: skip
        ca = self.trust.own_ca_of(cert)
        if ca is None:
            raise refuse(403, ReasonCode.NOT_AUTHORISED, f"the TLS client certificate ({_subject(cert)}) is not"
                         " one this appliance issued: only those are renewed here")  # fmt: skip
        now = dt.datetime.now(dt.UTC)
        if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
            raise refuse(403, ReasonCode.NOT_AUTHORISED, "the certificate being renewed is not valid now")
        try:
            own = await self.trust.own(cert, ca)
        except CmpError as exc:
            # Revoked, unless superseded by its own renewal (a product that revokes what a renewal replaces): the
            # client that lost the answer asks again with it; the responder answers only that renewal's key.
            reason, _ = await self._successor(cert, ca)
            if exc.fail_info is not FailInfo.CERT_REVOKED or reason != "superseded":
                raise _not_trusted(exc) from None
            own = await self.trust.own(cert, ca, revoked_ok=True)
        successor = None
        if own.updated_by is not None:
            reason, successor = await self._successor(cert, ca)
            if successor is None or reason not in (None, "superseded"):
                raise refuse(403, ReasonCode.NOT_AUTHORISED, f"certificate {own.cert_serial} is not the current"
                             f" certificate of device {own.device_serial!r}: it was replaced")  # fmt: skip
        return Client(ClientKind.OWN, _subject(cert), own.device_serial, own, cert, successor)

    async def _successor(self, cert: x509.Certificate, ca: str) -> tuple[str | None, bytes | None]:
        """The certificate's revocation reason, and the key (SHA-256 of its SubjectPublicKeyInfo) of the
        certificate that replaced it."""
        serial = format(cert.serial_number, "x")

        def q() -> tuple[str | None, bytes | None]:
            row = self.journal.conn.execute(
                "SELECT r.reason, n.public_key_sha256 FROM issuance i"
                " LEFT JOIN revocation r ON r.cert_serial = i.cert_serial"
                " LEFT JOIN issuance n ON n.id = i.updated_by AND n.state NOT IN ('burned', 'intent')"
                " WHERE i.cert_serial = ? AND i.ca = ?",
                (serial, ca),
            ).fetchone()
            if row is None:
                return None, None
            return (None if row[0] is None else str(row[0])), (None if row[1] is None else bytes(row[1]))

        return await self.journal.acall(q)
