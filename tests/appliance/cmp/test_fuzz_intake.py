"""The CSR intake invariant through the CMP front end (issue 10, item 1): p10cr with mutated CSRs and ir with
mutated public keys get a certificate or a CMP refusal whose failInfo is not systemFailure (a device's bad input
is never the appliance's failure), and the next good request still issues. Real CmpResponder, real IssueService
with a worker process, SoftHSM token, journal."""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID

from appliance import der
from appliance.audit.log import AuditLog
from appliance.ca import CaRecord
from appliance.cmp import (
    BodyType,
    CertRepBody,
    CertTemplate,
    ErrorBody,
    FailInfo,
    MacProtector,
    P10crBody,
    PKIStatus,
    build_message,
    parse_message,
    request_header,
)
from appliance.cmp.build import encode_cert_request
from appliance.cmp.model import CertReqBody, CertReqMessage, PopKind
from appliance.cmp.protection import sign_data
from appliance.cmp.server import CmpLabel, CmpResponder
from appliance.issuance.journal import Journal
from appliance.issuance.service import IssueService
from bench import csrfuzz
from hsm.token import Token

SECRET = b"fuzz label secret"
SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo


def _subject(serial: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])


def _seeds() -> list[csrfuzz.Seed]:
    """Valid CSRs whose subject names a device serial (CMP takes it from there), one per key type."""
    rng = random.Random("cmp-seeds")
    p256, p384 = csrfuzz.ec_key(ec.SECP256R1(), rng), csrfuzz.ec_key(ec.SECP384R1(), rng)
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    rsa2048 = csrfuzz.rsa_key(csrfuzz.rsa_primes(2048, rng))
    out = []
    for name, key, h, sign, alg in (
        ("ec-p256", p256, hashes.SHA256(), csrfuzz.ecdsa(p256, hashes.SHA256()), csrfuzz._ECDSA_SHA256),
        ("ec-p384", p384, hashes.SHA384(), csrfuzz.ecdsa(p384, hashes.SHA384()), csrfuzz._ECDSA_SHA384),
        ("ed25519", ed, None, ed.sign, csrfuzz._ED25519),
        ("rsa-2048", rsa2048, hashes.SHA256(), csrfuzz.pkcs1(rsa2048, hashes.SHA256()), csrfuzz._SHA256_RSA),
    ):
        builder = x509.CertificateSigningRequestBuilder().subject_name(_subject(f"SN-CMP-{name}"))
        kw = {"ecdsa_deterministic": True} if isinstance(key, ec.EllipticCurvePrivateKey) else {}
        der = builder.sign(key, h, **kw).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]
        out.append(csrfuzz.Seed(name, der, csrfuzz.ISSUED, sign, alg))
    return out


@pytest.fixture
async def responder(journal: Journal, issuing: CaRecord, hsm_token: Token) -> AsyncIterator[CmpResponder]:
    journal.call(journal.transaction, lambda conn: conn.execute(
        "INSERT INTO stations (name, kind, key, created_at) VALUES ('fuzz-cmp', 'lan', ?, ?)",
        (bytes(32), time.time())), "test station")  # fmt: skip
    service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), {"fuzz": csrfuzz.PROFILE},
                           default_profile="fuzz", prepare_workers=1)  # fmt: skip
    async with service:
        yield CmpResponder(
            service, journal, AuditLog(journal), {"fuzz": CmpLabel("fuzz", "fuzz-cmp", secret=SECRET)}
        )
        assert service.prepare_stats["deaths"] == 0


def _mac() -> MacProtector:
    return MacProtector(SECRET, b"fuzz", iterations=500)


def _header(serial: str) -> object:
    return request_header(
        sender=x509.DirectoryName(_subject(serial)), recipient=x509.DirectoryName(_subject("x"))
    )


async def _answer(responder: CmpResponder, der: bytes) -> tuple[str, frozenset[FailInfo]]:
    status, answer = await responder.handle("fuzz", der)
    msg = parse_message(answer)
    if isinstance(msg.body, ErrorBody):
        return "error", msg.body.status.fail_info
    assert isinstance(msg.body, CertRepBody), msg.body_type
    (response,) = msg.body.responses
    if response.status.status is PKIStatus.ACCEPTED:
        assert response.certificate is not None and status == 200
        return "certificate", frozenset()
    return "rejection", response.status.fail_info


async def _good_still_issues(responder: CmpResponder, n: int) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(_subject(f"SN-GOOD-{n}"))
        .sign(key, hashes.SHA256())
    )
    header = _header(f"SN-GOOD-{n}")
    got = await _answer(
        responder, build_message(header, BodyType.P10CR, P10crBody(csr), protection=_mac()).der
    )  # type: ignore[arg-type]
    assert got[0] == "certificate", got


async def test_p10cr_with_mutated_csrs(responder: CmpResponder) -> None:
    seeds = _seeds()
    mutator = csrfuzz.Mutator(seeds, random.Random("cmp-p10cr-1"))
    outcomes: Counter[str] = Counter()
    sent = 0
    while sent < 120:
        kind, _, data = mutator.next()
        try:
            csr = x509.load_der_x509_csr(
                data
            )  # what cryptography cannot load, parse_message refuses (tested there)
        except Exception:  # noqa: BLE001, S112
            continue
        sent += 1
        header = _header("SN-CMP")
        msg = build_message(header, BodyType.P10CR, P10crBody(csr), protection=_mac())  # type: ignore[arg-type]
        result, bits = await _answer(responder, msg.der)
        assert FailInfo.SYSTEM_FAILURE not in bits, (kind, data.hex())
        outcomes[result if not bits else min(bits).name] += 1
        if sent % 20 == 0:
            await _good_still_issues(responder, sent)
    assert outcomes["certificate"] and len(outcomes) > 2, outcomes


def _ir(serial: str, spki: bytes, pop_key: ec.EllipticCurvePrivateKey) -> bytes:
    """An ir whose template carries `spki` (as received: no re-encoding), with the POP signed by `pop_key`."""
    template = CertTemplate(subject=_subject(serial), public_key_der=spki)
    request_der = encode_cert_request(0, template)
    alg, signature = sign_data(pop_key, request_der)
    request = CertReqMessage(0, template, PopKind.SIGNATURE, alg, signature, False, (), request_der)
    return build_message(_header(serial), BodyType.IR, CertReqBody((request,)), protection=_mac()).der  # type: ignore[arg-type]


async def test_ir_with_mutated_public_keys(responder: CmpResponder) -> None:
    """Mutated SubjectPublicKeyInfos in the template with the POP signed by the device's real key (badPOP unless
    the bytes still load as that key), and the device's own key spelt with explicit curve parameters (the POP
    verifies, so the core's key policy refuses it: badCertTemplate): a CMP refusal, never a systemFailure."""
    rng = random.Random("cmp-ir-1")
    keys = [csrfuzz.ec_key(ec.SECP256R1(), rng) for _ in range(4)]
    spki_seeds = [
        csrfuzz.Seed(f"spki-{i}", k.public_key().public_bytes(*SPKI), csrfuzz.ISSUED)
        for i, k in enumerate(keys)
    ]
    extra = csrfuzz.interesting_spkis([])
    mutator = csrfuzz.Mutator(spki_seeds, rng, extra)
    outcomes: Counter[str] = Counter()
    for n in range(120):
        i = rng.randrange(len(keys))
        if n % 4 == 0:
            point = (
                keys[i]
                .public_key()
                .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
            )
            spki = der.sequence(
                der.sequence(der.oid("1.2.840.10045.2.1"), csrfuzz._explicit_p256_params()),
                der.bit_string(point),
            )
        elif n % 4 == 1:
            spki = rng.choice(extra)
        else:
            _, spki = mutator.derive(spki_seeds[i], [rng.choice(csrfuzz.Mutator.OPS)], resign=False)
        result, bits = await _answer(responder, _ir(f"SN-IR-{n}", spki, keys[i]))
        assert FailInfo.SYSTEM_FAILURE not in bits, spki.hex()
        if n % 4 == 0:
            assert bits == {FailInfo.BAD_CERT_TEMPLATE}, (result, bits)
        outcomes[result if not bits else min(bits).name] += 1
        if n % 20 == 19:
            await _good_still_issues(responder, 1000 + n)
    assert {"BAD_POP", "BAD_CERT_TEMPLATE", "BAD_DATA_FORMAT"} <= set(outcomes), outcomes
