"""cryptography private-key classes whose sign() runs on the HSM; every signature is verified before use."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn, Self

import pkcs11
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, utils
from pkcs11 import MGF, Mechanism

from hsm.algorithms import EC_CURVES, KeyAlgorithm, from_public_key
from hsm.errors import CiphertextError, UnsupportedAlgorithmError
from hsm.verify import DIGEST_INFO as _DIGEST_INFO
from hsm.verify import SignatureCheck, ecdsa_der
from hsm.verify import checked as _checked
from hsm.verify import digest_of as _digest
from hsm.worker import SIGNING, Lane

if TYPE_CHECKING:
    from hsm.token import TokenSession

_PSS_HASH = {
    "sha224": (Mechanism.SHA224, MGF.SHA224),
    "sha256": (Mechanism.SHA256, MGF.SHA256),
    "sha384": (Mechanism.SHA384, MGF.SHA384),
    "sha512": (Mechanism.SHA512, MGF.SHA512),
}


def c_sign(key: Any, data: bytes, mechanism: Mechanism, param: Any = None) -> bytes:
    """The package's only C_Sign; runs on the PKCS#11 thread (tests patch it to inject faults)."""
    return bytes(key.sign(data, mechanism=mechanism, mechanism_param=param))


def c_decrypt(key: Any, data: bytes, mechanism: Mechanism) -> bytes:
    """The package's only C_Decrypt; runs on the PKCS#11 thread."""
    return bytes(key.decrypt(data, mechanism=mechanism))


def _non_extractable(label: str) -> NoReturn:
    raise UnsupportedAlgorithmError(f"key {label!r} lives in the HSM and is not extractable")


class _HsmKey:
    """What all three key classes share: where the key lives and how to get signatures out of it."""

    label: str
    algorithm: KeyAlgorithm
    lane: Lane = SIGNING  # how this key's signatures queue for the PKCS#11 thread (hsm/worker.py)

    def _bind(self, core: TokenSession, label: str, pub: Any) -> None:
        self._core = core
        self.label = label
        self.algorithm = from_public_key(pub)
        self._public = pub
        self.check = SignatureCheck(pub, label)

    def in_lane(self, lane: Lane) -> Self:
        """The same HSM key whose signatures queue in `lane`: e.g. OCSP answers behind certificate signing."""
        twin = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        twin.lane = lane
        return twin

    def _raw_sign(self, payloads: Sequence[bytes], mechanism: Mechanism, param: Any = None) -> list[bytes]:
        return self._core.thread.call_in(self.lane, self._core.run, self._sign_op(payloads, mechanism, param))

    async def _araw_sign(
        self, payloads: Sequence[bytes], mechanism: Mechanism, param: Any = None
    ) -> list[bytes]:
        return await self._core.thread.acall_in(
            self.lane, self._core.run, self._sign_op(payloads, mechanism, param)
        )

    def _sign_op(
        self, payloads: Sequence[bytes], mechanism: Mechanism, param: Any
    ) -> Callable[[pkcs11.Session], list[bytes]]:
        core, label = self._core, self.label

        def op(_session: pkcs11.Session) -> list[bytes]:
            # Looked up inside the op so that a retry after re-login uses the fresh handle.
            key = core.private(label)
            return [c_sign(key, p, mechanism, param) for p in payloads]

        return op

    # sign_many: prepare (hash) on the caller's thread, one hop for all C_Sign calls, finish (encode+verify)
    # back on the caller's thread, so the PKCS#11 thread does nothing but PKCS#11.
    def _prepare(self, item: bytes) -> bytes:
        return self.check.digest(item)

    def _finish(self, raw: bytes, item: bytes, prepared: bytes) -> bytes:
        return self.check.finish(raw, item, prepared)

    def _batch_mechanism(self) -> Mechanism:
        raise NotImplementedError

    def sign_many(self, items: Sequence[bytes]) -> list[bytes]:
        prepared = [self._prepare(bytes(i)) for i in items]
        raws = self._raw_sign(prepared, self._batch_mechanism())
        return [self._finish(r, bytes(i), p) for r, i, p in zip(raws, items, prepared, strict=True)]

    async def asign_many(self, items: Sequence[bytes]) -> list[bytes]:
        prepared = [self._prepare(bytes(i)) for i in items]
        raws = await self._araw_sign(prepared, self._batch_mechanism())

        # Encoding and the mandatory verification cost ~80 us a signature: off the event loop, which would
        # otherwise stall every station and CMP client for a batch's worth of verifies.
        def finish() -> list[bytes]:
            return [self._finish(r, bytes(i), p) for r, i, p in zip(raws, items, prepared, strict=True)]

        return await asyncio.to_thread(finish)

    async def asign_unverified(self, items: Sequence[bytes]) -> list[bytes]:
        """The raw mechanism outputs of sign_many for `items`, NOT verified and, for ECDSA, not yet in the DER
        X.509 carries: each must pass `self.check.finish` (here or in another process that holds the item)
        before it is used in any way. For a pipeline that verifies where its CPU is cheaper; anything else
        uses asign_many."""
        prepared = [self._prepare(bytes(i)) for i in items]
        return await self._araw_sign(prepared, self._batch_mechanism())

    def __repr__(self) -> str:
        return f"<{type(self).__name__} label={self.label!r} algorithm={self.algorithm.value}>"

    # First in the MRO of each key class, so this satisfies the abstract method of every cryptography base.
    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> bytes:
        _non_extractable(self.label)

    def __copy__(self) -> Self:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> Self:
        return self


class HsmEcPrivateKey(_HsmKey, ec.EllipticCurvePrivateKey):
    def __init__(self, core: TokenSession, label: str, pub: ec.EllipticCurvePublicKey) -> None:
        self._bind(core, label, pub)
        self._pub: ec.EllipticCurvePublicKey = pub

    @property
    def curve(self) -> ec.EllipticCurve:
        return EC_CURVES[self.algorithm]

    @property
    def key_size(self) -> int:
        return self.curve.key_size

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._pub

    def _encode(self, raw: bytes, digest: bytes, hash_alg: hashes.HashAlgorithm) -> bytes:
        der = ecdsa_der(raw)
        _checked(lambda: self._pub.verify(der, digest, ec.ECDSA(utils.Prehashed(hash_alg))), self.label)
        return der

    def sign(self, data: Any, signature_algorithm: ec.EllipticCurveSignatureAlgorithm) -> bytes:
        if not isinstance(signature_algorithm, ec.ECDSA):
            raise UnsupportedAlgorithmError(f"unsupported EC signature algorithm {signature_algorithm!r}")
        digest, hash_alg = _digest(bytes(data), signature_algorithm.algorithm)
        raw = self._raw_sign([digest], Mechanism.ECDSA)[0]
        return self._encode(raw, digest, hash_alg)

    def _batch_mechanism(self) -> Mechanism:
        return Mechanism.ECDSA

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> bytes:
        raise UnsupportedAlgorithmError(f"key {self.label!r} is a signing key; ECDH is not offered")

    def private_numbers(self) -> ec.EllipticCurvePrivateNumbers:
        _non_extractable(self.label)


class HsmRsaPrivateKey(_HsmKey, rsa.RSAPrivateKey):
    def __init__(self, core: TokenSession, label: str, pub: rsa.RSAPublicKey) -> None:
        self._bind(core, label, pub)
        self._pub: rsa.RSAPublicKey = pub

    @property
    def key_size(self) -> int:
        return self._pub.key_size

    def public_key(self) -> rsa.RSAPublicKey:
        return self._pub

    def _mechanism(
        self, pad: padding.AsymmetricPadding, hash_alg: hashes.HashAlgorithm, digest: bytes
    ) -> tuple[Mechanism, Any, bytes]:
        if isinstance(pad, padding.PKCS1v15):
            if hash_alg.name not in _DIGEST_INFO:
                raise UnsupportedAlgorithmError(f"unsupported hash {hash_alg.name} for RSA PKCS#1 v1.5")
            return Mechanism.RSA_PKCS, None, _DIGEST_INFO[hash_alg.name] + digest
        if isinstance(pad, padding.PSS):
            mgf_hash = getattr(pad.mgf, "_algorithm", None)
            if hash_alg.name not in _PSS_HASH or mgf_hash is None or mgf_hash.name != hash_alg.name:
                raise UnsupportedAlgorithmError("PSS needs MGF1 with the same SHA-2 hash as the signature")
            salt = pad._salt_length
            if isinstance(salt, padding._MaxLength):
                salt = padding.calculate_max_pss_salt_length(self._pub, hash_alg)
            elif isinstance(salt, padding._DigestLength):
                salt = hash_alg.digest_size
            elif not isinstance(salt, int):
                raise UnsupportedAlgorithmError("PSS.AUTO is only valid for verification")
            mech_hash, mgf = _PSS_HASH[hash_alg.name]
            return Mechanism.RSA_PKCS_PSS, (mech_hash, mgf, salt), digest
        raise UnsupportedAlgorithmError(f"unsupported RSA padding {pad.name}")

    def sign(
        self,
        data: Any,
        padding: padding.AsymmetricPadding,
        algorithm: Any,
    ) -> bytes:
        if not isinstance(algorithm, hashes.HashAlgorithm | utils.Prehashed):
            raise UnsupportedAlgorithmError(
                "RSA signing needs a hash algorithm (NoDigestInfo is not offered)"
            )
        digest, hash_alg = _digest(bytes(data), algorithm)
        mechanism, param, payload = self._mechanism(padding, hash_alg, digest)
        sig = self._raw_sign([payload], mechanism, param)[0]
        pub = self._pub
        _checked(lambda: pub.verify(sig, digest, padding, utils.Prehashed(hash_alg)), self.label)
        return sig

    def _batch_mechanism(self) -> Mechanism:
        return Mechanism.RSA_PKCS

    def _decrypt_op(
        self, ciphertext: bytes, pad: padding.AsymmetricPadding
    ) -> Callable[[pkcs11.Session], bytes]:
        if not isinstance(pad, padding.PKCS1v15):
            raise UnsupportedAlgorithmError(
                f"RSA decryption is offered with PKCS#1 v1.5 only, not {pad.name}"
            )
        size = (self._pub.key_size + 7) // 8
        if len(ciphertext) != size or int.from_bytes(ciphertext, "big") >= self._pub.public_numbers().n:
            raise CiphertextError(f"not an RSA-{self._pub.key_size} ciphertext")
        core, label = self._core, self.label

        def op(_session: pkcs11.Session) -> bytes:
            # Raw RSA (CKM_RSA_X_509), unpadded here: with CKM_RSA_PKCS SoftHSM answers a bad padding with
            # CKR_GENERAL_ERROR, which is a device failure to this layer, so any peer's bytes would have the
            # token re-initialised; raw RSA of a number below n cannot fail on the input.
            return c_decrypt(core.private(label), ciphertext, Mechanism.RSA_X_509)

        return op

    @staticmethod
    def _unpad(block: bytes, size: int) -> bytes:
        """RFC 8017 7.2.2 EME-PKCS1-v1_5 decoding: 0x00 0x02, at least 8 non-zero padding bytes, 0x00, message.
        Callers answering a peer must treat this error as they treat a wrong key (no padding oracle)."""
        block = block.rjust(size, b"\x00")
        separator = block.find(b"\x00", 2)
        if len(block) != size or block[:2] != b"\x00\x02" or separator < 10:
            raise CiphertextError("the decrypted block is not PKCS#1 v1.5 padded")
        return block[separator + 1 :]

    def decrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        """RSA PKCS#1 v1.5 decryption, for a key made with decrypt=True (Token.generate_key). A ciphertext that
        does not decrypt to a padded block raises CiphertextError; a key without CKA_DECRYPT, the token's
        refusal of the operation."""
        size = (self._pub.key_size + 7) // 8
        return self._unpad(
            self._core.thread.call_in(self.lane, self._core.run, self._decrypt_op(ciphertext, padding)), size
        )

    async def adecrypt(self, ciphertext: bytes, padding: padding.AsymmetricPadding) -> bytes:
        op = self._decrypt_op(ciphertext, padding)
        block = await self._core.thread.acall_in(self.lane, self._core.run, op)
        return self._unpad(block, (self._pub.key_size + 7) // 8)

    def private_numbers(self) -> rsa.RSAPrivateNumbers:
        _non_extractable(self.label)


class HsmEd25519PrivateKey(_HsmKey, ed25519.Ed25519PrivateKey):
    def __init__(self, core: TokenSession, label: str, pub: ed25519.Ed25519PublicKey) -> None:
        self._bind(core, label, pub)
        self._pub: ed25519.Ed25519PublicKey = pub

    def public_key(self) -> ed25519.Ed25519PublicKey:
        return self._pub

    def sign(self, data: Any) -> bytes:
        msg = bytes(data)
        return self.check.finish(self._raw_sign([msg], Mechanism.EDDSA)[0], msg)

    def _batch_mechanism(self) -> Mechanism:
        return Mechanism.EDDSA

    def private_bytes_raw(self) -> bytes:
        _non_extractable(self.label)


HsmPrivateKey = HsmEcPrivateKey | HsmRsaPrivateKey | HsmEd25519PrivateKey


def make_key(core: TokenSession, label: str, pub: Any) -> HsmPrivateKey:
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return HsmEcPrivateKey(core, label, pub)
    if isinstance(pub, rsa.RSAPublicKey):
        return HsmRsaPrivateKey(core, label, pub)
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return HsmEd25519PrivateKey(core, label, pub)
    raise UnsupportedAlgorithmError(f"unsupported public key type {type(pub).__name__}")
