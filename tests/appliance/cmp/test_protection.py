"""MAC and signature protection, verified over the bytes received; hostile MAC parameters refused early."""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from pyasn1.codec.der import decoder, encoder
from pyasn1_alt_modules import rfc9480

from appliance.cmp import (
    AlgorithmIdentifier,
    BodyType,
    CmpError,
    FailInfo,
    MacPolicy,
    MacProtector,
    PkiConfBody,
    PKIMessage,
    ProtectionKind,
    SignatureProtector,
    _der,
    build_message,
    check_header,
    oids,
    parse_message,
    verify_mac,
    verify_protection,
    verify_signature,
)
from appliance.cmp.build import build_messages, with_protection
from appliance.cmp.protection import compute_mac, pbm_parameters, pbmac1_parameters
from hsm.algorithms import KeyAlgorithm
from hsm.token import Token
from tests.appliance.cmp.support import KID, SECRET, MiniCa, ir_body, ir_header, name
from tests.cpu import cpu_budget

PBM = MacProtector(SECRET, KID, iterations=500)
PBMAC1 = MacProtector(SECRET, KID, kind=ProtectionKind.PBMAC1, iterations=1000)


def _fail_info(exc: pytest.ExceptionInfo[CmpError]) -> FailInfo:
    return exc.value.fail_info


@pytest.mark.parametrize("protector", [PBM, PBMAC1], ids=["pbm", "pbmac1"])
def test_mac_round_trip_and_wrong_secret(protector: MacProtector) -> None:
    msg = parse_message(build_message(ir_header(), BodyType.IR, ir_body(), protection=protector).der)
    assert msg.header.sender_kid == KID
    verify_mac(msg, SECRET)
    with pytest.raises(CmpError) as err:
        verify_mac(msg, b"wrong secret")
    assert _fail_info(err) is FailInfo.BAD_MESSAGE_CHECK


def test_fresh_salt_per_message() -> None:
    a = build_message(ir_header(), BodyType.PKICONF, PkiConfBody(), protection=PBM)
    b = build_message(ir_header(), BodyType.PKICONF, PkiConfBody(), protection=PBM)
    assert a.header.protection_alg != b.header.protection_alg


def _with_alg(alg: AlgorithmIdentifier, protection: bytes = b"\x00" * 32) -> PKIMessage:
    unprotected = build_message(
        replace(ir_header(sender_kid=KID), protection_alg=alg), BodyType.IR, ir_body()
    )
    return parse_message(with_protection(unprotected, protection).der)


@pytest.mark.parametrize(
    ("params", "text"),
    [
        (pbm_parameters(b"s" * 16, 0), "iteration count 0"),
        (pbm_parameters(b"s" * 16, -5), "iteration count -5"),
        (pbm_parameters(b"s" * 16, 1_000_000_000), "iteration count 1000000000"),
        (pbm_parameters(b"salt", 500), "salt of 4 bytes"),
        (pbm_parameters(b"s" * 16, 500, owf=oids.SHA1), "SHA-1"),
        (pbm_parameters(b"s" * 16, 500, mac=oids.HMAC_SHA1), "SHA-1"),
        (pbm_parameters(b"s" * 16, 500, mac="1.2.3.4"), "not supported"),
        (_der.integer(5), "not a DER PBMParameter"),
        (pbmac1_parameters(b"s" * 16, 500), "not a DER PBMParameter"),
        (_der.octet_string(b"x"), "not a DER PBMParameter"),
        (None, "missing"),
    ],
)
def test_hostile_pbm_parameters_are_refused_before_any_work(params: bytes | None, text: str) -> None:
    msg = _with_alg(AlgorithmIdentifier(oids.PASSWORD_BASED_MAC, params))
    with cpu_budget(0.5), pytest.raises(CmpError) as err:
        verify_mac(msg, SECRET)
    assert _fail_info(err) is FailInfo.BAD_ALG and text in err.value.message


@pytest.mark.parametrize(
    "params",
    [pbmac1_parameters(b"s" * 16, 1_000_000_000), pbmac1_parameters(b"short", 1000),
     pbmac1_parameters(b"s" * 16, 1000, key_length=4), pbm_parameters(b"s" * 16, 500), _der.null()],
)  # fmt: skip
def test_hostile_pbmac1_parameters(params: bytes) -> None:
    with pytest.raises(CmpError) as err:
        verify_mac(_with_alg(AlgorithmIdentifier(oids.PBMAC1, params)), SECRET)
    assert _fail_info(err) is FailInfo.BAD_ALG


def test_pbmac1_zero_iterations() -> None:
    with pytest.raises(CmpError) as err:
        verify_mac(_with_alg(AlgorithmIdentifier(oids.PBMAC1, pbmac1_parameters(b"s" * 16, 0))), SECRET)
    assert _fail_info(err) is FailInfo.BAD_ALG


def test_sha1_only_when_the_policy_allows_it() -> None:
    alg = AlgorithmIdentifier(oids.PASSWORD_BASED_MAC, pbm_parameters(b"s" * 16, 500, mac=oids.HMAC_SHA1))
    unprotected = build_message(
        replace(ir_header(sender_kid=KID), protection_alg=alg), BodyType.IR, ir_body()
    )
    legacy = MacPolicy(allow_sha1=True)
    msg = parse_message(
        with_protection(unprotected, compute_mac(alg, SECRET, unprotected.protected_part, legacy)).der
    )
    verify_mac(msg, SECRET, policy=legacy)
    with pytest.raises(CmpError):
        verify_mac(msg, SECRET)


def test_unknown_protection_algorithm_and_missing_protection() -> None:
    with pytest.raises(CmpError) as err:
        verify_mac(_with_alg(AlgorithmIdentifier("1.2.840.113533.7.66.30")), SECRET)  # DHBasedMac
    assert _fail_info(err) is FailInfo.BAD_ALG
    unprotected = parse_message(build_message(ir_header(), BodyType.IR, ir_body()).der)
    for call in (lambda: verify_mac(unprotected, SECRET), lambda: verify_protection(unprotected)):
        with pytest.raises(CmpError) as err:
            call()
        assert _fail_info(err) is FailInfo.BAD_MESSAGE_CHECK
    assert verify_protection(unprotected, allow_unprotected=True).kind is ProtectionKind.NONE
    alg_without_value = build_message(ir_header(), BodyType.IR, ir_body(), protection=PBM)
    stripped = parse_message(_der.sequence(alg_without_value.header_der, alg_without_value.body_der))
    with pytest.raises(CmpError) as err:
        verify_mac(stripped, SECRET)
    assert "missing" in err.value.message


def test_verify_protection_by_kid() -> None:
    msg = parse_message(build_message(ir_header(), BodyType.IR, ir_body(), protection=PBM).der)
    secrets = {KID: SECRET}
    assert verify_protection(msg, secret_for=secrets.get).kind is ProtectionKind.PBM
    with pytest.raises(CmpError) as err:
        verify_protection(msg, secret_for={b"other": SECRET}.get)
    assert _fail_info(err) is FailInfo.BAD_MESSAGE_CHECK and "does not verify" in err.value.message
    with pytest.raises(CmpError):
        verify_protection(msg)  # no MAC configured


def _swap_kid_for_non_minimal(msg: PKIMessage) -> bytes:
    """The same header, but senderKID's OCTET STRING with a long-form length (BER, not DER)."""
    header = msg.header_der
    top = _der.read_frame(header, 0, len(header))
    parts = []
    for child in _der.children(header, top):
        raw = header[child.start : child.end]
        if child.tag == 0xA2:
            raw = _der.tlv(0xA2, b"\x04\x81" + bytes((len(KID),)) + KID)
        parts.append(raw)
    return _der.sequence(*parts)


def test_protection_is_checked_over_the_bytes_received_not_a_re_encoding() -> None:
    built = build_message(ir_header(), BodyType.IR, ir_body(), protection=PBM)
    odd_header = _swap_kid_for_non_minimal(built)
    assert built.header.protection_alg is not None
    mac = compute_mac(built.header.protection_alg, SECRET, _der.sequence(odd_header, built.body_der))
    wire = _der.sequence(odd_header, built.body_der, _der.context_cons(0, _der.bit_string(mac)))
    msg = parse_message(wire)
    assert msg.header_der == odd_header and msg.header.sender_kid == KID
    # pyasn1 reads it fine but re-encodes it differently: verifying over a re-encoding would fail.
    header, _ = decoder.decode(odd_header, asn1Spec=rfc9480.PKIHeader())
    assert encoder.encode(header) != odd_header
    verify_mac(msg, SECRET)
    # One flipped byte of the received header (inside senderNonce) and it no longer verifies.
    nonce_at = wire.index(msg.header.sender_nonce)  # type: ignore[arg-type]
    tampered = wire[:nonce_at] + bytes((wire[nonce_at] ^ 1,)) + wire[nonce_at + 1 :]
    with pytest.raises(CmpError) as err:
        verify_mac(parse_message(tampered), SECRET)
    assert _fail_info(err) is FailInfo.BAD_MESSAGE_CHECK


@pytest.mark.parametrize(
    "make_key",
    [lambda: ec.generate_private_key(ec.SECP256R1()), lambda: ec.generate_private_key(ec.SECP384R1()),
     lambda: rsa.generate_private_key(65537, 2048), ed25519.Ed25519PrivateKey.generate],
    ids=["p256", "p384", "rsa", "ed25519"],
)  # fmt: skip
def test_signature_protection(make_key: object) -> None:
    ca = MiniCa()
    key = make_key()  # type: ignore[operator]
    cert = ca.issue(name("ra"), key.public_key())
    protector = SignatureProtector(key, cert, (ca.cert,))
    header = replace(ir_header(), sender=x509.DirectoryName(cert.subject))
    msg = parse_message(build_message(header, BodyType.IR, ir_body(), protection=protector).der)
    assert msg.extra_certs == (cert, ca.cert)
    assert verify_signature(msg) == cert
    assert verify_protection(msg).signer == cert
    check_header(msg)
    assert msg.header.sender_nonce is not None
    tampered = parse_message(msg.der.replace(msg.header.sender_nonce, bytes(16)))
    with pytest.raises(CmpError) as err:
        verify_signature(tampered)
    assert _fail_info(err) is FailInfo.BAD_MESSAGE_CHECK
    with pytest.raises(CmpError):
        verify_signature(msg, ca.cert)  # not the signer


def test_signature_sender_must_be_the_signer() -> None:
    ca = MiniCa()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.issue(name("ra"), key.public_key())
    msg = parse_message(
        build_message(ir_header(), BodyType.IR, ir_body(), protection=SignatureProtector(key, cert)).der
    )
    verify_signature(msg)
    with pytest.raises(CmpError) as err:
        check_header(msg)
    assert _fail_info(err) is FailInfo.BAD_MESSAGE_CHECK


@pytest.mark.parametrize("algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.RSA_2048, KeyAlgorithm.ED25519])
def test_signature_protection_with_an_hsm_key(hsm_token: Token, algorithm: KeyAlgorithm) -> None:
    label = f"cmp-ra-{algorithm.value}"
    key = hsm_token.get_key(label) if hsm_token.has_key(label) else hsm_token.generate_key(label, algorithm)
    ca = MiniCa()
    cert = ca.issue(name("RA in the HSM"), key.public_key())
    header = replace(ir_header(), sender=x509.DirectoryName(cert.subject))
    nested = build_message(header, BodyType.IR, ir_body(), protection=SignatureProtector(key, cert))
    msg = parse_message(nested.der)
    assert verify_signature(msg) == cert
    check_header(msg)


@pytest.mark.parametrize(
    "algorithm", [KeyAlgorithm.EC_P256, KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_2048, KeyAlgorithm.ED25519]
)
def test_messages_signed_together_in_the_hsm_each_verify(hsm_token: Token, algorithm: KeyAlgorithm) -> None:
    """build_messages signs a batch in one HSM call (sign_many): every message must carry its own signature,
    made with the hash its protectionAlg names, exactly as if it had been signed alone."""
    label = f"cmp-ra-many-{algorithm.value}"
    key = hsm_token.get_key(label) if hsm_token.has_key(label) else hsm_token.generate_key(label, algorithm)
    ca = MiniCa()
    cert = ca.issue(name("RA in the HSM"), key.public_key())
    protector = SignatureProtector(key, cert, (ca.cert,))
    header = replace(ir_header(), sender=x509.DirectoryName(cert.subject))
    specs = [(replace(header, transaction_id=bytes([i]) * 16), BodyType.IR, ir_body()) for i in range(5)]
    built = build_messages(specs, protection=protector)
    assert len({m.protection for m in built}) == 5
    for i, m in enumerate(built):
        msg = parse_message(m.der)
        assert msg.header.transaction_id == bytes([i]) * 16 and msg.extra_certs == (cert, ca.cert)
        assert verify_signature(msg) == cert
    swapped = parse_message(with_protection(built[0], built[1].protection or b"", built[0].extra_certs).der)
    with pytest.raises(CmpError):
        verify_signature(swapped)
    with pytest.raises(ValueError, match="protection_alg"):
        protector.protect_many([ir_header()], [b"part"])  # a header that names no (or another) algorithm
