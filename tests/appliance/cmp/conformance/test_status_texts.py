"""Review finding 5: every statusString the server sends is its own fixed text - what is wrong and the bound
that applies - never a library's repr or exception text (pyasn1 constraint objects, cryptography's parse
errors, DuplicateExtension, aiohttp's connection errors). Each case sends what a faulty or hostile client would
and reads every text of the answer."""

from __future__ import annotations

import dataclasses
import os
import re

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from appliance.cmp import BodyType, FailInfo, P10crBody, PKIHeader, PKIMessage, _der, oids, parse_message
from appliance.cmp.build import assemble, encode_header
from appliance.cmp.model import AlgorithmIdentifier
from appliance.cmp.protection import pbm_parameters, pbmac1_parameters
from appliance.cmp.server import CmpLabel
from tests.appliance.cmp.conformance.peer import (
    Peer,
    SoftCa,
    build,
    cert_request,
    header,
    mac,
    new_key,
    resign,
    serial_name,
    statuses,
    twice_ski,
)

DER = serialization.Encoding.DER
# What library texts look like: reprs (<...>), exception class names, pyasn1 and cryptography vocabulary.
LIBRARY = re.compile(r"<|>|Error\b|Exception|Constraint|TagSet|Duplicate|deserialize|ParseError|object at|Traceback|"
                     r"errno|codec|asn1Spec|PyAsn1|InvalidVersion")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class OddMac:
    """A MAC protector with whatever protectionAlg parameters a hostile client chooses (and a MAC of zeros)."""

    oid: str
    parameters: bytes | None
    sender_kid: bytes = b"mac"

    @property
    def extra_certs(self) -> tuple[x509.Certificate, ...]:
        return ()

    def prepare(self, h: PKIHeader) -> PKIHeader:
        return dataclasses.replace(h, protection_alg=AlgorithmIdentifier(self.oid, self.parameters),
                                   sender_kid=self.sender_kid)  # fmt: skip

    def protect(self, h: PKIHeader, protected_part: bytes) -> bytes:
        return bytes(32)


def _texts(answer: PKIMessage) -> list[str]:
    return [t for s in statuses(answer) for t in s.status_string]


def _own(answer: PKIMessage) -> tuple[frozenset[FailInfo], str]:
    (status,) = statuses(answer)
    texts = _texts(answer)
    assert texts and all(not LIBRARY.search(t) for t in texts), texts
    return status.fail_info, " ".join(texts)


def _ir(protector: object) -> PKIMessage:
    return build(header(), BodyType.IR, cert_request("SN-0901", new_key()), protector)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("case", "oid", "parameters", "says"),
    [
        ("PBM salt of 129 bytes", oids.PASSWORD_BASED_MAC, pbm_parameters(os.urandom(129), 1000), "128"),
        ("PBM parameters NULL", oids.PASSWORD_BASED_MAC, _der.null(), "PBMParameter"),
        ("PBM parameters absent", oids.PASSWORD_BASED_MAC, None, "missing"),
        ("PBMAC1 with 0 iterations", oids.PBMAC1, pbmac1_parameters(os.urandom(16), 0), "100"),
        ("PBMAC1 parameters garbage", oids.PBMAC1, b"\x30\x03\x02\x01\x05", "PBMAC1"),
        ("PBMAC1 key length 8", oids.PBMAC1, pbmac1_parameters(os.urandom(16), 1000, 8), "16 to 64"),
    ],
)
async def test_mac_parameters(peer: Peer, case: str, oid: str, parameters: bytes | None, says: str) -> None:
    fail, text = _own(await peer.post(_ir(OddMac(oid, parameters))))
    assert fail == {FailInfo.BAD_ALG} and says in text, (case, text)


async def test_a_p10cr_csr_with_two_subject_alternative_names(peer: Peer) -> None:
    key = new_key()
    san = x509.SubjectAlternativeName([x509.DNSName("a.example")])
    builder = x509.CertificateSigningRequestBuilder().subject_name(serial_name("SN-0902"))
    builder = twice_ski(builder.add_extension(san, critical=False), key.public_key())  # type: ignore[assignment]
    draft = builder.sign(key, hashes.SHA256())  # type: ignore[union-attr]
    csr = x509.load_der_x509_csr(resign(draft.public_bytes(DER), draft.tbs_certrequest_bytes, key))
    fail, text = _own(await peer.post(build(header(), BodyType.P10CR, P10crBody(csr), mac())))
    assert fail == {FailInfo.BAD_DATA_FORMAT} and "extension" in text, text


async def test_bytes_that_are_no_pki_message(peer: Peer) -> None:
    """The unprotected 400 answers: a body pyasn1 refuses, a certificate cryptography refuses, bad UTF-8."""
    good = _ir(mac())
    header_der = encode_header(mac().prepare(header()))
    junk_cert = _der.sequence(_der.sequence(_der.integer(1)), _der.sequence(), _der.tlv(0x03, b"\x00"))
    utf8 = encode_header(mac().prepare(dataclasses.replace(header(), free_text=("x",))))
    assert utf8.count(b"\x0c\x01x") == 1
    cases = {
        "an ir body that is no CertReqMessages": assemble(
            header_der, _der.context_cons(0, _der.sequence(_der.integer(5))), bytes(32), ()
        ),
        "a certificate in extraCerts that does not load": _der.sequence(
            good.header_der, good.body_der, _der.context_cons(0, _der.tlv(0x03, b"\x00" + bytes(32))),
            _der.context_cons(1, _der.sequence(junk_cert)),
        ),
        "freeText that is not UTF-8": assemble(utf8.replace(b"\x0c\x01x", b"\x0c\x01\xff"), good.body_der,
                                               bytes(32), ()),
    }  # fmt: skip
    for case, data in cases.items():
        status, body = await peer.post_bytes(data)
        assert status == 400, case
        fail, text = _own(parse_message(body))
        assert fail == {FailInfo.BAD_DATA_FORMAT}, (case, text)


async def test_template_and_key_that_do_not_decode(peer: Peer) -> None:
    from appliance.cmp import CertReqBody, CertTemplate, make_cert_request

    key = new_key()
    odd_ext = cert_request("SN-0903", key, extensions_der=_der.sequence(_der.sequence(_der.integer(7))))
    status, body = await peer.post_bytes(build(header(), BodyType.IR, odd_ext, mac()).der)
    fail, text = _own(parse_message(body))  # pyasn1 refuses it with the body (400), or the enroller
    assert fail in ({FailInfo.BAD_DATA_FORMAT}, {FailInfo.BAD_CERT_TEMPLATE}), (status, text)
    junk_key = CertTemplate(subject=serial_name("SN-0903"), public_key_der=_der.sequence(_der.sequence(
        _der.oid("1.2.840.10045.2.1"), _der.oid("1.2.840.10045.3.1.7")), _der.tlv(0x03, b"\x00\x04junk")))  # fmt: skip
    body = CertReqBody((make_cert_request(junk_key, pop_key=None),))
    fail, text = _own(await peer.post(build(header(), BodyType.IR, body, mac())))
    assert fail in ({FailInfo.BAD_CERT_TEMPLATE}, {FailInfo.BAD_POP}), text


async def test_a_crl_that_cannot_be_fetched(peer: Peer) -> None:
    """The signer's revocation status is unknown because its CRL distribution point does not answer: the text
    names the URL (from the signer's own certificate) and says what failed, in our words."""
    from appliance.cmp import SignatureProtector

    vendor = SoftCa("Vendor CA")
    peer.responder.labels["vendor"] = CmpLabel("vendor", "fixture-1", trusted_cas=(vendor.cert,))
    key = new_key()
    cert = vendor.issue(serial_name("station"), key.public_key(), crl_url="http://127.0.0.1:9/none.crl")
    signer = SignatureProtector(key, cert, (vendor.cert,))
    answer = await peer.post(build(header(cert.subject), BodyType.IR, cert_request("SN-0904", new_key()), signer),
                             "vendor")  # fmt: skip
    fail, text = _own(answer)
    assert fail == {FailInfo.SIGNER_NOT_TRUSTED} and "127.0.0.1:9" in text, text
