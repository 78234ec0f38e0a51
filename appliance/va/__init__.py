"""Revocation and validation: the revocation store, CRLs and the OCSP responder (docs/revocation.md)."""

from appliance.va.crl import CrlInfo, CrlPublisher, generate_crl, issuing_cas, load_crl
from appliance.va.ocsp import OcspAnswer, OcspResponder
from appliance.va.revocation import (
    Reason,
    Revocation,
    RevocationError,
    RevokeResult,
    Source,
    get_revocation,
    list_revocations,
    revoke,
    revoke_in_transaction,
)
from appliance.va.service import ValidationAuthority, VaSettings
from appliance.va.signer import OcspSigner, ensure_signer
from appliance.va.status import lookup_status

__all__ = [
    "CrlInfo",
    "CrlPublisher",
    "OcspAnswer",
    "OcspResponder",
    "OcspSigner",
    "Reason",
    "Revocation",
    "RevocationError",
    "RevokeResult",
    "Source",
    "VaSettings",
    "ValidationAuthority",
    "ensure_signer",
    "generate_crl",
    "get_revocation",
    "issuing_cas",
    "list_revocations",
    "load_crl",
    "lookup_status",
    "revoke",
    "revoke_in_transaction",
]
