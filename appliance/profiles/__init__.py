"""Certificate profiles: configuration, device serial checks, CSR intake and the certificate builder."""

from appliance.profiles.builder import build_certificate, hardware_module_name, validity
from appliance.profiles.config import builtin_profiles, parse_profiles
from appliance.profiles.csr import ValidatedCsr, ValidatedKey, validate_csr, validate_public_key
from appliance.profiles.model import (
    KEY_ALGORITHMS,
    KEY_USAGES,
    NOT_AFTER_FOREVER,
    OID_HARDWARE_MODULE_NAME,
    OID_MASA_URL,
    OID_MATTER_PID,
    OID_MATTER_VID,
    Profile,
)
from appliance.profiles.serial import new_serial_number, safe_repr, validate_device_serial

__all__ = [
    "KEY_ALGORITHMS",
    "KEY_USAGES",
    "NOT_AFTER_FOREVER",
    "OID_HARDWARE_MODULE_NAME",
    "OID_MASA_URL",
    "OID_MATTER_PID",
    "OID_MATTER_VID",
    "Profile",
    "ValidatedCsr",
    "ValidatedKey",
    "build_certificate",
    "builtin_profiles",
    "hardware_module_name",
    "new_serial_number",
    "parse_profiles",
    "safe_repr",
    "validate_csr",
    "validate_device_serial",
    "validate_public_key",
    "validity",
]
