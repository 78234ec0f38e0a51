"""The appliance's CA hierarchy: root, issuing (birth) and management CAs whose keys live in the HSM."""

from appliance.ca.hierarchy import (
    CaError,
    CaRecord,
    create_csr_for_external_root,
    create_issuing,
    create_management,
    create_root,
    import_ca_certificate,
    list_cas,
    load_ca,
)

__all__ = [
    "CaError",
    "CaRecord",
    "create_csr_for_external_root",
    "create_issuing",
    "create_management",
    "create_root",
    "import_ca_certificate",
    "list_cas",
    "load_ca",
]
