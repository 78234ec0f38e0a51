"""EST's pure parts: request bodies as RFC 8951 allows them, and how the core's answers map to HTTP."""

from __future__ import annotations

import base64

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.errors import IssuancePending, IssuanceRefused, ReasonCode
from appliance.est.errors import EstError, from_core
from appliance.est.server import _error
from appliance.est.wire import decode_body, encode_body


def _csr() -> x509.CertificateSigningRequest:
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-1")])
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(subject)
        .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
    )


def test_request_bodies_in_every_form_rfc_8951_allows() -> None:
    csr = _csr()
    der = csr.public_bytes(serialization.Encoding.DER)
    b64 = base64.b64encode(der)
    forms = [b64, encode_body(der), encode_body(der, b"\r\n"), b64.rstrip(b"="), b" \n" + b64 + b"\n\n",
             csr.public_bytes(serialization.Encoding.PEM)]  # fmt: skip
    for form in forms:
        assert decode_body(form) == der, form[:40]
    for bad in (b"", b"\n \n", b"***", b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"):
        with pytest.raises(EstError) as refused:
            decode_body(bad)
        assert refused.value.code is ReasonCode.BAD_CSR and refused.value.status == 400
    assert all(len(line) <= 64 for line in encode_body(der).splitlines())


def test_the_cores_answers_map_to_http() -> None:
    pending = from_core(IssuancePending("the upstream CA has not answered yet", 30.0, 7))
    response = _error(pending)
    assert response.status == 202 and response.headers["Retry-After"] == "30"
    busy = _error(from_core(IssuanceRefused("HSM down", ReasonCode.HSM_UNAVAILABLE)))
    assert busy.status == 503 and busy.headers["Retry-After"] == "5"
    assert busy.body == b"HSM_UNAVAILABLE (12): HSM down\n"
    assert from_core(IssuanceRefused("x", ReasonCode.QUOTA_EXHAUSTED)).status == 403
    assert from_core(IssuanceRefused("x", ReasonCode.KEY_ALREADY_CERTIFIED)).status == 409
    assert from_core(IssuanceRefused("x", ReasonCode.KEY_POLICY)).status == 400
    assert "Retry-After" not in _error(from_core(IssuanceRefused("x", ReasonCode.NOT_AUTHORISED))).headers
