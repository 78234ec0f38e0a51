"""EST labels (`/.well-known/est/<label>/...`, RFC 7030 3.2.2): whom a label acts as and who may enrol on it,
read from `[est.labels.<name>]` (docs/configuration.md#est, docs/est.md)."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from cryptography import x509

from appliance.cmp.labels import CmpLabel, load_crl_files
from appliance.config import EstSection
from appliance.errors import ConfigError, Problem

ChannelBinding = Literal["optional", "required"]


@dataclass(frozen=True)
class EstLabel:
    """One /.well-known/est/<label>: the registered station it acts as, and how its clients authenticate."""

    name: str
    station: str
    """The registered station whose line and work orders authorise this label's enrolments."""
    profile: str | None = None
    issuing_ca: str | None = None
    """The issuing CA (and its work orders) for this label's enrolments; None: [issuance] issuing_ca."""
    station_certificate: bool = False
    """Accept the station's own TLS client certificate (management CA, its registered fingerprint)."""
    username: str = ""
    password_sha256: bytes | None = field(default=None, repr=False)
    """HTTP Basic: the SHA-256 of the password (from password_file); None: no Basic authentication."""
    idevid_roots: tuple[x509.Certificate, ...] = ()
    """Greenfield: a device may enrol with a TLS client certificate (its birth certificate) chaining to these."""
    signer_revocation: str = "crl"
    crls: tuple[x509.CertificateRevocationList, ...] = ()
    crl_fetch: bool = True
    channel_binding: ChannelBinding = "optional"
    serverkeygen: bool = False
    """/serverkeygen on this label: the appliance generates the device's key (docs/est.md)."""

    @property
    def basic(self) -> bool:
        return self.password_sha256 is not None

    @property
    def user(self) -> str:
        return self.username or self.name

    def password_matches(self, username: str, password: bytes) -> bool:
        """Constant time in the password (both sides hashed first, so neither length leaks)."""
        if self.password_sha256 is None:
            return False
        same_password = hmac.compare_digest(hashlib.sha256(password).digest(), self.password_sha256)
        return same_password and hmac.compare_digest(username.encode(), self.user.encode())

    def trust_view(self) -> CmpLabel:
        """The label as the signer trust of appliance/cmp/trust.py judges a certificate: the same rules for a TLS
        client certificate as for a CMP signer (the station's certificate by fingerprint, a birth certificate
        through idevid_roots with its revocation, this appliance's certificates in the journal)."""
        return CmpLabel(
            f"est:{self.name}", self.station, self.profile, station_signature=self.station_certificate,
            issuing_ca=self.issuing_ca, idevid_roots=self.idevid_roots, signer_revocation=self.signer_revocation,
            crls=self.crls, crl_fetch=self.crl_fetch,
        )  # fmt: skip


@dataclass(frozen=True)
class EstSettings:
    default_label: str = ""
    max_request_bytes: int = 16 * 1024
    max_csr_bytes: int = 8192
    keygen_in_flight: int = 4
    auth_failure_limit: int = 10
    auth_failure_window_s: float = 60.0


def read_password_file(path: Path) -> bytes:
    """A password from a file readable by its owner only (0600 or stricter); surrounding whitespace stripped."""
    try:
        if path.stat().st_mode & 0o077:
            raise ConfigError([Problem(str(path), "an EST password file must be mode 0600 (readable by its owner"
                                                  " only)")])  # fmt: skip
        password = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(
            [Problem(str(path), f"cannot read the EST password file: {exc.strerror}")]
        ) from None
    if not password:
        raise ConfigError([Problem(str(path), "the EST password file is empty")])
    return password


def _certificates(path: Path | None, where: str) -> tuple[x509.Certificate, ...]:
    if path is None:
        return ()
    try:
        return tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigError([Problem(where, f"cannot load certificates from {path}: {exc}")]) from None


def labels_from_config(section: EstSection) -> dict[str, EstLabel]:
    """The configured labels with their passwords (hashed), birth-certificate roots and CRLs read from files."""
    labels: dict[str, EstLabel] = {}
    for name, cfg in section.labels.items():
        where = f"est.labels.{name}"
        password = read_password_file(cfg.password_file) if cfg.password_file is not None else None
        labels[name] = EstLabel(
            name, cfg.station, cfg.profile, cfg.issuing_ca, station_certificate=cfg.station_certificate,
            username=cfg.username, password_sha256=None if password is None else hashlib.sha256(password).digest(),
            idevid_roots=_certificates(cfg.idevid_roots, f"{where}.idevid_roots"),
            signer_revocation=cfg.signer_revocation, crls=load_crl_files(cfg.crl_files, f"{where}.crl_files"), crl_fetch=cfg.crl_fetch,
            channel_binding="required" if cfg.channel_binding == "required" else "optional",
            serverkeygen=cfg.serverkeygen,
        )  # fmt: skip
    return labels


def settings_from_config(section: EstSection, max_csr_bytes: int) -> EstSettings:
    return EstSettings(
        section.default_label, section.max_request_bytes, max_csr_bytes, section.keygen_in_flight,
        section.auth_failure_limit, section.auth_failure_window_s,
    )  # fmt: skip
