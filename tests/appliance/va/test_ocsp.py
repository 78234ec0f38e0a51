"""The OCSP responder: statuses, the delegated signer, nonces, the cache, and every bad input answered."""

from __future__ import annotations

import asyncio
import datetime as dt
import random
import sqlite3
import time

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.ca import load_ca
from appliance.va import answers
from appliance.va import revocation as rv
from appliance.va.ocsp import EXTENDED_REVOKE_OID, OcspResponder
from appliance.va.signer import ensure_signer
from appliance.va.status import CertStatus
from tests.appliance.va.conftest import Va, audit_events

S = ocsp.OCSPResponseStatus
C = ocsp.OCSPCertStatus


@pytest.fixture
def responder(va: Va) -> OcspResponder:
    r = OcspResponder(va.journal, va.token, va.audit)
    r.load()
    return r


def parse(der: bytes) -> ocsp.OCSPResponse:
    return ocsp.load_der_ocsp_response(der)


def verify(va: Va, responder: OcspResponder, resp: ocsp.OCSPResponse) -> None:
    signer = responder.signer("issuing")
    assert signer is not None
    assert resp.certificates == [signer.cert]
    signer.cert.verify_directly_issued_by(va.issuing.certificate)
    key = signer.cert.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert resp.signature_hash_algorithm is not None
    key.verify(resp.signature, resp.tbs_response_bytes, ec.ECDSA(resp.signature_hash_algorithm))


def test_delegated_signer_certificate(va: Va, responder: OcspResponder) -> None:
    signer = responder.signer("issuing")
    assert signer is not None
    cert = signer.cert
    assert cert.issuer == va.issuing.certificate.subject
    assert cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value == x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.OCSP_SIGNING]
    )
    cert.extensions.get_extension_for_class(x509.OCSPNoCheck)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert 29 <= (cert.not_valid_after_utc - cert.not_valid_before_utc).days <= 31
    assert va.token.has_key(signer.key_label)  # the key lives in the HSM
    assert "OCSP Responder" in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    assert [e for e in audit_events(va.journal, "ocsp.signer-issued")]
    # reused while valid; re-issued with a new key when it would expire within 10 days
    assert ensure_signer(va.journal, va.token, va.audit, "issuing") == signer
    later = ensure_signer(va.journal, va.token, va.audit, "issuing", clock=lambda: time.time() + 21 * 86400)
    assert later.key_label != signer.key_label and later.not_after > signer.not_after
    responder.load()
    assert responder.signer("issuing") == later


@pytest.mark.parametrize("alg", [hashes.SHA1(), hashes.SHA256()], ids=["sha1", "sha256"])  # noqa: S303
def test_good_revoked_and_unknown(va: Va, responder: OcspResponder, alg: hashes.HashAlgorithm) -> None:
    good = parse(responder.respond(va.request("SN-0001", alg)))
    assert good.response_status == S.SUCCESSFUL and good.certificate_status == C.GOOD
    assert good.serial_number == va.cert("SN-0001").serial_number and good.hash_algorithm.name == alg.name
    assert good.next_update_utc is not None
    assert (good.next_update_utc - good.this_update_utc).total_seconds() == 3600
    verify(va, responder, good)

    rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0002", reason="keyCompromise")
    rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0003", reason="unspecified")
    responder.refresh()
    revoked = parse(responder.respond(va.request("SN-0002", alg)))
    assert revoked.certificate_status == C.REVOKED
    assert revoked.revocation_reason == x509.ReasonFlags.key_compromise
    stored = rv.get_revocation(va.journal, va.serial("SN-0002"))
    assert stored is not None and revoked.revocation_time_utc is not None
    assert revoked.revocation_time_utc.timestamp() == int(stored.revoked_at)
    unspecified = parse(responder.respond(va.request("SN-0003", alg)))
    assert unspecified.certificate_status == C.REVOKED and unspecified.revocation_reason is None

    never = parse(responder.respond(va.request(va.rogue_cert(0x1234567890ABCDEF1234), alg)))
    assert never.certificate_status == C.UNKNOWN
    verify(va, responder, never)


def _insert(va: Va, serial: int, state: str) -> None:
    def txn(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256, csr_sha256,"
            " cert_serial, tbs_sha256, state, created_at) VALUES ('r','st','idevid','issuing',?,?,?,?,?,?,?)",
            (f"SN-X{serial}", str(serial).encode(), b"c", format(serial, "x"), b"t", state, time.time()),
        )

    va.journal.call(va.journal.transaction, txn, "test row")


def test_burned_is_revoked_non_issued_and_intent_is_unknown_uncached(
    va: Va, responder: OcspResponder
) -> None:
    _insert(va, 0xB0B0B0B0B0B0B0B0B0, "burned")
    _insert(va, 0x1A1A1A1A1A1A1A1A1A, "intent")
    burned = parse(responder.respond(va.request(va.rogue_cert(0xB0B0B0B0B0B0B0B0B0))))
    assert burned.certificate_status == C.REVOKED
    assert burned.revocation_reason == x509.ReasonFlags.certificate_hold
    assert burned.revocation_time_utc == dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
    ext = burned.extensions.get_extension_for_oid(EXTENDED_REVOKE_OID)
    assert not ext.critical
    signed = responder.signed
    for _ in range(2):
        intent = parse(responder.respond(va.request(va.rogue_cert(0x1A1A1A1A1A1A1A1A1A))))
        assert intent.certificate_status == C.UNKNOWN
    assert responder.signed == signed + 2  # never cached: it becomes issued any moment


def test_never_issued_can_be_answered_revoked(va: Va) -> None:
    strict = OcspResponder(va.journal, va.token, va.audit, never_issued="revoked")
    strict.load()
    resp = parse(strict.respond(va.request(va.rogue_cert(0x77777777777777777777))))
    assert (
        resp.certificate_status == C.REVOKED and resp.revocation_reason == x509.ReasonFlags.certificate_hold
    )
    resp.extensions.get_extension_for_oid(EXTENDED_REVOKE_OID)
    assert parse(strict.respond(va.request("SN-0001"))).certificate_status == C.GOOD


def test_nonce_is_echoed_and_signed_fresh(va: Va, responder: OcspResponder) -> None:
    nonce = bytes(range(16))
    a = parse(responder.respond(va.request("SN-0001", nonce=nonce)))
    assert a.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == nonce
    signed = responder.signed
    b = parse(responder.respond(va.request("SN-0001", nonce=nonce)))
    assert responder.signed == signed + 1 and b.certificate_status == C.GOOD
    assert (
        parse(responder.respond(va.request("SN-0001", nonce=b"x" * 33))).response_status
        == S.MALFORMED_REQUEST
    )


def test_answers_are_cached_until_the_status_changes_or_half_life(va: Va) -> None:
    now = [time.time()]
    responder = OcspResponder(va.journal, va.token, va.audit, clock=lambda: now[0])
    responder.load()
    req = va.request("SN-0004")
    first = responder.respond(req)
    assert responder.respond(req) == first and responder.signed == 1 and responder.hits == 1
    # SHA-256 CertID is a separate answer (the CertID is echoed)
    responder.respond(va.request("SN-0004", hashes.SHA256()))
    assert responder.signed == 2
    # a revocation (here through scrap's trigger) invalidates on the next refresh
    from appliance.production import store

    store.scrap(va.journal, va.audit, va.supervisor, "SN-0004", "dropped", ca="issuing")
    assert responder.refresh() == 2
    after = parse(responder.respond(req))
    assert after.certificate_status == C.REVOKED
    assert after.revocation_reason == x509.ReasonFlags.cessation_of_operation
    signed = responder.signed
    responder.respond(req)
    assert responder.signed == signed
    now[0] += 1801  # past half of the hour: signed again
    responder.respond(req)
    assert responder.signed == signed + 1


def test_a_miss_racing_an_invalidation_is_not_cached(va: Va, responder: OcspResponder) -> None:
    real = responder._lookup

    def lookup_then_revoke(p: answers.Parsed) -> CertStatus:
        status = real(p)  # reads "good" ...
        # meanwhile another process revokes it (we are on the journal thread here) ...
        va.journal.transaction(
            lambda c: rv.revoke_in_transaction(
                c, va.audit, "sam", [(va.serial("SN-0001"), "issuing", "SN-0001")], rv.Reason.KEY_COMPROMISE,
                rv.Source.CLI, now=time.time(),
            ),
            "racing revocation",
        )  # fmt: skip
        responder._apply(responder._changes())  # ... and the poll lands before the answer is stored
        return status

    responder._lookup = lookup_then_revoke  # type: ignore[method-assign]
    assert parse(responder.respond(va.request("SN-0001"))).certificate_status == C.GOOD
    responder._lookup = real  # type: ignore[method-assign]
    assert parse(responder.respond(va.request("SN-0001"))).certificate_status == C.REVOKED


def _foreign_request() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Elsewhere CA")])
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(7).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1)).sign(key, hashes.SHA256())
    )  # fmt: skip
    return (
        ocsp.OCSPRequestBuilder()
        .add_certificate(ca, ca, hashes.SHA1())  # noqa: S303
        .build()
        .public_bytes(serialization.Encoding.DER)
    )


def test_bad_inputs_get_malformed_or_unauthorized(va: Va, responder: OcspResponder) -> None:
    good = va.request("SN-0001")
    for bad in (b"", b"\x00", b"garbage", good[:-3], good + b"\x00", b"\x30\x80\x00\x00", b"\x30" * 5000):
        assert parse(responder.respond(bad)).response_status == S.MALFORMED_REQUEST, bad[:10]
    assert parse(responder.respond(_foreign_request())).response_status == S.UNAUTHORIZED
    # the management CA is ours, but not a CA this responder answers for
    mgmt = load_ca(va.journal, "management").certificate
    req = ocsp.OCSPRequestBuilder().add_certificate(mgmt, mgmt, hashes.SHA256()).build()
    assert (
        parse(responder.respond(req.public_bytes(serialization.Encoding.DER))).response_status
        == S.UNAUTHORIZED
    )
    assert parse(responder.respond(good)).certificate_status == C.GOOD


def test_mutated_requests_never_raise(va: Va, responder: OcspResponder) -> None:
    rng = random.Random(6960)
    base = va.request("SN-0001", nonce=b"0123456789abcdef")
    statuses = set()
    for _ in range(300):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        statuses.add(parse(responder.respond(bytes(data))).response_status)
    assert statuses <= {S.SUCCESSFUL, S.MALFORMED_REQUEST, S.UNAUTHORIZED}
    assert responder.errors == 0


async def test_concurrent_misses_share_one_signature_and_overload_gets_try_later(va: Va) -> None:
    responder = OcspResponder(va.journal, va.token, va.audit)
    await asyncio.to_thread(responder.load)
    req = va.request("SN-0002")
    answers = await asyncio.gather(*(responder.aanswer(req) for _ in range(20)))
    assert len({a.der for a in answers}) == 1 and responder.signed == 1
    busy = OcspResponder(va.journal, va.token, va.audit, max_pending=0)
    await asyncio.to_thread(busy.load)
    assert parse(await busy.arespond(req)).response_status == S.TRY_LATER


def test_cache_hit_cost(va: Va, responder: OcspResponder) -> None:
    req = va.request("SN-0001")
    responder.respond(req)
    n = 2000
    t0 = time.perf_counter()
    for _ in range(n):
        responder.respond(req)
    per_hit_us = (time.perf_counter() - t0) / n * 1e6
    print(f"OCSP cache hit: {per_hit_us:.1f} us per answer (parse + lookup)")
    assert responder.signed == 1 and per_hit_us < 2000
