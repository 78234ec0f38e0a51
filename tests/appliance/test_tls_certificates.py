"""The management CA's TLS leaf certificates: validity as documented, each name once."""

from __future__ import annotations

import datetime as dt
import ipaddress

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import ca as ca_mod
from appliance.issuance.journal import Journal
from appliance.stations_registry import TLS_CERT_DAYS, sign_tls_certificate
from hsm.token import Token


def test_validity_is_tls_cert_days_and_names_are_not_repeated(journal: Journal, hsm_token: Token) -> None:
    ca = ca_mod.load_ca(journal, "management")
    key = ec.generate_private_key(ec.SECP256R1())
    before = dt.datetime.now(dt.UTC)
    cert = sign_tls_certificate(
        hsm_token, ca, "birthline", key.public_key(), server=True,
        dns_names=("localhost", "birthline", "localhost"), ip_addresses=("127.0.0.1", "::1", "127.0.0.1"),
    )  # fmt: skip
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == dt.timedelta(days=TLS_CERT_DAYS)
    assert cert.not_valid_before_utc <= before
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "birthline"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")
    ]  # fmt: skip
