"""What a peer without credentials can make the CMP server spend (docs/cmp.md "Unauthenticated peers"):

- a MAC check costs at most `max_iterations` hash rounds (10,000 by default), refused above that before any
  derivation, and PBM is derived by libcrypto (outside the GIL), exactly as the Python reference does;
- a signature is verified only with a key the signer policy accepts (a 3,070-bit RSA exponent made one check
  cost 100 times more);
- building a signer's chain from the peer's extraCerts is not an exhaustive search (12 look-alike certificates
  that all sign each other took 6.6 s of CPU on the event loop, 15 took 35 s);
- every request of a network peer takes one unit of its budget and of the shared one before any work, given back
  when it authenticates (appliance/admission.py);
- refusals are counted and logged once per cause and minute, not once per request.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hmac
import logging
import os
import random

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes, PublicKeyTypes
from cryptography.x509.oid import NameOID

from appliance.admission import Admission, AdmissionLimits, Busy
from appliance.cmp import (
    AlgorithmIdentifier,
    BodyType,
    CmpError,
    ErrorBody,
    FailInfo,
    MacProtector,
    P10crBody,
    PkiConfBody,
    _pbm,
    build_message,
    oids,
    parse_message,
    request_header,
)
from appliance.cmp.protection import (
    DEFAULT_MAC_POLICY,
    MacPolicy,
    ProtectionKind,
    SignatureProtector,
    compute_mac,
    pbm_parameters,
    pbmac1_parameters,
    verify_protection,
)
from appliance.cmp.trust import SignerTrust
from tests.appliance.cmp.test_server import Srv, _ir, _post, srv  # noqa: F401 - srv is the fixture
from tests.cpu import cpu_budget

NOW = dt.datetime.now(dt.UTC)


def _name(text: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, text)])


def _cert(subject: str, issuer: str, key: PublicKeyTypes, signer: CertificateIssuerPrivateKeyTypes, *,
          ca: bool = True) -> x509.Certificate:  # fmt: skip
    return (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer))
            .public_key(key).serial_number(x509.random_serial_number())  # type: ignore[arg-type]
            .not_valid_before(NOW - dt.timedelta(days=1)).not_valid_after(NOW + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key), critical=False)  # type: ignore[arg-type]
            .sign(signer, None if isinstance(signer, ed25519.Ed25519PrivateKey) else hashes.SHA256()))  # fmt: skip


def _p10cr(protection: object) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0001")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    header = request_header(sender=x509.DirectoryName(subject), recipient=x509.DirectoryName(_name("x")))
    return build_message(header, BodyType.P10CR, P10crBody(csr), protection=protection).der  # type: ignore[arg-type]


# -- MAC ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("iterations", [10_001, 100_000])
def test_pbm_iterations_above_the_cap_are_refused_before_any_derivation(iterations: int) -> None:
    for alg in (AlgorithmIdentifier(oids.PASSWORD_BASED_MAC, pbm_parameters(os.urandom(16), iterations)),
                AlgorithmIdentifier(oids.PBMAC1, pbmac1_parameters(os.urandom(16), iterations))):  # fmt: skip
        with cpu_budget(0.05), pytest.raises(CmpError) as info:
            compute_mac(alg, b"secret", b"data")
        assert info.value.fail_info is FailInfo.BAD_ALG and "10000 accepted" in info.value.message
    assert DEFAULT_MAC_POLICY.max_iterations == 10_000
    # A server may allow more ([cmp] max_mac_iterations); then the message is derived as before.
    alg = AlgorithmIdentifier(oids.PASSWORD_BASED_MAC, pbm_parameters(os.urandom(16), iterations))
    assert len(compute_mac(alg, b"secret", b"data", MacPolicy(max_iterations=100_000))) == 32


_OWF = {"sha256": oids.SHA256, "sha384": oids.SHA384, "sha512": oids.SHA512}
_MAC = {"sha256": oids.HMAC_WITH_SHA256, "sha384": oids.HMAC_WITH_SHA384, "sha512": oids.HMAC_WITH_SHA512,
        "sha1": oids.HMAC_WITH_SHA1}  # fmt: skip


def test_pbm_is_computed_by_libcrypto_and_equals_the_python_reference(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """On the appliance (OpenSSL 3) PBM is derived by libcrypto through ctypes, which releases the GIL for the
    call; it must give exactly the MAC the Python reference gives, for every OWF and MAC accepted."""
    native = _pbm.native()
    assert native is not None, "libcrypto's OSSL_CRMF_pbm_new is not usable: PBM would hold the GIL"
    rng = random.Random(7)
    policy = MacPolicy(allow_sha1=True)
    for owf, owf_oid in _OWF.items():
        for mac, mac_oid in _MAC.items():
            salt, secret = rng.randbytes(rng.randint(8, 64)), rng.randbytes(rng.randint(1, 40))
            data, iterations = rng.randbytes(rng.randint(0, 3000)), rng.randint(100, 3000)
            alg = AlgorithmIdentifier(
                oids.PASSWORD_BASED_MAC, pbm_parameters(salt, iterations, owf_oid, mac_oid)
            )
            expected = hmac.new(_pbm.python_pbm_key(owf, secret, salt, iterations), data, mac).digest()
            assert native(alg.parameters or b"", secret, data) == expected, (owf, mac)
            assert compute_mac(alg, secret, data, policy) == expected, (owf, mac)
    # Where libcrypto is not usable the same MAC comes from Python.
    alg = AlgorithmIdentifier(oids.PASSWORD_BASED_MAC, pbm_parameters(b"s" * 16, 500))
    with_native = compute_mac(alg, b"k", b"d")
    monkeypatch.setattr(_pbm, "native", lambda: None)
    assert compute_mac(alg, b"k", b"d") == with_native
    # what this appliance sends verifies with either
    message = build_message(request_header(sender=x509.DirectoryName(_name("a")), recipient=x509.DirectoryName(
        _name("b"))), BodyType.PKICONF, PkiConfBody(), protection=MacProtector(b"k", b"kid"))  # fmt: skip
    monkeypatch.undo()
    parsed = parse_message(message.der)
    assert verify_protection(parsed, secret_for=lambda kid: b"k").kind is ProtectionKind.PBM


# -- signatures ---------------------------------------------------------------------------------------------------
def _huge_exponent_rsa() -> rsa.RSAPrivateKey:
    """RSA-3072 with a 3,070-bit public exponent (a valid key; one verification costs ~100x one with 65537)."""
    base = rsa.generate_private_key(65537, 3072).private_numbers()
    p, q = base.p, base.q
    phi = (p - 1) * (q - 1)
    rng = random.Random(3)
    while True:
        e = rng.getrandbits(3070) | (1 << 3069) | 1
        try:
            d = pow(e, -1, phi)
        except ValueError:
            continue
        return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p),
                                     rsa.RSAPublicNumbers(e, p * q)).private_key(unsafe_skip_rsa_key_validation=True)  # fmt: skip


def _signed(key: CertificateIssuerPrivateKeyTypes) -> bytes:
    cert = _cert("signer", "signer", key.public_key(), key, ca=False)
    return _p10cr(SignatureProtector(key, cert))


def test_a_signer_key_the_policy_would_not_accept_is_refused_before_verifying() -> None:
    refused = {
        "RSA-3072, 3070-bit exponent": _huge_exponent_rsa(),
        "RSA-1024": rsa.generate_private_key(65537, 1024),  # noqa: S505 - the point: a key the policy refuses
        "RSA-2048, exponent 3": rsa.generate_private_key(3, 2048),
        "EC P-224": ec.generate_private_key(ec.SECP224R1()),
        "EC secp256k1": ec.generate_private_key(ec.SECP256K1()),
    }
    for what, key in refused.items():
        message = parse_message(_signed(key))
        with cpu_budget(0.05), pytest.raises(CmpError) as info:
            verify_protection(message)
        assert (
            info.value.fail_info is FailInfo.BAD_ALG and "signer's key is not accepted" in info.value.message
        ), what
    accepted = [rsa.generate_private_key(65537, 2048), ec.generate_private_key(ec.SECP256R1()),
                ec.generate_private_key(ec.SECP521R1()), ed25519.Ed25519PrivateKey.generate()]  # fmt: skip
    for key in accepted:
        assert verify_protection(parse_message(_signed(key))).kind is ProtectionKind.SIGNATURE


def test_a_chain_of_look_alike_certificates_is_not_searched_exhaustively() -> None:
    """Twelve CA certificates sharing one name and key each sign all the others: every ordering is a candidate
    path to nowhere. The search stops within a bounded number of links; a real chain is still found beside
    look-alikes that do not verify."""
    trust = SignerTrust(journal=None, issuing_cas={})  # type: ignore[arg-type] - chain() reads no journal
    anchor_key = ec.generate_private_key(ec.SECP256R1())
    anchor = _cert("Anchor", "Anchor", anchor_key.public_key(), anchor_key)
    key = ec.generate_private_key(ec.SECP256R1())
    same = [_cert("N", "N", key.public_key(), key) for _ in range(12)]
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    signer = _cert("S", "N", leaf_key.public_key(), key, ca=False)
    with cpu_budget(0.5):
        assert trust.chain(signer, same, [anchor]) is None
    # a real chain: signer <- intermediate "N" (issued by the anchor), behind ten "N" that do not verify
    intermediate = _cert("N", "Anchor", key.public_key(), anchor_key)
    others = [
        _cert("N", "N", k.public_key(), k)
        for k in (ec.generate_private_key(ec.SECP256R1()) for _ in range(10))
    ]
    with cpu_budget(0.5):
        assert trust.chain(signer, [*others, intermediate], [anchor]) == (intermediate, anchor)
    # an intermediate whose key the signer policy refuses is no link
    weak = rsa.generate_private_key(65537, 1024)  # noqa: S505 - the point: a key the policy refuses
    weak_ca = _cert("W", "Anchor", weak.public_key(), anchor_key)
    assert trust.chain(_cert("S2", "W", leaf_key.public_key(), weak, ca=False), [weak_ca], [anchor]) is None


# -- admission ----------------------------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_each_peer_has_a_budget_given_back_when_its_request_authenticates() -> None:
    clock = Clock()
    adm = Admission(AdmissionLimits(check_rate_per_client=1, check_burst_per_client=3, check_rate_total=1000,
                                    check_burst_total=1000, pace_max_delay_s=0), clock=clock)  # fmt: skip
    tickets = [await adm.admit("192.0.2.1") for _ in range(3)]
    with pytest.raises(Busy) as info:
        await adm.admit("192.0.2.1")
    assert info.value.scope == "client" and info.value.retry_after_s >= 1
    assert (await adm.admit("192.0.2.2")).peer == "192.0.2.2"  # another peer has its own budget
    adm.authenticated(tickets[0])  # given back: the peer proved a credential
    adm.authenticated(tickets[0])  # once
    await adm.admit("192.0.2.1")
    with pytest.raises(Busy):
        await adm.admit("192.0.2.1")
    clock.now += 1.0  # one more per second
    await adm.admit("192.0.2.1")
    assert adm.stats == {"admitted": 6, "paced": 0, "busy_client": 2, "busy_total": 0, "authenticated": 1}


async def test_the_shared_budget_bounds_all_peers_and_spares_peers_known_to_authenticate() -> None:
    clock = Clock()
    adm = Admission(AdmissionLimits(check_rate_per_client=100, check_burst_per_client=100, check_rate_total=1,
                                    check_burst_total=4, pace_max_delay_s=0), clock=clock)  # fmt: skip
    known = await adm.admit("192.0.2.200")
    adm.authenticated(known)
    for i in range(4):
        await adm.admit(f"192.0.2.{i}")
    with pytest.raises(Busy) as info:
        await adm.admit("192.0.2.99")  # a new peer: the shared budget is spent
    assert info.value.scope == "total"
    assert (await adm.admit("192.0.2.200")).shared is False  # a peer that authenticated does not need it
    clock.now += 601  # ... for known_client_s; then it spends the shared budget like any peer
    for i in range(4):
        await adm.admit(f"192.0.2.{10 + i}")
    with pytest.raises(Busy):
        await adm.admit("192.0.2.200")
    # IPv6: a /64 is one client
    adm6 = Admission(AdmissionLimits(check_burst_per_client=2, pace_max_delay_s=0), clock=clock)
    await adm6.admit("2001:db8::1")
    await adm6.admit("2001:db8::2")
    with pytest.raises(Busy):
        await adm6.admit("2001:db8::3")


async def test_a_peer_over_its_budget_is_paced_then_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock.now += seconds

    monkeypatch.setattr(asyncio, "sleep", sleep)
    adm = Admission(AdmissionLimits(check_rate_per_client=2, check_burst_per_client=1, pace_max_delay_s=1.0),
                    clock=clock)  # fmt: skip
    await adm.admit("192.0.2.1")
    assert slept == []
    await adm.admit("192.0.2.1")  # held until within its rate (2/s: 0.5 s)
    assert slept == [0.5]
    await adm.admit("192.0.2.1")
    assert slept == [0.5, 0.5]
    clock.now -= 1.5  # as if three more arrived at once: the wait would exceed pace_max_delay_s
    with pytest.raises(Busy):
        await adm.admit("192.0.2.1")
    assert slept[-1] == 1.0  # held the longest pace, then refused
    assert adm.stats["paced"] == 2 and adm.stats["busy_client"] == 1


# -- refusals: counted, logged once --------------------------------------------------------------------------------
REQUESTS = 30


async def test_refusals_are_counted_and_logged_once_per_cause(
    srv: Srv,  # noqa: F811 - the fixture imported above
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="appliance.cmp"):
        for i in range(REQUESTS):
            status, body = await srv.responder.handle("line1", _ir(f"SN-00{40 + i}", secret=b"wrong").der)
            answer = parse_message(body)
            assert status == 200 and isinstance(answer.body, ErrorBody)
            assert answer.body.status.fail_info == {FailInfo.BAD_MESSAGE_CHECK}
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 1 and "MAC protection does not verify" in lines[0], lines
    assert srv.responder.refusals == {("line1", "ir", "BAD_MESSAGE_CHECK"): REQUESTS}
    assert srv.responder.stats["errors"] == REQUESTS
    snapshot = srv.responder.snapshot()
    assert snapshot["refused"] == [{"label": "line1", "body": "ir", "fail_info": "BAD_MESSAGE_CHECK",
                                    "count": REQUESTS}]  # fmt: skip


async def test_a_peer_that_goes_away_mid_request_leaves_no_traceback(
    srv: Srv,  # noqa: F811 - the fixture imported above
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A request whose peer closes before its body is in (say while the request was held to its budget) is
    dropped quietly: the peer's doing, and one traceback per request would let it fill the log."""
    with caplog.at_level(logging.INFO):
        for _ in range(3):
            _, w = await asyncio.open_connection("127.0.0.1", srv.port)
            w.write(b"POST /.well-known/cmp/p/line1 HTTP/1.1\r\nHost: x\r\nContent-Type: application/pkixcmp\r\n"
                    b"Content-Length: 1000\r\n\r\n" + b"0" * 10)  # fmt: skip
            await w.drain()
            w.close()
            await w.wait_closed()
        # the server has dealt with them once it answers the next request on the same loop
        status, _ = await _post(srv, _ir("SN-0077").der)
        assert status == 200
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert noisy == [], [r.getMessage() for r in noisy]
