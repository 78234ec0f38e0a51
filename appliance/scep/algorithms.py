"""Which algorithms a SCEP label accepts, and what GetCACaps says about them.

By default AES-CBC (128, 192, 256) for the envelope and SHA-256, SHA-384 or SHA-512 for the message signature;
the key transport is RSA (PKCS #1 v1.5, as every SCEP client does). DES, 3DES, MD5 and SHA-1 are refused
unless a label names them in `legacy_algorithms`, for gear that cannot be changed (`LEGACY_RISKS` says what
each one costs: the daemon logs it at start, docs/scep.md repeats it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from cryptography.hazmat.primitives import hashes

from appliance.scep.errors import FailInfo, ScepError

LEGACY_RISKS: Mapping[str, str] = MappingProxyType({
    "des": "single DES (56-bit keys) is broken by brute force within a day on rented hardware: anyone who recorded a"
           " request reads its CSR and its challenge password, and can enrol with that challenge where it still"
           " works",
    "3des": "3DES has 64-bit blocks (Sweet32) and at most 112-bit security; NIST disallows it for encryption"
            " since 2024",
    "sha1": "SHA-1 collisions are practical (SHAttered, 2017; chosen-prefix, 2020): a message signature over SHA-1"
            " no longer binds what was signed",
    "md5": "MD5 collisions take seconds on a laptop: a message signature over MD5 binds nothing",
})  # fmt: skip


@dataclass(frozen=True)
class Cipher:
    name: str
    oid: str
    key_size: int  # bytes
    legacy: str | None = None  # the legacy_algorithms name that allows it; None: always accepted

    @property
    def block_size(self) -> int:
        return 8 if self.legacy else 16


@dataclass(frozen=True)
class Digest:
    name: str
    oid: str
    algorithm: hashes.HashAlgorithm
    legacy: str | None = None


AES128 = Cipher("aes128-cbc", "2.16.840.1.101.3.4.1.2", 16)
AES192 = Cipher("aes192-cbc", "2.16.840.1.101.3.4.1.22", 24)
AES256 = Cipher("aes256-cbc", "2.16.840.1.101.3.4.1.42", 32)
DES3 = Cipher("des-ede3-cbc", "1.2.840.113549.3.7", 24, "3des")
DES = Cipher("des-cbc", "1.3.14.3.2.7", 8, "des")
CIPHERS: Mapping[str, Cipher] = MappingProxyType({c.oid: c for c in (AES128, AES192, AES256, DES3, DES)})

SHA256 = Digest("sha256", "2.16.840.1.101.3.4.2.1", hashes.SHA256())
SHA384 = Digest("sha384", "2.16.840.1.101.3.4.2.2", hashes.SHA384())
SHA512 = Digest("sha512", "2.16.840.1.101.3.4.2.3", hashes.SHA512())
SHA1 = Digest("sha1", "1.3.14.3.2.26", hashes.SHA1(), "sha1")  # noqa: S303 - accepted only when configured
MD5 = Digest("md5", "1.2.840.113549.2.5", hashes.MD5(), "md5")  # noqa: S303 - accepted only when configured
DIGESTS: Mapping[str, Digest] = MappingProxyType({d.oid: d for d in (SHA256, SHA384, SHA512, SHA1, MD5)})

# signatureAlgorithm in a SignerInfo: rsaEncryption (the digest is digestAlgorithm's), or a combined identifier
# that must name the same digest.
RSA_ENCRYPTION = "1.2.840.113549.1.1.1"
SIGNATURE_DIGEST: Mapping[str, tuple[str, str]] = MappingProxyType({
    "1.2.840.113549.1.1.4": ("rsa", "md5"),
    "1.2.840.113549.1.1.5": ("rsa", "sha1"),
    "1.2.840.113549.1.1.11": ("rsa", "sha256"),
    "1.2.840.113549.1.1.12": ("rsa", "sha384"),
    "1.2.840.113549.1.1.13": ("rsa", "sha512"),
    "1.2.840.10045.4.1": ("ecdsa", "sha1"),
    "1.2.840.10045.4.3.2": ("ecdsa", "sha256"),
    "1.2.840.10045.4.3.3": ("ecdsa", "sha384"),
    "1.2.840.10045.4.3.4": ("ecdsa", "sha512"),
})  # fmt: skip


@dataclass(frozen=True)
class AlgorithmPolicy:
    legacy: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = self.legacy - LEGACY_RISKS.keys()
        if unknown:
            raise ValueError(f"unknown legacy algorithm(s): {', '.join(sorted(unknown))}")

    @classmethod
    def allowing(cls, names: Iterable[str]) -> AlgorithmPolicy:
        return cls(frozenset(names))

    def cipher(self, oid: str) -> Cipher:
        found = CIPHERS.get(oid)
        if found is None:
            raise ScepError(f"content encryption {oid} is not supported (AES-CBC is)", FailInfo.BAD_ALG)
        if found.legacy is not None and found.legacy not in self.legacy:
            raise ScepError(
                f"content encryption {found.name} is refused on this label: {LEGACY_RISKS[found.legacy]};"
                " use AES (GetCACaps lists it)",
                FailInfo.BAD_ALG,
            )
        return found

    def digest(self, oid: str) -> Digest:
        found = DIGESTS.get(oid)
        if found is None:
            raise ScepError(f"digest algorithm {oid} is not supported (SHA-256 is)", FailInfo.BAD_ALG)
        if found.legacy is not None and found.legacy not in self.legacy:
            raise ScepError(
                f"digest {found.name} is refused on this label: {LEGACY_RISKS[found.legacy]}; use SHA-256"
                " (GetCACaps lists it)",
                FailInfo.BAD_ALG,
            )
        return found

    def capabilities(self, *, renewal: bool) -> tuple[str, ...]:
        """GetCACaps (RFC 8894 3.5.2), one keyword a line. SCEPStandard implies AES, POSTPKIOperation and
        SHA-256. Single DES and MD5 have no keyword: they are what a client uses when it sees none."""
        caps = ["AES", "POSTPKIOperation", "SCEPStandard", "SHA-256", "SHA-512"]
        if renewal:
            caps.append("Renewal")
        if "3des" in self.legacy:
            caps.append("DES3")
        if "sha1" in self.legacy:
            caps.append("SHA-1")
        return tuple(caps)
