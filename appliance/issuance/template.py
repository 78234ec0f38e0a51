"""A hand-built TBSCertificate per profile and CA, equal byte for byte to what cryptography's builder makes.

cryptography only builds a TBS while signing: build_certificate + TbsMaker (a stand-in key that captures the
bytes) cost ~60 us a certificate, a third of the prepare worker's time. Almost all of a birth certificate is the
same for every device of a profile: only the serial number, the validity, the device serial in the subject (and
in the hardwareModuleName), the public key and its key identifier change. So a template is made once per
profile from a reference certificate that cryptography builds with the real profile and CA (every fixed part is
copied from it verbatim), and per certificate only those fields are encoded here.

Equality with cryptography is what makes this safe (the journal records the hash of the TBS the HSM signs, and
relying parties only ever see cryptography-shaped certificates): tests/appliance/issuance/test_template.py
compares both over every builtin profile and the edge cases of each variable field, and at run time the
Preparer compares the first certificate of every template, then one in CHECK_EVERY, with cryptography's, and
on any difference uses cryptography's from then on and says so (an alarm in the service).
"""

from __future__ import annotations

import datetime as dt
import hashlib
from dataclasses import dataclass
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import der
from appliance.issuance.tbs import Tbs, TbsMaker
from appliance.profiles import OID_HARDWARE_MODULE_NAME, Profile, build_certificate, validity

ALARM: Final = "issuance.tbs-template"
"""Raised (warning) by the service when a template was found to differ and was retired."""

CHECK_EVERY: Final = 1024
"""After the first, one certificate in this many per template is also built by cryptography and compared."""

_OID_SERIAL_NUMBER: Final = der.oid("2.5.4.5")
_OID_COMMON_NAME: Final = der.oid("2.5.4.3")
_OID_SKI: Final = der.oid("2.5.29.14")
_OID_SAN: Final = der.oid("2.5.29.17")
_OID_HMN: Final = der.oid(OID_HARDWARE_MODULE_NAME)
_GEN_2050: Final = dt.datetime(2050, 1, 1, tzinfo=dt.UTC)
_GEN_1950: Final = dt.datetime(1950, 1, 1, tzinfo=dt.UTC)

# The reference certificate's variable values; any will do, the fields are found by their position and OID.
_REF_SERIAL: Final = 1 << 100
_REF_DEVICE: Final = "REF"


class TemplateError(Exception):
    """The reference certificate is not of the shape this module can fill in: use cryptography for it."""


def _tlv(tag: bytes, content: bytes) -> bytes:
    # der.tlv without its checks (the tags here are constants): this runs ~14 times a certificate.
    n = len(content)
    if n < 0x80:
        return tag + bytes((n,)) + content
    return tag + der.encode_length(n) + content


_SEQ: Final = b"\x30"
_SET: Final = b"\x31"
_OCTETS: Final = b"\x04"
_CTX0: Final = b"\xa0"
_CTX3: Final = b"\xa3"


def _integer(value: int) -> bytes:
    # Positive: the minimal big-endian octets plus a leading zero octet when the top bit is set.
    return _tlv(b"\x02", value.to_bytes(value.bit_length() // 8 + 1, "big"))


def _time(when: dt.datetime) -> bytes:
    # RFC 5280 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050 (and before 1950), as cryptography does.
    if _GEN_1950 <= when < _GEN_2050:
        return der.tlv(der.TAG_UTC_TIME, when.strftime("%y%m%d%H%M%SZ").encode("ascii"))
    return der.tlv(der.TAG_GENERALIZED_TIME, f"{when.year:04d}{when.strftime('%m%d%H%M%S')}Z".encode("ascii"))


def _children(data: bytes, tlv: der.Tlv) -> list[der.Tlv]:
    return der.read_children(data, tlv)


def _bytes(data: bytes, tlv: der.Tlv) -> bytes:
    return data[tlv.start : tlv.end]


@dataclass(frozen=True)
class _Rdn:
    """The subject's device-serial attribute: its OID TLV and string tag (the rest of the subject is fixed)."""

    oid: bytes
    tag: int


class TbsTemplate:
    """The TBS of one profile under one issuing CA, filled in per certificate by `make`."""

    def __init__(
        self, profile: Profile, issuer_cert: x509.Certificate, maker: TbsMaker, now: dt.datetime
    ) -> None:
        self.profile = profile
        ref_key = ec.generate_private_key(ec.SECP256R1()).public_key()
        try:
            ref = maker.make(
                build_certificate(
                    profile, issuer_cert=issuer_cert, device_serial=_REF_DEVICE, public_key=ref_key,
                    serial_number=_REF_SERIAL, now=now,
                )
            )  # fmt: skip
        except Exception as exc:
            raise TemplateError(f"no reference certificate: {type(exc).__name__}") from exc
        self.signature_algorithm = ref.signature_algorithm
        self._validity: tuple[dt.datetime, bytes] | None = None  # the last `now` and its Validity TLV
        t = ref.tbs
        try:
            fields = _children(t, der.read_tlv(t))
            if len(fields) != 8 or fields[0].tag != 0xA0 or fields[7].tag != 0xA3:
                raise TemplateError("not a v3 TBSCertificate with extensions")
            version, _serial, sigalg, issuer, _validity, subject, _spki, exts = fields
            self._head = _bytes(t, version)
            self._middle = _bytes(t, sigalg) + _bytes(t, issuer)
            self._subject_parts, self._rdn = self._subject(t, subject)
            self._extensions = self._extension_parts(t, exts)
        except ValueError as exc:
            raise TemplateError(f"unexpected reference TBS: {exc}") from exc

    def _subject(self, t: bytes, subject: der.Tlv) -> tuple[list[bytes | None], _Rdn]:
        """The subject's RDNs verbatim, None where the device serial goes (serialNumber, or the Matter CN)."""
        target = _OID_COMMON_NAME if self.profile.kind == "matter-dac" else _OID_SERIAL_NUMBER
        parts: list[bytes | None] = []
        rdn: _Rdn | None = None
        for rdn_set in _children(t, subject):
            (attr,) = _children(t, rdn_set)
            oid, value = _children(t, attr)
            oid_der = _bytes(t, oid)
            if oid_der == target and t[value.content : value.end] == _REF_DEVICE.encode("ascii"):
                if rdn is not None:
                    raise TemplateError("the device serial appears twice in the subject")
                rdn = _Rdn(oid_der, value.tag)
                parts.append(None)
            else:
                parts.append(_bytes(t, rdn_set))
        if rdn is None:
            raise TemplateError("no device serial in the subject")
        return parts, rdn

    def _extension_parts(self, t: bytes, exts: der.Tlv) -> list[bytes | str]:
        """Every extension verbatim, or "ski" / "san" where the per-device ones go."""
        (seq,) = _children(t, exts)
        out: list[bytes | str] = []
        for ext in _children(t, seq):
            parts = _children(t, ext)
            oid = _bytes(t, parts[0])
            if oid == _OID_SKI:
                if len(parts) != 2:
                    raise TemplateError("a critical subjectKeyIdentifier")
                out.append("ski")
            elif oid == _OID_SAN:
                if len(parts) != 2 or self.profile.hardware_module_name is None:
                    raise TemplateError("a subjectAltName that is not the hardwareModuleName")
                self._hw_type = der.oid(self.profile.hardware_module_name)
                out.append("san")
            else:
                out.append(_bytes(t, ext))
        if "ski" not in out:
            raise TemplateError("no subjectKeyIdentifier")
        return out

    def make(self, *, device_serial: str, spki_der: bytes, serial_number: int, now: dt.datetime) -> Tbs:
        """The TBS for one device. `spki_der`: the SubjectPublicKeyInfo as cryptography encodes the key
        (public_bytes(DER, SubjectPublicKeyInfo)); `device_serial` already checked against the profile."""
        serial_ascii = device_serial.encode("ascii")
        cached = self._validity
        if cached is not None and cached[0] == now:
            validity_der = cached[1]  # a batch shares its `now`
        else:
            not_before, not_after = validity(self.profile, now)
            validity_der = _tlv(_SEQ, _time(not_before) + _time(not_after))
            self._validity = (now, validity_der)
        rdn = _tlv(_SET, _tlv(_SEQ, self._rdn.oid + _tlv(bytes((self._rdn.tag,)), serial_ascii)))
        subject = _tlv(_SEQ, b"".join(p if p is not None else rdn for p in self._subject_parts))
        exts: list[bytes] = []
        for part in self._extensions:
            if part == "ski":
                # RFC 5280 4.2.1.2 method (1), as cryptography's from_public_key: SHA-1 of the subjectPublicKey
                # BIT STRING's value (without its unused-bits octet).
                bits = _children(spki_der, der.read_tlv(spki_der))[1]
                ski = hashlib.sha1(spki_der[bits.content + 1 : bits.end], usedforsecurity=False).digest()
                exts.append(_tlv(_SEQ, _OID_SKI + _tlv(_OCTETS, _tlv(_OCTETS, ski))))
            elif part == "san":
                value = _tlv(_SEQ, self._hw_type + _tlv(_OCTETS, serial_ascii))
                other = _tlv(_CTX0, _OID_HMN + _tlv(_CTX0, value))
                exts.append(_tlv(_SEQ, _OID_SAN + _tlv(_OCTETS, _tlv(_SEQ, other))))
            else:
                assert isinstance(part, bytes)
                exts.append(part)
        body = b"".join((self._head, _integer(serial_number), self._middle, validity_der, subject, spki_der,
                         _tlv(_CTX3, _tlv(_SEQ, b"".join(exts)))))  # fmt: skip
        return Tbs(_tlv(_SEQ, body), self.signature_algorithm)


def spki_of(public_key: Any) -> bytes:
    """The SubjectPublicKeyInfo cryptography's builder puts in a certificate for `public_key`."""
    return bytes(
        public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
