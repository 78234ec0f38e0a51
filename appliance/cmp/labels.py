"""CMP labels (`/.well-known/cmp/p/<label>`): whom a label acts as, how its peers authenticate and what they may
do, read from `[cmp.labels.<name>]` (docs/configuration.md#cmp)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import NameOID

from appliance.admission import AdmissionLimits
from appliance.cmp.errors import CmpError, FailInfo
from appliance.cmp.model import DEFAULT_LIMITS
from appliance.config import CmpSection
from appliance.errors import ConfigError, Problem


@dataclass(frozen=True)
class CmpLabel:
    """One /.well-known/cmp/p/<label>: who it acts as, how its peers authenticate, what they may do."""

    name: str
    station: str
    """The registered station whose line and work orders authorise this label's requests."""
    profile: str | None = None
    secret: bytes | None = field(default=None, repr=False)
    """The MAC secret (read from the label's secret_file); None: no MAC accepted."""
    kid: bytes = b""
    """The senderKID that names the secret; the label's name when empty."""
    station_signature: bool = False
    """Accept a signature by the station's own TLS certificate (management CA, checked by fingerprint)."""
    trusted_cas: tuple[x509.Certificate, ...] = ()
    """Accept a signature by a certificate that chains (through extraCerts) to one of these CAs: a downstream RA
    or a station with a credential of its own CA. Its requests are for any device of the label's work orders."""
    allow_rr: bool = False
    """Signers trusted by station_signature or trusted_cas may revoke any certificate of this appliance (RFC 9483
    5.3.2). A certificate may always be revoked with its own key (4.2), on any label."""
    allow_nested: bool = False
    implicit_confirm: bool = True
    accept_ra_verified: bool = False
    """Accept cr/ir/kur with POP raVerified (RFC 9483 5.2.3.2), and kur on behalf of a device, when the message is
    signed by a signer trusted by station_signature or trusted_cas: a downstream Birthline's forwarder."""
    issuing_ca: str | None = None
    """The issuing CA (and its work orders) for this label's ir/cr/p10cr; None: [issuance] issuing_ca."""
    idevid_roots: tuple[x509.Certificate, ...] = ()
    """Greenfield enrolment: a device may sign its ir/cr/p10cr with a birth certificate (IDevID) that chains to
    one of these CAs; the certificate requested is then for the device serial in that birth certificate."""
    signer_revocation: str = "crl"
    """How the revocation status of a signer from trusted_cas or idevid_roots (not of this appliance) is known:
    'crl' (configured CRLs, or fetched from the certificate's CRL distribution points; unknown status refuses
    the message) or 'none' (not checked: for CAs that publish no revocation information)."""
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    crl_fetch: bool = True
    """Fetch a CRL from a signer certificate's CRL distribution points (http) when no configured one applies."""

    @property
    def sender_kid(self) -> bytes:
        return self.kid or self.name.encode()

    @property
    def signature_trusted(self) -> bool:
        """Signers other than this appliance's own certificates can be trusted on this label."""
        return self.station_signature or bool(self.trusted_cas) or bool(self.idevid_roots)


@dataclass(frozen=True)
class CmpSettings:
    max_message_bytes: int = DEFAULT_LIMITS.max_message_size
    confirm_wait_s: float = 300.0
    max_pending: int = 10_000
    default_label: str = ""
    crl_timeout_s: float = 5.0
    crl_max_bytes: int = 1024 * 1024
    crl_retry_s: float = 60.0
    crl_refresh_s: float = 3600.0
    max_mac_iterations: int = 10_000
    """The most PBM / PBKDF2 iterations a received message may ask for (checked before any derivation)."""
    admission: AdmissionLimits = field(default_factory=AdmissionLimits)
    """What peers that have not authenticated may make the server do (appliance/admission.py)."""


def device_serial_of(subject: x509.Name | None) -> str:
    """The device serial: the subject's serialNumber attribute (exactly one)."""
    values = [] if subject is None else subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    if len(values) != 1 or not isinstance(values[0].value, str) or not values[0].value:
        raise CmpError(
            "the requested subject must carry exactly one serialNumber attribute: the device serial",
            fail_info=FailInfo.BAD_CERT_TEMPLATE,
        )
    return values[0].value


def read_secret_file(path: Path) -> bytes:
    """A MAC secret from a file readable by its owner only (0600 or stricter); surrounding whitespace stripped."""
    if path.stat().st_mode & 0o077:
        raise ConfigError(
            [Problem(str(path), "a CMP secret file must be mode 0600 (readable by its owner only)")]
        )
    secret = path.read_bytes().strip()
    if not secret:
        raise ConfigError([Problem(str(path), "the CMP secret file is empty")])
    return secret


def _certificates(path: Path | None, where: str) -> tuple[x509.Certificate, ...]:
    if path is None:
        return ()
    try:
        return tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigError([Problem(where, f"cannot load certificates from {path}: {exc}")]) from None


def load_crl_files(paths: tuple[Path, ...], where: str) -> tuple[x509.CertificateRevocationList, ...]:
    """CRL files (PEM or DER) a label names, each problem a ConfigError at `where` (CMP and EST labels)."""
    crls: list[x509.CertificateRevocationList] = []
    for path in paths:
        try:
            data = path.read_bytes()
            crls.append(
                x509.load_pem_x509_crl(data) if b"-----BEGIN" in data else x509.load_der_x509_crl(data)
            )
        except (OSError, ValueError) as exc:
            raise ConfigError([Problem(where, f"cannot load a CRL from {path}: {exc}")]) from None
    return tuple(crls)


def labels_from_config(section: CmpSection) -> dict[str, CmpLabel]:
    """The configured labels with their secrets, trusted CAs and CRLs read from their files."""
    labels: dict[str, CmpLabel] = {}
    for name, cfg in section.labels.items():
        where = f"cmp.labels.{name}"
        labels[name] = CmpLabel(
            name, cfg.station, cfg.profile,
            secret=read_secret_file(cfg.secret_file) if cfg.secret_file is not None else None,
            kid=cfg.kid.encode(), station_signature=cfg.station_signature,
            trusted_cas=_certificates(cfg.trusted_ca, f"{where}.trusted_ca"),
            allow_rr=cfg.allow_rr, allow_nested=cfg.allow_nested, implicit_confirm=cfg.implicit_confirm,
            accept_ra_verified=cfg.accept_ra_verified, issuing_ca=cfg.issuing_ca,
            idevid_roots=_certificates(cfg.idevid_roots, f"{where}.idevid_roots"),
            signer_revocation=cfg.signer_revocation, crls=load_crl_files(cfg.crl_files, f"{where}.crl_files"),
            crl_fetch=cfg.crl_fetch,
        )  # fmt: skip
    return labels


def settings_from_config(section: CmpSection) -> CmpSettings:
    return CmpSettings(
        section.max_message_bytes, section.confirm_wait_s, section.max_pending, section.default_label,
        section.crl_timeout_s, section.crl_max_bytes, section.crl_retry_s, section.crl_refresh_s,
        max_mac_iterations=section.max_mac_iterations,
        admission=AdmissionLimits(
            check_rate_per_client=section.check_rate_per_client,
            check_burst_per_client=section.check_burst_per_client, check_rate_total=section.check_rate_total,
            check_burst_total=section.check_burst_total, pace_max_delay_s=section.pace_max_delay_s,
            checks_in_flight=section.checks_in_flight, clients_max=section.clients_max,
            known_client_s=section.known_client_s,
        ),
    )  # fmt: skip
