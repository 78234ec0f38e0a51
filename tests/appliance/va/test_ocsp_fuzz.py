"""Every OCSP request a client can send is answered with a refusal and a reason, or an answer; internalError is
for our own failures. A fast slice of bench/ocsp_fuzz.py (mutations of real `openssl ocsp -reqout` requests),
the inputs it found that reached internalError before, and hand-built edge cases."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from appliance import der
from appliance.va.ocsp import INTERNAL_ERROR, OcspResponder
from appliance.va.ocsp_request import OcspRequest, Refusal, parse_request
from bench.ocsp_fuzz import Mutator, openssl_seeds
from tests.appliance.va.conftest import Va

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")
S = ocsp.OCSPResponseStatus
PEM = serialization.Encoding.PEM
REGRESSIONS = Path(__file__).parent / "data" / "ocsp_request_regressions.txt"
NONCE_OID = "1.3.6.1.5.5.7.48.1.2"


@pytest.fixture
def responder(va: Va) -> OcspResponder:
    r = OcspResponder(va.journal, va.token, va.audit)
    r.load()
    return r


@pytest.fixture
def seeds(va: Va, tmp_path: Path) -> list[bytes]:
    issuing = tmp_path / "issuing.pem"
    issuing.write_bytes(va.issuing.certificate.public_bytes(PEM))
    certs = []
    for device in ("SN-0001", "SN-0002", "SN-0003"):
        certs.append(tmp_path / f"{device}.pem")
        certs[-1].write_bytes(va.cert(device).public_bytes(PEM))
    key = tmp_path / "requestor.key"
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(key)], check=True
    )
    requestor = tmp_path / "requestor.pem"
    subprocess.run(
        ["openssl", "req", "-new", "-x509", "-key", str(key), "-subj", "/CN=requestor", "-days", "1",
         "-out", str(requestor)],
        check=True, capture_output=True,
    )  # fmt: skip
    return openssl_seeds(tmp_path, issuing, certs, (requestor, key))


def test_seeds_from_openssl_parse_as_expected(va: Va, seeds: list[bytes]) -> None:
    parsed = [parse_request(s, 4096) for s in seeds]
    assert [p.reason if isinstance(p, Refusal) else "ok" for p in parsed] == [
        "ok", "ok", "ok", "several-requests", "ok", "ok",
    ]  # fmt: skip
    first = parsed[0]
    assert isinstance(first, OcspRequest) and first.nonce is not None and len(first.nonce) == 16
    assert first.serial == va.cert("SN-0001").serial_number and first.hash_algorithm.name == "sha1"
    assert isinstance(parsed[2], OcspRequest) and parsed[2].hash_algorithm.name == "sha256"
    assert isinstance(parsed[4], OcspRequest) and parsed[4].serial == 0x1234 and parsed[4].nonce is None
    # the signed request's signature and requestorName are carried, not checked
    assert isinstance(parsed[5], OcspRequest) and parsed[5].serial == va.cert("SN-0003").serial_number


def test_mutations_of_real_requests_get_an_answer_or_a_reason(
    va: Va, seeds: list[bytes], responder: OcspResponder, caplog: pytest.LogCaptureFixture
) -> None:
    mutate = Mutator(seeds, seed=6960)
    reasons: set[str] = set()
    for _ in range(3000):
        got = parse_request(mutate(), 4096)  # raises nothing
        if isinstance(got, Refusal):
            assert got.status in (S.MALFORMED_REQUEST, S.UNAUTHORIZED)
            reasons.add(got.reason)
    # the slice reaches the refusals this work is about
    assert {"several-requests", "repeated-extension", "not-der", "bad-nonce", "no-request"} <= reasons
    caplog.set_level(logging.INFO, logger="appliance.va.ocsp")
    statuses = set()
    for _ in range(300):
        answer = responder.answer(mutate())
        assert answer is not INTERNAL_ERROR, responder.last_error
        statuses.add(answer.status)
    assert responder.errors == 0 and statuses <= {S.SUCCESSFUL, S.MALFORMED_REQUEST, S.UNAUTHORIZED}
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    # at most one line per refusal reason, whatever the number of requests
    lines = [r for r in caplog.records if r.name == "appliance.va.ocsp"]
    assert len(lines) == len(responder.refused) and sum(responder.refused.values()) > len(lines)
    assert (
        ocsp.load_der_ocsp_response(responder.respond(seeds[1])).certificate_status
        == ocsp.OCSPCertStatus.GOOD
    )


def test_fuzz_findings_stay_refused(responder: OcspResponder) -> None:
    cases = [
        line.split() for line in REGRESSIONS.read_text().splitlines() if line and not line.startswith("#")
    ]
    assert len(cases) >= 8
    for status, reason, hexdata in cases:
        data = bytes.fromhex(hexdata)
        got = parse_request(data, 4096)
        assert isinstance(got, Refusal) and (got.status.name, got.reason) == (status, reason), hexdata
        assert ocsp.load_der_ocsp_response(responder.respond(data)).response_status.name == status
    assert responder.errors == 0


def _request(
    va: Va,
    *,
    extensions: list[bytes] | None = None,
    requests: int = 1,
    serial: bytes | None = None,
    version: bytes | None = None,
) -> bytes:
    """An OCSPRequest for SN-0001 built field by field, to say what no library lets one say."""
    cert: x509.Certificate = va.cert("SN-0001")
    built = ocsp.OCSPRequestBuilder().add_certificate(cert, va.issuing.certificate, hashes.SHA1())  # noqa: S303
    body = built.build().public_bytes(serialization.Encoding.DER)
    tbs = der.read_children(body, der.read_tlv(body))[0]
    request_list = der.read_children(body, tbs)[0]
    (request,) = der.read_children(body, request_list)
    one = body[request.start : request.end]
    if serial is not None:
        (cert_id,) = der.read_children(body, request)
        alg, name_hash, key_hash, _ = der.read_children(body, cert_id)
        one = der.sequence(der.sequence(*(body[t.start : t.end] for t in (alg, name_hash, key_hash)), serial))
    fields = [der.tlv(0xA0, version)] if version is not None else []
    fields.append(der.sequence(*[one] * requests))
    if extensions is not None:
        fields.append(der.tlv(0xA2, der.sequence(*extensions)))
    return der.sequence(der.sequence(*fields))


def _ext(oid: str, value: bytes, *, critical: bytes | None = None) -> bytes:
    flag = [der.tlv(0x01, critical)] if critical is not None else []
    return der.sequence(der.oid(oid), *flag, der.octet_string(value))


NONCE_A = _ext(NONCE_OID, der.octet_string(b"a" * 16))
NONCE_B = _ext(NONCE_OID, der.octet_string(b"b" * 16))
OTHER = _ext("1.2.3.4", b"")
EDGE_CASES: dict[str, tuple[Callable[[Va], bytes], str]] = {
    "two requests": (lambda va: _request(va, requests=2), "several-requests"),
    "no request": (lambda va: _request(va, requests=0), "no-request"),
    "the same nonce twice": (lambda va: _request(va, extensions=[NONCE_A, NONCE_A]), "repeated-extension"),
    "two different nonces": (lambda va: _request(va, extensions=[NONCE_A, NONCE_B]), "repeated-extension"),
    "another extension twice": (lambda va: _request(va, extensions=[OTHER, OTHER]), "repeated-extension"),
    "empty nonce": (
        lambda va: _request(va, extensions=[_ext(NONCE_OID, der.octet_string(b""))]),
        "nonce-length",
    ),
    "33-octet nonce": (
        lambda va: _request(va, extensions=[_ext(NONCE_OID, der.octet_string(b"x" * 33))]),
        "nonce-length",
    ),
    "nonce not an OCTET STRING": (
        lambda va: _request(va, extensions=[_ext(NONCE_OID, b"x" * 16)]),
        "bad-nonce",
    ),
    "unknown critical extension": (
        lambda va: _request(va, extensions=[_ext("1.2.3.4", b"", critical=b"\xff")]),
        "unsupported-critical-extension",
    ),
    # FALSE is the DEFAULT of critical, and DER never encodes a DEFAULT
    "critical FALSE spelled out": (
        lambda va: _request(va, extensions=[_ext(NONCE_OID, der.octet_string(b"n"), critical=b"\x00")]),
        "not-der",
    ),
    "negative serial": (lambda va: _request(va, serial=der.tlv(0x02, b"\xff")), "bad-serial"),
    "21-octet serial": (lambda va: _request(va, serial=der.tlv(0x02, b"\x01" * 21)), "bad-serial"),
    "non-minimal INTEGER": (lambda va: _request(va, serial=der.tlv(0x02, b"\x00\x01")), "not-der"),
    "version v2": (lambda va: _request(va, version=der.tlv(0x02, b"\x01")), "unsupported-version"),
    "trailing byte": (lambda va: _request(va) + b"\x00", "trailing-bytes"),
    "indefinite length": (lambda va: b"\x30\x80" + _request(va)[2:] + b"\x00\x00", "not-der"),
    "non-minimal length": (lambda va: b"\x30\x81" + _request(va)[1:], "not-der"),
}


@pytest.mark.parametrize("case", EDGE_CASES)
def test_edge_cases_are_refused_with_their_reason(va: Va, responder: OcspResponder, case: str) -> None:
    build, reason = EDGE_CASES[case]
    data = build(va)
    got = parse_request(data, 4096)
    assert isinstance(got, Refusal) and got.reason == reason and got.status == S.MALFORMED_REQUEST
    assert ocsp.load_der_ocsp_response(responder.respond(data)).response_status == S.MALFORMED_REQUEST
    assert responder.errors == 0 and responder.refused == {reason: 1}


def test_what_is_tolerated(va: Va, responder: OcspResponder) -> None:
    """An explicit v1, an empty Extensions, and unknown non-critical extensions change nothing."""
    for data in (
        _request(va, version=der.tlv(0x02, b"\x00")),
        _request(va, extensions=[]),
        _request(va, extensions=[_ext("1.2.3.4", b"whatever")]),
    ):
        got = parse_request(data, 4096)
        assert isinstance(got, OcspRequest) and got.nonce is None
        resp = ocsp.load_der_ocsp_response(responder.respond(data))
        assert resp.certificate_status == ocsp.OCSPCertStatus.GOOD


def test_internal_error_is_ours_and_logged_once_per_cause(
    va: Va, responder: OcspResponder, caplog: pytest.LogCaptureFixture
) -> None:
    """A real fault of our own (the journal is gone): internalError, one ERROR line for five requests."""
    caplog.set_level(logging.INFO, logger="appliance.va.ocsp")
    requests = [va.request("SN-0002", nonce=bytes([i]) * 16) for i in range(5)]
    va.journal.close()
    answers = [responder.answer(r) for r in requests]
    assert all(a is INTERNAL_ERROR for a in answers) and responder.errors == 5
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "internal error" in errors[0].getMessage()
