"""A small EST client (RFC 7030 with RFC 8951) for fixture software: cacerts, csrattrs, simpleenroll and
simplereenroll over one kept-alive TLS connection, with the Python standard library (http.client, ssl) and
`cryptography`. It is written to be read and copied: no appliance code, no framework.

    client = EstClient("https://127.0.0.1:7454/.well-known/est", cafile="management-ca.crt",
                       username="fixture", password=b"...")          # or cert=..., key=... (a TLS certificate)
    chain = client.cacerts()
    key = ec.generate_private_key(ec.SECP256R1())
    cert = client.enroll(key, "MYDEV-0001")                          # builds the CSR, posts simpleenroll
    new = client.reenroll(new_key, cert)                             # needs cert/key as the TLS identity

Channel binding (RFC 7030 3.5): `enroll(..., bind=True)` puts the connection's tls-unique value in the CSR's
challengePassword. tls-unique exists under TLS 1.2 only, and the standard library has no tls-exporter for TLS
1.3, so a client that binds is built with `max_tls12=True`.

A refusal raises EstRefused with the HTTP status, the server's one-line reason and Retry-After (202 from a
product in upstream mode: send the same CSR again after `retry_after_s`).
"""

from __future__ import annotations

import base64
import http.client
import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import AttributeOID, NameOID

from stations.codes import Code
from stations.errors import StationError

_REASON = re.compile(r"[A-Z_]+ \((\d{1,3})\): ")
MAX_ANSWER = 256 * 1024  # an EST answer is a few certificates; anything longer is not read


class EstRefused(StationError):
    """The EST server answered with something other than 200."""

    def __init__(self, status: int, text: str, retry_after_s: float | None = None) -> None:
        super().__init__(_code(status, text), f"HTTP {status}: {text}")
        self.status = status
        self.reason = text
        self.retry_after_s = retry_after_s


def _code(status: int, text: str) -> Code:
    """The reason code a Birthline server puts first in its text ("NOT_AUTHORISED (6): ..."), so a fixture shows
    the same code as the station protocol would; another server's text: BAD_REQUEST, or BUSY for 202 and 5xx."""
    match = _REASON.match(text)
    if match is not None:
        try:
            return Code(int(match.group(1)))
        except ValueError:
            pass
    return Code.BUSY if status == 202 or status >= 500 else Code.BAD_REQUEST


@dataclass(frozen=True)
class _Answer:
    status: int
    body: bytes
    retry_after: str | None


def _certificates(body: bytes) -> list[x509.Certificate]:
    """A certs-only answer: base64 (line breaks allowed) of a degenerate PKCS#7."""
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(b"".join(body.split())))


class EstClient:
    """One EST server (the /.well-known/est URL, or /.well-known/est/<label>), one kept-alive connection."""

    def __init__(
        self,
        url: str,
        *,
        cafile: str | Path,
        cert: str | Path | None = None,
        key: str | Path | None = None,
        username: str | None = None,
        password: bytes | None = None,
        max_tls12: bool = False,
        timeout_s: float = 60.0,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or parts.hostname is None:
            raise ValueError("EST is served over https only")
        self.host, self.port, self.path = parts.hostname, parts.port or 443, parts.path.rstrip("/")
        self.context = ssl.create_default_context(cafile=str(cafile))
        if max_tls12:
            self.context.maximum_version = ssl.TLSVersion.TLSv1_2
        if cert is not None:
            self.context.load_cert_chain(str(cert), None if key is None else str(key))
        self.authorization = None
        if username is not None and password is not None:
            self.authorization = "Basic " + base64.b64encode(username.encode() + b":" + password).decode()
        self.timeout_s = timeout_s
        self._conn: http.client.HTTPSConnection | None = None

    # -- the connection ---------------------------------------------------------------------------------------
    def connect(self) -> http.client.HTTPSConnection:
        if self._conn is None:
            self._conn = http.client.HTTPSConnection(self.host, self.port, context=self.context,
                                                     timeout=self.timeout_s)  # fmt: skip
            self._conn.connect()
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> EstClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def tls_unique(self) -> bytes:
        """This connection's tls-unique value (TLS 1.2), for a CSR's challengePassword."""
        sock = self.connect().sock
        value = sock.get_channel_binding("tls-unique") if isinstance(sock, ssl.SSLSocket) else None
        if value is None:
            raise ValueError(
                "no tls-unique on this connection (TLS 1.3?): build the client with max_tls12=True"
            )
        return value

    def _request(self, method: str, operation: str, body: bytes | None = None) -> _Answer:
        headers = {"Content-Type": "application/pkcs10"} if body is not None else {}
        if self.authorization is not None and body is not None:
            headers["Authorization"] = self.authorization
        for attempt in (1, 2):
            conn = self.connect()
            try:
                conn.request(method, f"{self.path}/{operation}", body=body, headers=headers)
                answer = conn.getresponse()
                data = answer.read(MAX_ANSWER + 1)
                retry = answer.getheader("Retry-After")
                if answer.will_close or len(data) > MAX_ANSWER:
                    self.close()
                return _Answer(answer.status, data[:MAX_ANSWER], retry)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                # The server closed a kept-alive connection between requests (its idle deadline): once more on
                # a new one. A CSR bound to the old connection then fails its binding check, and says so.
                self.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def _ok(self, answer: _Answer) -> bytes:
        if answer.status != 200:
            retry = float(answer.retry_after) if answer.retry_after and answer.retry_after.isdigit() else None
            text = answer.body.decode("utf-8", "replace").strip()[:500]
            raise EstRefused(answer.status, text, retry)
        return answer.body

    # -- the operations ------------------------------------------------------------------------------------------
    def cacerts(self) -> list[x509.Certificate]:
        return _certificates(self._ok(self._request("GET", "cacerts")))

    def csrattrs(self) -> bytes:
        """The DER of the server's CsrAttrs (RFC 7030 4.5.2)."""
        return base64.b64decode(b"".join(self._ok(self._request("GET", "csrattrs")).split()))

    def simpleenroll(self, csr_der: bytes) -> x509.Certificate:
        return _certificates(self._ok(self._request("POST", "simpleenroll", base64.encodebytes(csr_der))))[0]

    def simplereenroll(self, csr_der: bytes) -> x509.Certificate:
        return _certificates(self._ok(self._request("POST", "simplereenroll", base64.encodebytes(csr_der))))[
            0
        ]

    def csr(self, key: CertificateIssuerPrivateKeyTypes, subject: x509.Name, *, bind: bool = False) -> bytes:
        """A CSR for `key` (DER); with `bind`, carrying this connection's tls-unique (RFC 7030 3.5)."""
        builder = x509.CertificateSigningRequestBuilder().subject_name(subject)
        if bind:
            builder = builder.add_attribute(
                AttributeOID.CHALLENGE_PASSWORD, base64.b64encode(self.tls_unique())
            )
        algorithm = None if _no_digest(key) else hashes.SHA256()
        return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)

    def enroll(
        self, key: CertificateIssuerPrivateKeyTypes, serial: str, *, bind: bool = False
    ) -> x509.Certificate:
        """simpleenroll for device `serial` (the subject's serialNumber; the appliance's profile builds the rest)."""
        subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)])
        return self.simpleenroll(self.csr(key, subject, bind=bind))

    def reenroll(
        self, key: CertificateIssuerPrivateKeyTypes, current: x509.Certificate, *, bind: bool = False
    ) -> x509.Certificate:
        """simplereenroll of `current` with the new `key`: the CSR has `current`'s subject. The client must have
        been built with `current` and its key as the TLS certificate."""
        return self.simplereenroll(self.csr(key, current.subject, bind=bind))


def _no_digest(key: CertificateIssuerPrivateKeyTypes) -> bool:
    return isinstance(key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey)


__all__ = ["EstClient", "EstRefused"]
