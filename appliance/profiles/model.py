"""The certificate profile: everything that decides what goes into a birth certificate.

A Profile is immutable and fully validated by `parse_profiles`; the builder trusts it and never re-checks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final, Literal

ProfileKind = Literal["idevid", "matter-dac"]
KINDS: Final[tuple[str, ...]] = ("idevid", "matter-dac")

KEY_ALGORITHMS: Final[tuple[str, ...]] = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519")

# Order matches x509.KeyUsage's constructor. keyCertSign and cRLSign are left out on purpose: a birth
# certificate is an end-entity certificate, and RFC 5280 4.2.1.3 ties keyCertSign to cA=TRUE.
KEY_USAGES: Final[tuple[str, ...]] = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
    "encipher_only",
    "decipher_only",
)

# RFC 8995 2.6.2 / RFC 5280 4.1.2.5: "no well-defined expiration date".
NOT_AFTER_FOREVER: Final = "99991231235959Z"

OID_HARDWARE_MODULE_NAME: Final = "1.3.6.1.5.5.7.8.4"  # RFC 4108 5
OID_MASA_URL: Final = "1.3.6.1.5.5.7.1.32"  # RFC 8995 2.3.2
OID_MATTER_VID: Final = "1.3.6.1.4.1.37244.2.1"
OID_MATTER_PID: Final = "1.3.6.1.4.1.37244.2.2"

# X.520 upper bound for serialNumber, repeated by RFC 8995 2.3.1 and 802.1AR.
DEVICE_SERIAL_MAX: Final = 64


@dataclass(frozen=True)
class Profile:
    name: str
    kind: ProfileKind = "idevid"
    subject_o: str | None = None
    subject_ou: str | None = None
    subject_cn: str | None = None
    key_algorithms: frozenset[str] = field(
        default_factory=lambda: frozenset({"ec-p256", "ec-p384", "rsa-2048", "rsa-3072"})
    )
    # Exactly one of not_after / validity_days is set; parse_profiles enforces it.
    not_after: str | None = NOT_AFTER_FOREVER
    validity_days: int | None = None
    backdate_seconds: int = 0
    key_usage: tuple[str, ...] = ("digital_signature",)
    key_usage_critical: bool = True
    basic_constraints: bool = True
    hardware_module_name: str | None = None
    masa_url: str | None = None
    crl_urls: tuple[str, ...] = ()
    ocsp_url: str | None = None
    device_serial_max: int = DEVICE_SERIAL_MAX
    vendor_id: str | None = None
    product_id: str | None = None
