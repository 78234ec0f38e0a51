"""EST payloads (RFC 7030 4, as RFC 8951 3 clarifies them): pure code, bytes in, bytes out; no I/O.

Every EST body is base64 (RFC 4648 section 4) of DER, whatever a Content-Transfer-Encoding header says (RFC 8951
deprecates it: HTTP is 8-bit clean, the header is ignored here and never sent). A request body may have line
breaks or other ASCII whitespace anywhere and may be wrapped in PEM armour (`openssl req` writes that); its
padding may be left out. Answers are base64 in lines of 64 characters, as PEM bodies are, which `base64 -d` and
`openssl base64 -d` both read.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from appliance.errors import ReasonCode
from appliance.est.errors import EstError

CT_PKCS10: Final = "application/pkcs10"
CT_CERTS_ONLY: Final = "application/pkcs7-mime; smime-type=certs-only"
CT_CSRATTRS: Final = "application/csrattrs"
CT_PKCS8: Final = "application/pkcs8"
CT_TEXT: Final = "text/plain; charset=utf-8"

_WHITESPACE: Final = re.compile(rb"[ \t\r\n\v\f]+")
_PEM: Final = re.compile(
    rb"\A\s*-----BEGIN (?P<label>[A-Z0-9 ]{1,40})-----(?P<body>[A-Za-z0-9+/=\s]*)-----END (?P=label)-----\s*\Z"
)
_CSR_LABELS: Final = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")
LINE: Final = 64


def decode_body(data: bytes, what: str = "the CSR") -> bytes:
    """The DER an EST request body carries (see the module docstring). EstError 400 BAD_CSR when it is not
    base64 (the message says what was expected, never echoes the input)."""
    if data.lstrip().startswith(b"-----BEGIN"):
        pem = _PEM.match(data)
        if pem is None or pem.group("label") not in _CSR_LABELS:
            raise EstError(f"{what}: PEM armour accepted only as one CERTIFICATE REQUEST block with nothing"
                           " around it; send the base64 of the DER (RFC 7030 4.2.1)", ReasonCode.BAD_CSR)  # fmt: skip
        data = pem.group("body")
    text = _WHITESPACE.sub(b"", data)
    if not text:
        raise EstError(f"{what}: the body is empty", ReasonCode.BAD_CSR)
    if b"=" not in text:
        text += b"=" * (-len(text) % 4)  # padding left out
    try:
        der = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EstError(f"{what} is not base64 (RFC 4648 section 4) of DER, as RFC 7030 4.2.1 and RFC 8951"
                       " require", ReasonCode.BAD_CSR) from None  # fmt: skip
    if not der:
        raise EstError(f"{what}: the body is empty", ReasonCode.BAD_CSR)
    return der


def encode_body(der: bytes, eol: bytes = b"\n") -> bytes:
    """base64 of `der` in lines of 64 characters, each ended by `eol`."""
    text = base64.b64encode(der)
    return b"".join(text[i : i + LINE] + eol for i in range(0, len(text), LINE))


def certs_only(certificates: Sequence[x509.Certificate]) -> bytes:
    """A degenerate CMS SignedData holding `certificates` and nothing else (RFC 7030 4.1.3, 4.2.3: a CMC Simple
    PKI Response, "certs-only"), DER."""
    return pkcs7.serialize_certificates(list(certificates), serialization.Encoding.DER)


def multipart(parts: Sequence[tuple[str, bytes]], boundary: str) -> tuple[str, bytes]:
    """A multipart/mixed body (RFC 7030 4.4.2) of (content type, DER) parts, each base64 in CRLF lines; returns
    the Content-Type header value and the body. `boundary` must not occur in base64 text (use a "-" in it)."""
    body = b"".join(
        b"--%s\r\nContent-Type: %s\r\n\r\n%s" % (boundary.encode(), ctype.encode(), encode_body(der, b"\r\n"))
        for ctype, der in parts
    )
    return f"multipart/mixed; boundary={boundary}", body + b"--%s--\r\n" % boundary.encode()
