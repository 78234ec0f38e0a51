"""CSR intake fuzzing: seed CSRs, structure-aware and random mutations, and the intake invariant.

The invariant (issue 10, item 1): every input a device can send gets a reason code or a certificate, and the
next good request still issues. `check` tests the first half on one input in-process, through the whole
worker-side path (`Preparer.prepare`: device serial, CSR intake, builder, TBS capture); bench/fuzz_csr.py and
tests/appliance/issuance/test_csr_fuzz.py check the second half through the real IssueService with worker
processes, on a sample.

Mutations work on the DER tree of a valid seed CSR of each key type (and of some that must be refused):
version, INTEGERs (huge, negative, non-minimal), OIDs (other algorithms and curves, huge arcs, thousands of
arcs), tags (high tag numbers, constructed bit), lengths (indefinite, non-minimal, beyond the input, 2^32),
deletion, duplication, swaps, moves, nesting thousands deep, string types and contents, whole
SubjectPublicKeyInfos (explicit curves, odd RSA exponents, points off the curve) and signature algorithms;
after a mutation inside the CertificationRequestInfo the seed's key may sign it again, so the input gets past
the proof-of-possession check into the parts behind it. Byte-level mutations, PEM wrapping and plain random
bytes come on top. Everything is deterministic for a given seed (RFC 6979 ECDSA, keys derived from the seed).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import math
import pickle
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa, x25519
from cryptography.x509.oid import NameOID

from appliance import der
from appliance.errors import ReasonCode
from appliance.issuance.prepare import Job, PrepareContext, Prepared, Preparer, Refusal
from appliance.profiles import Profile
from hsm.algorithms import KeyAlgorithm

# Every key type the builder supports is allowed, so more inputs get past the key policy into what follows.
PROFILE: Final = Profile(
    name="fuzz",
    key_algorithms=frozenset({"ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096", "ed25519"}),
    hardware_module_name="1.3.6.1.4.1.99999.1.1",
    masa_url="https://masa.example.com/.well-known/brski",
)
DEVICE_SERIAL: Final = "FUZZ-0001"
MAX_CSR_BYTES: Final = 8192
NOW: Final = int(dt.datetime(2026, 3, 1, tzinfo=dt.UTC).timestamp())
ISSUED: Final = "ISSUED"

Signer = Callable[[bytes], bytes]

# -- deterministic keys ------------------------------------------------------------------------------------------
_SMALL_PRIMES: Final = [p for p in range(5, 5000, 2) if all(p % d for d in range(3, int(p**0.5) + 1, 2))]


def _prime(bits: int, rng: random.Random) -> int:
    """A probable prime p = 2 mod 3 (so 3 is a usable RSA exponent too). One Fermat test is enough here:
    OpenSSL checks the key when it is loaded, and a bad one would only make a seed fail its expectation."""
    while True:
        candidate = rng.getrandbits(bits) | (3 << (bits - 2))
        candidate += 5 - candidate % 6  # 5 mod 6: odd and 2 mod 3; the top two bits stay set
        if all(candidate % p for p in _SMALL_PRIMES) and pow(2, candidate - 1, candidate) == 1:
            return candidate


def rsa_primes(bits: int, rng: random.Random) -> tuple[int, int]:
    """Two primes for a `bits`-bit modulus whose lambda is prime to 3 and 65537 (so both exponents fit)."""
    while True:
        p, q = _prime(bits // 2, rng), _prime(bits // 2, rng)
        if p != q and (p - 1) % 65537 and (q - 1) % 65537 and (p * q).bit_length() == bits:
            return p, q


def rsa_key(primes: tuple[int, int], exponent: int = 65537) -> rsa.RSAPrivateKey:
    """An RSA key from given primes: cryptography cannot make one from a seed, and a fuzz run must repeat."""
    p, q = primes
    d = pow(exponent, -1, math.lcm(p - 1, q - 1))
    public = rsa.RSAPublicNumbers(exponent, p * q)
    return rsa.RSAPrivateNumbers(p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), public).private_key()


def ec_key(curve: ec.EllipticCurve, rng: random.Random) -> ec.EllipticCurvePrivateKey:
    # One bit below the curve size is always below the group order of the curves used here.
    return ec.derive_private_key(rng.getrandbits(curve.key_size - 1) | 1, curve)


# -- a DER tree that keeps whatever it is given ----------------------------------------------------------------------
@dataclass
class Node:
    """One TLV. `children` is set for a constructed element, or for DER encapsulated in a BIT STRING or OCTET
    STRING (then `prefix` holds the octets before it: a BIT STRING's unused-bits octet). `length` forces the
    length octets (a mutation); None encodes the right DER length."""

    tag: bytes
    content: bytes = b""
    children: list[Node] | None = None
    prefix: bytes = b""
    length: bytes | None = None
    trailer: bytes = b""  # octets after the content (an indefinite length's end-of-contents)

    def clone(self) -> Node:
        return Node(
            self.tag,
            self.content,
            None if self.children is None else [c.clone() for c in self.children],
            self.prefix,
            self.length,
            self.trailer,
        )

    def body(self) -> bytes:
        if self.children is None:
            return self.content
        return self.prefix + b"".join(c.encode() for c in self.children)

    def encode(self) -> bytes:
        body = self.body()
        return (
            self.tag + (der_length(len(body)) if self.length is None else self.length) + body + self.trailer
        )

    def walk(self) -> list[tuple[Node, Node | None]]:
        """Every node with its parent (iterative: this runs once per mutation)."""
        out: list[tuple[Node, Node | None]] = []
        stack: list[tuple[Node, Node | None]] = [(self, None)]
        while stack:
            node, parent = stack.pop()
            out.append((node, parent))
            if node.children:
                stack.extend((child, node) for child in node.children)
        return out


def der_length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _parse_one(data: bytes, pos: int) -> tuple[Node, int]:
    tag = data[pos : pos + 1]
    t = der.read_tlv(data, pos)
    content = data[t.content : t.end]
    node = Node(tag)
    if tag[0] & 0x20:
        node.children = _parse_all(content)
    elif tag[0] in (der.TAG_BIT_STRING, der.TAG_OCTET_STRING):
        start = 1 if tag[0] == der.TAG_BIT_STRING else 0
        inner = content[start:]
        try:
            if inner and inner[0] in (0x30, 0x31, 0x02, 0x04, 0x03, 0x06, 0x0C, 0x16, 0x01):
                node.children, node.prefix = _parse_all(inner), content[:start]
            else:
                node.content = content
        except (ValueError, IndexError):
            node.content = content
    else:
        node.content = content
    return node, t.end


def _parse_all(data: bytes) -> list[Node]:
    out, pos = [], 0
    while pos < len(data):
        node, pos = _parse_one(data, pos)
        out.append(node)
    return out


def parse(data: bytes) -> Node:
    node, end = _parse_one(data, 0)
    if end != len(data):
        raise ValueError("trailing bytes")
    return node


def tlv(tag: int, content: bytes) -> bytes:
    return bytes((tag,)) + der_length(len(content)) + content


def integer(value: int) -> bytes:
    size = max(1, (value.bit_length() + 8) // 8)
    return tlv(der.TAG_INTEGER, value.to_bytes(size, "big", signed=True))


def oid_content(dotted: str) -> bytes:
    return der.oid_content(dotted)


# -- seeds ------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Seed:
    name: str
    der: bytes
    expect: str  # ReasonCode name, or ISSUED, under PROFILE
    sign: Signer | None = None  # signs a CertificationRequestInfo again after a mutation
    sig_alg: bytes = b""  # the AlgorithmIdentifier TLV that goes with `sign`
    tree: Node = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "tree", parse(self.der))


_SHA256_RSA: Final = der.sequence(der.oid("1.2.840.113549.1.1.11"), b"\x05\x00")
_SHA1_RSA: Final = der.sequence(der.oid("1.2.840.113549.1.1.5"), b"\x05\x00")
_ECDSA_SHA256: Final = der.sequence(der.oid("1.2.840.10045.4.3.2"))
_ECDSA_SHA384: Final = der.sequence(der.oid("1.2.840.10045.4.3.3"))
_ECDSA_SHA1: Final = der.sequence(der.oid("1.2.840.10045.4.1"))
_ED25519: Final = der.sequence(der.oid("1.3.101.112"))
_ID_EC: Final = "1.2.840.10045.2.1"
_RSA_ENC: Final = "1.2.840.113549.1.1.1"

# P-256 (SEC 2 2.4.2), for a SubjectPublicKeyInfo with explicit curve parameters.
_P256_P: Final = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
_P256_A: Final = _P256_P - 3
_P256_B: Final = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
_P256_G: Final = bytes.fromhex(
    "046B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296"
    "4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5"
)
_P256_N: Final = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _explicit_p256_params() -> bytes:
    field_id = der.sequence(der.oid("1.2.840.10045.1.1"), integer(_P256_P))
    curve = der.sequence(
        der.octet_string(_P256_A.to_bytes(32, "big")), der.octet_string(_P256_B.to_bytes(32, "big"))
    )
    return der.sequence(integer(1), field_id, curve, der.octet_string(_P256_G), integer(_P256_N), integer(1))


def _point(key: ec.EllipticCurvePrivateKey, fmt: serialization.PublicFormat) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962, fmt)


def _spki(key: object) -> bytes:
    assert hasattr(key, "public_key")
    return key.public_key().public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _name(*attrs: tuple[x509.ObjectIdentifier, str]) -> x509.Name:
    return x509.Name([x509.NameAttribute(oid, value) for oid, value in attrs])


def _builder_csr(
    key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey,
    algorithm: hashes.SHA1 | hashes.SHA256 | hashes.SHA384 | hashes.SHA512 | None,
    *,
    subject: x509.Name | None = None,
    extensions: bool = False,
    pss: bool = False,
) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        subject or _name((NameOID.COMMON_NAME, "device"))
    )
    if extensions:
        builder = (
            builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("evil.example"),
                        x509.OtherName(x509.ObjectIdentifier("1.2.3.4"), b"\x05\x00"),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.UnrecognizedExtension(x509.ObjectIdentifier("1.2.3.5"), b"\x04\x00"), critical=True
            )
            .add_attribute(x509.ObjectIdentifier("1.2.840.113549.1.9.7"), b"challenge")
        )
    kw: dict[str, object] = {}
    if isinstance(key, ec.EllipticCurvePrivateKey):
        kw["ecdsa_deterministic"] = True
    if pss:
        assert algorithm is not None
        kw["rsa_padding"] = padding.PSS(padding.MGF1(algorithm), 32)
    csr = builder.sign(key, algorithm, **kw)  # type: ignore[arg-type]
    return csr.public_bytes(serialization.Encoding.DER)


def hand_csr(spki: bytes, sign: Signer, sig_alg: bytes, *, version: int = 0) -> bytes:
    """A PKCS#10 request built byte by byte, for keys cryptography will not put in one."""
    name = der.sequence(der.tlv(der.TAG_SET, der.sequence(der.oid("2.5.4.3"), der.utf8_string("device"))))
    info = der.sequence(integer(version), name, spki, b"\xa0\x00")
    return der.sequence(info, sig_alg, der.bit_string(sign(info)))


def ecdsa(key: ec.EllipticCurvePrivateKey, h: hashes.HashAlgorithm) -> Signer:
    return lambda data: key.sign(data, ec.ECDSA(h, deterministic_signing=True))


def pkcs1(key: rsa.RSAPrivateKey, h: hashes.HashAlgorithm) -> Signer:
    return lambda data: key.sign(data, padding.PKCS1v15(), h)


def make_seeds(seed: int = 1, *, rsa_3072: bool = True) -> list[Seed]:
    """Valid CSRs of every accepted key type, and some that PROFILE must refuse; deterministic for `seed`.
    The RSA-3072 key takes seconds to find in Python: the fast test slice leaves it out."""
    rng = random.Random(f"csr-seeds-{seed}")
    p256, p384 = ec_key(ec.SECP256R1(), rng), ec_key(ec.SECP384R1(), rng)
    ed = ed25519.Ed25519PrivateKey.from_private_bytes(rng.randbytes(32))
    primes = rsa_primes(2048, rng)
    r2048 = rsa_key(primes)

    seeds = [
        Seed("ec-p256", _builder_csr(p256, hashes.SHA256()), ISSUED, ecdsa(p256, hashes.SHA256()), _ECDSA_SHA256),
        Seed("ec-p384", _builder_csr(p384, hashes.SHA384()), ISSUED, ecdsa(p384, hashes.SHA384()), _ECDSA_SHA384),
        Seed("ed25519", _builder_csr(ed, None), ISSUED, ed.sign, _ED25519),
        Seed("rsa-2048", _builder_csr(r2048, hashes.SHA256()), ISSUED, pkcs1(r2048, hashes.SHA256()), _SHA256_RSA),
        Seed(
            "ec-p256-extensions", _builder_csr(p256, hashes.SHA256(), extensions=True), ISSUED,
            ecdsa(p256, hashes.SHA256()), _ECDSA_SHA256,
        ),
        Seed(
            "ec-p256-subject",
            _builder_csr(p256, hashes.SHA256(), subject=x509.Name([
                x509.NameAttribute(NameOID.SERIAL_NUMBER, "ASKED-FOR"),
                x509.NameAttribute(NameOID.COUNTRY_NAME, "DE"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Ünïcödé %s%n\x1b[31m\u202e"),
                x509.NameAttribute(NameOID.EMAIL_ADDRESS, "a@b.example"),
            ])),
            ISSUED, ecdsa(p256, hashes.SHA256()), _ECDSA_SHA256,
        ),
        Seed("rsa-2048-pss", _builder_csr(r2048, hashes.SHA256(), pss=True), ISSUED),  # PSS proves possession
        Seed("ec-p256-sha1", hand_csr(_spki(p256), ecdsa(p256, hashes.SHA1()), _ECDSA_SHA1), "BAD_POP"),  # noqa: S303
        Seed("rsa-2048-sha1", hand_csr(_spki(r2048), pkcs1(r2048, hashes.SHA1()), _SHA1_RSA), "BAD_POP"),  # noqa: S303
        Seed("rsa-1024", _builder_csr(rsa_key(rsa_primes(1024, rng)), hashes.SHA256()), "KEY_POLICY"),
        Seed("rsa-2048-e3", _builder_csr(rsa_key(primes, 3), hashes.SHA256()), "KEY_POLICY"),
        Seed("ec-p521", _builder_csr(ec_key(ec.SECP521R1(), rng), hashes.SHA512()), "KEY_POLICY"),
        Seed("ec-secp256k1", _builder_csr(ec_key(ec.SECP256K1(), rng), hashes.SHA256()), "KEY_POLICY"),
        Seed("ed448", _builder_csr(ed448.Ed448PrivateKey.from_private_bytes(rng.randbytes(57)), None), "KEY_POLICY"),
    ]  # fmt: skip
    uncompressed = _point(p256, serialization.PublicFormat.UncompressedPoint)
    explicit = der.sequence(
        der.sequence(der.oid(_ID_EC), _explicit_p256_params()), der.bit_string(uncompressed)
    )
    no_params = der.sequence(der.sequence(der.oid(_ID_EC)), der.bit_string(uncompressed))
    x25519_spki = _spki(x25519.X25519PrivateKey.from_private_bytes(rng.randbytes(32)))
    seeds += [
        Seed(
            "ec-p256-explicit", hand_csr(explicit, ecdsa(p256, hashes.SHA256()), _ECDSA_SHA256), "KEY_POLICY"
        ),
        Seed(
            "ec-p256-no-params",
            hand_csr(no_params, ecdsa(p256, hashes.SHA256()), _ECDSA_SHA256),
            "KEY_POLICY",
        ),
        Seed("x25519", hand_csr(x25519_spki, lambda _d: bytes(64), _ED25519), "KEY_POLICY"),
        Seed(
            "rsa-2048-e1",
            hand_csr(
                der.sequence(
                    der.sequence(der.oid(_RSA_ENC), b"\x05\x00"),
                    der.bit_string(der.sequence(integer(r2048.public_key().public_numbers().n), integer(1))),
                ),
                pkcs1(r2048, hashes.SHA256()),
                _SHA256_RSA,
            ),
            "KEY_POLICY",
        ),
    ]
    if rsa_3072:
        seeds.append(Seed("rsa-3072", _builder_csr(rsa_key(rsa_primes(3072, rng)), hashes.SHA512()), ISSUED))
    return seeds


# -- interesting values ----------------------------------------------------------------------------------------------
_OIDS: Final = [
    oid_content(o)
    for o in (
        _ID_EC, _RSA_ENC, "1.2.840.10040.4.1", "1.3.101.110", "1.3.101.112", "1.3.101.113", "1.2.840.113549.1.1.10",
        "1.2.840.10045.3.1.7", "1.3.132.0.34", "1.3.132.0.35", "1.3.132.0.10", "1.3.36.3.3.2.8.1.1.7",
        "1.2.840.10045.4.3.2", "1.2.840.10045.4.3.4", "1.2.840.10045.4.1", "1.2.840.113549.1.1.4",
        "1.2.840.113549.1.1.5", "1.2.840.113549.1.1.11", "1.2.840.113549.1.1.13", "2.16.840.1.101.3.4.3.2",
        "1.2.840.113549.1.9.14", "1.2.840.113549.1.9.7", "2.5.29.19", "2.5.29.17", "2.5.29.15", "2.5.4.5",
        "2.5.4.3", "1.3.6.1.5.5.7.8.4", "2.999", "2.5", "0.0", "1.39",
    )
]  # fmt: skip
_TAGS: Final = [
    0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x12, 0x13, 0x14, 0x16, 0x17, 0x18, 0x1A, 0x1C, 0x1E, 0x30,
    0x31, 0x80, 0x81, 0xA0, 0xA1, 0xA3, 0xBF, 0xFF,
]  # fmt: skip
_STRING_TAGS: Final = [0x0C, 0x12, 0x13, 0x14, 0x16, 0x1A, 0x1C, 0x1E]
_STRINGS: Final = [
    b"", b"\x00", b"%s%s%n%x", b"\x1b[31mred\x1b[0m", "\u202eevil".encode(), b"\xff\xfe\xfd", b"\xc0\x80",
    b"\xed\xa0\x80", b"a" * 65, b"\x00a", b"\x00\x00\x00a", "\U0010ffff".encode(), b"=cmd|' /C calc'!A0",
]  # fmt: skip


def _lengths(real: int, rng: random.Random) -> bytes:
    return rng.choice([
        b"\x80", bytes((0x81, real & 0xFF)), b"\x82" + (real & 0xFFFF).to_bytes(2, "big"), der_length(real + 1),
        der_length(max(0, real - 1)), b"\x00", b"\x7f", b"\x84\xff\xff\xff\xff", b"\x84\x80\x00\x00\x00",
        b"\x85\x01\x00\x00\x00\x00", b"\x89" + b"\x01" * 9, b"\xff", b"\x81", b"\x82\x00", der_length(real + 100000),
    ])  # fmt: skip


def _int_content(rng: random.Random) -> bytes:
    choice = rng.randrange(9)
    if choice == 0:
        return b""
    if choice == 1:
        return b"\x00" * rng.randint(1, 8) + b"\x01"
    if choice == 2:
        return b"\xff" * rng.randint(1, 8)
    if choice == 3:
        return b"\x7f" + rng.randbytes(int(math.exp(rng.uniform(0, math.log(4000)))))
    if choice == 4:
        return rng.choice([b"\x00", b"\x01", b"\x02", b"\x03", b"\x80", b"\x00\x80"])
    if choice == 5:
        power: int = rng.choice([31, 32, 63, 64, 127, 128, 255, 256, 521])
        return (1 << power).to_bytes(70, "big").lstrip(b"\x00")
    if choice == 6:
        return rng.randbytes(rng.randint(1, 40))
    if choice == 7:
        return (
            (rng.choice([3, 5, 17, 65535, 65539, 2**32 + 1, 2**64 + 1, 65536]))
            .to_bytes(9, "big")
            .lstrip(b"\x00")
        )
    return b"\x00" + rng.randbytes(rng.randint(1, 600))


def _oid_mutation(rng: random.Random) -> bytes:
    choice = rng.randrange(7)
    if choice <= 2:
        return rng.choice(_OIDS)
    if choice == 3:
        return b"\x2a" + b"\xff" * rng.randint(1, 600) + b"\x7f"  # one huge arc
    if choice == 4:
        return b"\x2a" + b"\x01" * rng.randint(30, 6000)  # thousands of arcs
    if choice == 5:
        return rng.choice([b"", b"\x80\x01", b"\x2a\x80", b"\x2a\x86", b"\x2a\x80\x80\x01", b"\xff"])
    return rng.randbytes(rng.randint(1, 20))


def _nested(inner: bytes, depth: int, tag: int) -> Node:
    """`inner` wrapped `depth` deep, as one node (a chain of Nodes would recurse too deep to encode)."""
    one = bytes((tag,))
    headers, size = [], len(inner)
    for _ in range(depth - 1):
        if size < 0x80:
            header = one + bytes((size,))
        elif size < 0x100:
            header = one + bytes((0x81, size))
        else:
            header = one + b"\x82" + size.to_bytes(2, "big") if size < 0x10000 else one + der_length(size)
        headers.append(header)
        size += len(header)
    return Node(one, b"".join(reversed(headers)) + inner)


def _log_uniform(rng: random.Random, top: int) -> int:
    return int(math.exp(rng.uniform(0, math.log(top))))


def interesting_spkis(seeds: list[Seed]) -> list[bytes]:
    """Whole SubjectPublicKeyInfos a device should never get certified (and the seeds' own)."""
    rng = random.Random("spkis")
    p256 = ec_key(ec.SECP256R1(), rng)
    point = bytearray(_point(p256, serialization.PublicFormat.UncompressedPoint))
    off_curve = bytes(point[:-1]) + bytes(((point[-1] ^ 1),))
    compressed = _point(p256, serialization.PublicFormat.CompressedPoint)
    named = der.sequence(der.oid(_ID_EC), der.oid("1.2.840.10045.3.1.7"))
    p, q = rsa_primes(1024, rng)
    n = p * q
    rsa_alg = der.sequence(der.oid(_RSA_ENC), b"\x05\x00")

    def rsa_spki(modulus: int, exponent: int, alg: bytes = rsa_alg) -> bytes:
        return der.sequence(alg, der.bit_string(der.sequence(integer(modulus), integer(exponent))))

    out = [
        der.sequence(named, der.bit_string(off_curve)),
        der.sequence(named, der.bit_string(compressed)),
        der.sequence(named, der.bit_string(b"\x00")),
        der.sequence(named, der.bit_string(b"\x06" + bytes(point[1:]))),
        der.sequence(named, der.bit_string(bytes(point[:33]))),
        der.sequence(der.sequence(der.oid(_ID_EC), der.oid("1.2.3.4")), der.bit_string(bytes(point))),
        der.sequence(der.sequence(der.oid(_ID_EC), b"\x05\x00"), der.bit_string(bytes(point))),
        der.sequence(der.sequence(der.oid(_ID_EC), _explicit_p256_params()), der.bit_string(bytes(point))),
        rsa_spki(n, 65537),
        rsa_spki(n * n, 65537),
        rsa_spki(n << 1, 65537),
        rsa_spki((1 << 2047) | 1, 65537),
        rsa_spki((1 << 16383) | 1, 65537),
        rsa_spki(n, 2**1000 + 1),
        rsa_spki(n, 65536),
        rsa_spki(n, 0),
        rsa_spki(n, -65537),
        rsa_spki(n, 65537, der.sequence(der.oid(_RSA_ENC))),
        rsa_spki(n, 65537, der.sequence(der.oid("1.2.840.113549.1.1.10"), der.sequence())),
        der.sequence(
            der.sequence(der.oid("1.2.840.10040.4.1"), der.sequence(integer(n), integer(7), integer(2))),
            der.bit_string(integer(5)),
        ),
        der.sequence(der.sequence(der.oid("1.3.101.112")), der.bit_string(bytes(31))),
        der.sequence(der.sequence(der.oid("1.3.101.112"), b"\x05\x00"), der.bit_string(bytes(32))),
        der.sequence(der.sequence(der.oid("1.3.101.110")), der.bit_string(bytes(32))),
        der.sequence(der.sequence(der.oid("1.2.3.4")), der.bit_string(b"\x01\x02")),
    ]
    for seed in seeds:
        info = seed.tree.children[0] if seed.tree.children else None
        if info is not None and info.children and len(info.children) > 2:
            out.append(info.children[2].encode())
    return out


_SIG_ALGS: Final = [
    _SHA1_RSA, _ECDSA_SHA1, _ED25519, _SHA256_RSA, _ECDSA_SHA256,
    der.sequence(der.oid("1.2.840.113549.1.1.4"), b"\x05\x00"),
    der.sequence(der.oid("1.2.840.10045.4.3.2"), b"\x05\x00"),
    der.sequence(der.oid("1.3.101.112"), b"\x05\x00"),
    der.sequence(der.oid("1.3.101.113")),
    der.sequence(der.oid("1.2.840.113549.1.1.10")),
    der.sequence(der.oid("1.2.840.113549.1.1.10"), der.sequence()),
    der.sequence(der.oid("1.2.840.113549.1.1.10"), der.sequence(der.tlv(0xA0, der.sequence(der.oid("1.2.3"))))),
    der.sequence(der.oid("1.2.840.113549.1.1.10"), b"\x05\x00"),
    der.sequence(der.oid("2.16.840.1.101.3.4.3.2")),
    der.sequence(der.oid("1.2.3.4.5")),
    der.sequence(),
]  # fmt: skip


# -- the mutator ------------------------------------------------------------------------------------------------
class Mutator:
    """Inputs derived from the seeds, deterministically for `rng`'s seed. `next()` -> (kind, seed name, bytes)."""

    OPS: Final = (
        "version", "integer", "oid", "tag", "length", "delete", "duplicate", "swap", "move", "content", "nest",
        "string", "bitstring", "spki", "sigalg", "attributes", "signature",
    )  # fmt: skip

    def __init__(self, seeds: list[Seed], rng: random.Random, spkis: list[bytes] | None = None) -> None:
        self.seeds = seeds
        self.rng = rng
        self.spkis = interesting_spkis(seeds) if spkis is None else spkis

    def next(self) -> tuple[str, str, bytes]:
        rng = self.rng
        roll = rng.random()
        if roll < 0.04:
            return "random-bytes", "-", rng.randbytes(_log_uniform(rng, 9000))
        if roll < 0.07:
            body = rng.randbytes(_log_uniform(rng, 4000))
            return "random-sequence", "-", tlv(0x30, body)
        if roll < 0.10:
            return "random-tree", "-", self._random_tree(0).encode()
        seed = rng.choice(self.seeds)
        ops = [rng.choice(self.OPS) for _ in range(1 if rng.random() < 0.6 else rng.randint(2, 4))]
        kind, data = self.derive(seed, ops, resign=rng.random() < 0.45)
        if rng.random() < 0.12:
            data, how = self._bytes(data)
            kind += f"+{how}"
        if rng.random() < 0.02:
            data = self._pem(data)
            kind += "+pem"
        return kind, seed.name, data

    def derive(self, seed: Seed, ops: list[str], *, resign: bool) -> tuple[str, bytes]:
        """`seed` with the mutation operators `ops` applied in turn (their details drawn from the rng), signed
        again by the seed's key if `resign` and it has one. Returns (kind, input)."""
        tree = seed.tree.clone()
        kind = "+".join(self._mutate(tree, op) for op in ops)
        data = self._resigned(seed, tree) if resign and seed.sign else None
        if data is None:
            return kind, tree.encode()
        return kind + "+resigned", data

    def _resigned(self, seed: Seed, tree: Node) -> bytes | None:
        if not tree.children or tree.children[0].tag != b"\x30":
            return None
        info = tree.children[0].encode()
        assert seed.sign is not None
        return der.sequence(info, seed.sig_alg, der.bit_string(seed.sign(info)))

    def _mutate(self, tree: Node, op: str) -> str:
        rng = self.rng
        nodes = tree.walk()
        info = tree.children[0] if tree.children else None
        if op == "version" and info is not None and info.children:
            info.children[0] = Node(
                b"\x02",
                _int_content(rng) if rng.random() < 0.3 else bytes((rng.choice([1, 2, 3, 0x7F, 0xFF]),)),
            )
            return op
        if op == "spki" and info is not None and info.children and len(info.children) > 2:
            info.children[2] = parse(rng.choice(self.spkis))
            return op
        if op == "sigalg" and tree.children and len(tree.children) > 1:
            tree.children[1] = parse(rng.choice(_SIG_ALGS))
            return op
        if op == "attributes" and info is not None and info.children:
            info.children[-1] = self._attributes()
            return op
        if op == "signature" and tree.children and len(tree.children) > 2:
            tree.children[2] = Node(b"\x03", b"\x00" + self._signature_value())
            return op
        if op == "integer":
            ints = [n for n, _ in nodes if n.tag == b"\x02"]
            if ints:
                rng.choice(ints).content = _int_content(rng)
                return op
        if op == "oid":
            oids = [n for n, _ in nodes if n.tag == b"\x06"]
            if oids:
                rng.choice(oids).content = _oid_mutation(rng)
                return op
        if op == "string":
            strings = [n for n, _ in nodes if n.tag[0] in _STRING_TAGS]
            if strings:
                node = rng.choice(strings)
                if rng.random() < 0.5:
                    node.tag = bytes((rng.choice(_STRING_TAGS),))
                else:
                    node.content = rng.choice(_STRINGS) * (1 if rng.random() < 0.9 else rng.randint(2, 500))
                return op
        if op == "bitstring":
            bits = [n for n, _ in nodes if n.tag == b"\x03"]
            if bits:
                node = rng.choice(bits)
                node.children = None
                node.content = (
                    bytes((rng.choice([1, 7, 8, 0xFF]),)) + node.body()[1:] if rng.random() < 0.7 else b""
                )
                return op
        node, parent = rng.choice(nodes)
        if op == "tag":
            node.tag = rng.choice([
                bytes((rng.choice(_TAGS),)), bytes((node.tag[0] ^ 0x20,)), b"\x1f\x81\x80\x80\x00",
                b"\x3f" + b"\xff" * rng.randint(1, 30) + b"\x7f", b"\x1f\x1e", bytes((rng.randrange(256),)),
            ])  # fmt: skip
            return op
        if op == "length":
            node.length = _lengths(len(node.body()), rng)
            if node.length == b"\x80" and rng.random() < 0.5:
                node.trailer = b"\x00\x00"
            return op
        if op == "content" and node.children is None:
            content = node.content
            node.content = rng.choice([
                rng.randbytes(rng.randint(0, 2 * len(content) + 8)), content[: rng.randint(0, len(content))],
                content + rng.randbytes(rng.randint(1, 64)),
            ])  # fmt: skip
            return op
        if op == "nest":
            depth = _log_uniform(rng, 4000)
            wrapped = _nested(node.encode(), depth, rng.choice([0x30, 0x31, 0xA0]))
            self._replace(tree, node, parent, wrapped)
            return op
        if parent is not None and parent.children:
            siblings = parent.children
            at = siblings.index(node)
            if op == "delete":
                del siblings[at]
                return op
            if op == "duplicate":
                for _ in range(1 if rng.random() < 0.8 else _log_uniform(rng, 300)):
                    siblings.insert(at, node.clone())
                return op
            if op == "swap" and len(siblings) > 1:
                other = rng.randrange(len(siblings))
                siblings[at], siblings[other] = siblings[other], siblings[at]
                return op
            if op == "move":
                donor, _ = rng.choice(nodes)
                siblings[at] = donor.clone()
                return op
        node.content, node.children = rng.randbytes(rng.randint(0, 40)), None
        return "content"

    @staticmethod
    def _replace(tree: Node, node: Node, parent: Node | None, new: Node) -> None:
        if parent is None or parent.children is None:
            tree.tag, tree.children, tree.content, tree.prefix = (
                new.tag,
                new.children,
                new.content,
                new.prefix,
            )
            return
        parent.children[parent.children.index(node)] = new

    def _attributes(self) -> Node:
        rng = self.rng
        ext_req = der.oid("1.2.840.113549.1.9.14")
        junk_ext = rng.choice([
            der.sequence(der.oid("2.5.29.19"), der.tlv(0x01, b"\x01"), der.octet_string(b"\x30\x00")),
            der.sequence(der.oid("2.5.29.19"), der.octet_string(b"\x30\x03\x01\x01\x01")),
            der.sequence(der.oid("2.5.29.17"), der.octet_string(b"\x30\x02\x82\x00")),
            der.sequence(der.oid("2.5.29.17"), der.octet_string(rng.randbytes(20))),
            der.sequence(der.oid("2.5.29.15"), der.octet_string(b"\x03\x02\x07\x80")),
            der.sequence(der.oid("1.2.3"), der.octet_string(b"")),
            der.sequence(der.oid("2.5.29.19")),
        ])  # fmt: skip
        exts = der.sequence(*([junk_ext] * (1 if rng.random() < 0.8 else rng.randint(2, 200))))
        attrs = rng.choice([
            der.sequence(ext_req, der.tlv(0x31, exts)),
            der.sequence(ext_req, der.tlv(0x31, exts + exts)),
            der.sequence(ext_req, der.tlv(0x31, b"")),
            der.sequence(ext_req, der.tlv(0x31, der.octet_string(b"x"))),
            der.sequence(der.oid("1.2.840.113549.1.9.7"), der.tlv(0x31, der.tlv(rng.choice(_STRING_TAGS), rng.choice(_STRINGS)))),
            der.sequence(der.oid("1.2.3.4"), der.tlv(0x31, rng.randbytes(rng.randint(0, 3000)))),
            der.sequence(der.oid("1.2.3.4")),
        ])  # fmt: skip
        count = 1 if rng.random() < 0.8 else rng.randint(2, 300)
        return Node(b"\xa0", attrs * count)

    def _signature_value(self) -> bytes:
        rng = self.rng
        return rng.choice([
            b"", rng.randbytes(rng.randint(1, 600)),
            der.sequence(integer(0), integer(0)), der.sequence(integer(-1), integer(1)),
            der.sequence(integer(_P256_N), integer(1)), der.sequence(integer(1 << 4000), integer(1)),
            der.sequence(integer(1), integer(1)) + b"\x00", bytes(256), b"\xff" * 384,
        ])  # fmt: skip

    def _random_tree(self, depth: int) -> Node:
        rng = self.rng
        if depth < 6 and rng.random() < 0.5:
            return Node(bytes((rng.choice([0x30, 0x31, 0xA0, 0xA3]),)),
                        children=[self._random_tree(depth + 1) for _ in range(rng.randint(0, 5))])  # fmt: skip
        return Node(bytes((rng.choice(_TAGS),)), rng.randbytes(rng.randint(0, 40)))

    def _bytes(self, data: bytes) -> tuple[bytes, str]:
        rng = self.rng
        buf = bytearray(data)
        how = rng.choice(["flip", "insert", "erase", "truncate", "append"])
        if not buf:
            how = "append"
        if how == "flip":
            for _ in range(rng.randint(1, 8)):
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
        elif how == "insert":
            at = rng.randrange(len(buf) + 1)
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif how == "erase":
            at = rng.randrange(len(buf))
            del buf[at : at + rng.randint(1, 16)]
        elif how == "truncate":
            del buf[rng.randrange(len(buf)) :]
        else:
            buf += rng.randbytes(rng.randint(1, 32))
        return bytes(buf), how

    def _pem(self, data: bytes) -> bytes:
        rng = self.rng
        body = base64.encodebytes(data)
        label = rng.choice([b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST", b"CERTIFICATE", b"X"])
        pem = b"-----BEGIN " + label + b"-----\n" + body + b"-----END " + label + b"-----\n"
        return rng.choice(
            [pem, pem + pem, pem.replace(b"\n", b"\r\n"), pem[:-20], pem.replace(b"A", b"\xc3\xa4", 1)]
        )


# -- the invariant, in-process -------------------------------------------------------------------------------------
def preparer() -> Preparer:
    """The worker-side path with PROFILE, under a throw-away P-256 issuing CA (the TBS capture needs one)."""
    rng = random.Random("fuzz-ca")
    key = ec_key(ec.SECP256R1(), rng)
    name = _name((NameOID.COMMON_NAME, "Fuzz Issuing CA"))
    start = dt.datetime.fromtimestamp(NOW, dt.UTC) - dt.timedelta(days=1)
    cert = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(start).not_valid_after(start + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256(), ecdsa_deterministic=True)
    )  # fmt: skip
    ctx = PrepareContext({PROFILE.name: PROFILE}, cert.public_bytes(serialization.Encoding.DER),
                         KeyAlgorithm.EC_P256, MAX_CSR_BYTES)  # fmt: skip
    return Preparer(ctx)


def known_key_hashes(seeds: list[Seed]) -> frozenset[bytes]:
    """SHA-256 of the canonical SPKI of every seed key: the only keys a device can prove it holds."""
    out = set()
    for seed in seeds:
        try:
            key = x509.load_der_x509_csr(seed.der).public_key()
            spki = key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            out.add(hashlib.sha256(spki).digest())
        except Exception:  # noqa: BLE001, S112 - seeds cryptography cannot load have no key to prove
            continue
    return frozenset(out)


@dataclass
class Outcome:
    code: str  # ReasonCode name, or ISSUED
    seconds: float
    violation: str | None = None
    message: str = ""


def check(prep: Preparer, data: bytes, known: frozenset[bytes] | None, job: Job | None = None) -> Outcome:
    """One input through the worker-side path, against the invariant. `known`: the key hashes a certificate may
    be for (None: any, for a bare key whose proof of possession a front end checked)."""
    job = job or Job(DEVICE_SERIAL, data, PROFILE.name, NOW)
    start = time.perf_counter()
    try:
        result = prep.prepare(job)
    except BaseException as exc:  # noqa: BLE001 - that is exactly what is checked
        return Outcome("RAISED", time.perf_counter() - start, f"raised {type(exc).__name__}")
    seconds = time.perf_counter() - start
    try:
        back = pickle.loads(pickle.dumps(result))  # noqa: S301 - our own bytes, one line above
        same = back == result
    except Exception as exc:  # noqa: BLE001
        return Outcome("UNPICKLABLE", seconds, f"result does not pickle: {type(exc).__name__}")
    if not same:
        return Outcome("UNPICKLABLE", seconds, "result changes through pickle")
    if isinstance(result, Prepared):
        if known is not None and result.public_key_sha256 not in known:
            return Outcome(ISSUED, seconds, "a certificate for a key no seed proved")
        return Outcome(ISSUED, seconds)
    assert isinstance(result, Refusal)
    violation = None
    if result.code is ReasonCode.INTERNAL:
        violation = f"INTERNAL: {result.fault}"
    elif len(result.message) > 300 or not result.message.isascii() or not result.message.isprintable():
        violation = "refusal message not short printable ASCII"
    return Outcome(result.code.name, seconds, violation, result.message)


def replace_serial(job: Job, serial: str) -> Job:
    return dataclasses.replace(job, device_serial=serial)
