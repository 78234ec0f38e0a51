"""The bounded HTTP listener over TLS (appliance.httplisten with `tls`, as the EST listener uses it), with real
sockets and real TLS on loopback: requests are served with the TLS session visible to the handler; the caps
refuse without writing plaintext into a TLS connection; the header deadline covers the TLS handshake, and the
body and idle deadlines work through TLS as they do in the clear. Waits are for conditions (the server closing
the socket, an answer), with a generous guard against a hang."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.alarms import Alarms
from appliance.connections import HttpLimits
from appliance.httplisten import HttpListener, TlsServing

GUARD_S = 20.0  # a hang guard only


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey, *, ca: bool,
    eku: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
    return b.sign(signer, hashes.SHA256())


class Pki:
    """A CA, a server certificate for localhost and a client certificate, in files."""

    def __init__(self, where: Path) -> None:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _cert("Test CA", ca_key, "Test CA", ca_key, ca=True)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = _cert(
            "localhost", server_key, "Test CA", ca_key, ca=False, eku=ExtendedKeyUsageOID.SERVER_AUTH
        )
        self.client_key = ec.generate_private_key(ec.SECP256R1())
        self.client = _cert("a client", self.client_key, "Test CA", ca_key, ca=False,
                            eku=ExtendedKeyUsageOID.CLIENT_AUTH)  # fmt: skip
        pem = serialization.Encoding.PEM
        key_pem = (
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.ca_file = where / "ca.pem"
        self.ca_file.write_bytes(ca.public_bytes(pem))
        self.server_cert, self.server_key = where / "server.pem", where / "server.key"
        self.server_cert.write_bytes(server.public_bytes(pem))
        self.server_key.write_bytes(server_key.private_bytes(*key_pem))
        self.client_cert, self.client_key_file = where / "client.pem", where / "client.key"
        self.client_cert.write_bytes(self.client.public_bytes(pem))
        self.client_key_file.write_bytes(self.client_key.private_bytes(*key_pem))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.server_cert, self.server_key)
        ctx.load_verify_locations(cafile=str(self.ca_file))
        ctx.verify_mode = ssl.CERT_OPTIONAL
        return ctx

    def client_context(self, *, with_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        if with_cert:
            ctx.load_cert_chain(self.client_cert, self.client_key_file)
        return ctx


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


class Conn:
    """A TLS client connection (asyncio streams) from a chosen 127.0.0.x source address."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, server: HttpListener, ctx: ssl.SSLContext | None, source: str = "127.0.0.1") -> Conn:
        host, port = server.address
        reader, writer = await asyncio.open_connection(
            host, port, local_addr=(source, 0), ssl=ctx, server_hostname="localhost" if ctx else None
        )
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def closed_by_server(self) -> bytes:
        async with asyncio.timeout(GUARD_S):
            try:
                return await self.reader.read()
            except (ConnectionError, ssl.SSLError):
                return b""
            finally:
                self.writer.transport.abort()

    async def response(self) -> bytes:
        async with asyncio.timeout(GUARD_S):
            head = await self.reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            return head + await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.transport.abort()


GET = b"GET /who HTTP/1.1\r\nHost: x\r\n\r\n"


class App:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.release.set()
        self.bodies: list[bytes] = []

    def build(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/who", self.who)
        app.router.add_post("/echo", self.echo)
        app.router.add_post("/slow", self.slow)
        return app

    async def who(self, request: web.Request) -> web.Response:
        """The TLS session as a handler sees it: the version and the client certificate's subject, if any."""
        tls = request.transport.get_extra_info("ssl_object") if request.transport is not None else None
        if tls is None:
            return web.Response(text="plain")
        der = tls.getpeercert(binary_form=True)
        peer = x509.load_der_x509_certificate(der).subject.rfc4514_string() if der else "-"
        return web.Response(text=f"{tls.version()} {peer}")

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        self.bodies.append(body)
        return web.Response(body=body)

    async def slow(self, request: web.Request) -> web.Response:
        body = await request.read()
        await self.release.wait()
        return web.Response(body=body)


@contextlib.asynccontextmanager
async def listener(
    pki: Pki, limits: HttpLimits, app: App | None = None, handshake_s: float = 10.0, grace_s: float = 1.0
) -> AsyncIterator[tuple[HttpListener, Alarms]]:
    alarms = Alarms()
    app = app or App()
    tls = TlsServing(pki.server_context(), handshake_s)
    async with HttpListener(app.build(), "127.0.0.1", 0, limits=limits, name="tls", alarms=alarms,
                            tls=tls, grace_s=grace_s) as server:  # fmt: skip
        yield server, alarms


async def wait_until(cond: object) -> None:
    async with asyncio.timeout(GUARD_S):
        while not cond():  # type: ignore[operator]
            await asyncio.sleep(0.01)


LONG = HttpLimits(
    max_connections=4, max_connections_per_peer=2, header_timeout_s=60, body_timeout_s=60, idle_timeout_s=60
)
SHORT = HttpLimits(
    max_connections=16, max_connections_per_peer=16, header_timeout_s=0.5, body_timeout_s=0.5,
    idle_timeout_s=0.5,
)  # fmt: skip


async def test_requests_are_served_over_tls_with_the_session_visible(pki: Pki) -> None:
    async with listener(pki, LONG) as (server, _):
        assert server.url.startswith("https://127.0.0.1:")
        anonymous = await Conn.open(server, pki.client_context())
        await anonymous.send(GET)
        assert (await anonymous.response()).endswith(b" -")
        with_cert = await Conn.open(server, pki.client_context(with_cert=True))
        for _ in range(2):  # keep-alive through TLS
            await with_cert.send(GET)
            answer = await with_cert.response()
            assert answer.split(b"\r\n\r\n", 1)[1].startswith(b"TLSv1.")
            assert answer.endswith(b"CN=a client")
        anonymous.close()
        with_cert.close()


async def test_plaintext_http_on_the_tls_port_gets_no_answer(pki: Pki) -> None:
    async with listener(pki, LONG) as (server, _):
        plain = await Conn.open(server, None)
        await plain.send(GET)
        assert b"HTTP/1.1 200" not in await plain.closed_by_server()


async def test_cap_per_peer_closes_without_writing_plaintext(pki: Pki) -> None:
    async with listener(pki, LONG) as (server, _):
        held = [await Conn.open(server, pki.client_context(), "127.0.0.2") for _ in range(2)]
        await wait_until(lambda: server.gate.open == 2)
        host, port = server.address
        reader, writer = await asyncio.open_connection(host, port, local_addr=("127.0.0.2", 0))
        async with asyncio.timeout(GUARD_S):
            refused = await reader.read()
        writer.close()
        assert refused == b""  # a plaintext 503 would be garbage to a TLS client
        assert server.gate.counters["refused_peer"] == 1
        other = await Conn.open(server, pki.client_context(), "127.0.0.3")
        await other.send(GET)
        assert b" 200 " in await other.response()
        for c in [*held, other]:
            c.close()


async def test_global_cap_displaces_a_connection_that_never_sent_a_request(pki: Pki) -> None:
    """Over TLS as over plain HTTP (each address's lone connection displaceable once past its grace, here none:
    the grace itself is tested in test_http_listener.py)."""
    async with listener(pki, LONG, grace_s=0.0) as (server, alarms):
        idle = []
        for i in range(4):
            idle.append(await Conn.open(server, pki.client_context(), f"127.0.0.{10 + i}"))
            await wait_until(lambda n=i: server.gate.open == n + 1)
        newcomer = await Conn.open(server, pki.client_context(), "127.0.0.20")
        await newcomer.send(GET)
        assert b" 200 " in await newcomer.response()
        assert await idle[0].closed_by_server() == b""
        assert server.gate.counters["displaced"] == 1
        assert alarms.get("listener.tls.full") is not None
        for c in [*idle, newcomer]:
            c.close()


async def test_a_stalled_handshake_and_unfinished_headers_are_closed(pki: Pki) -> None:
    """The header deadline runs from accept: a peer that never starts TLS, and one that finished TLS but not
    its headers, are both closed."""
    async with listener(pki, SHORT) as (server, _):
        host, port = server.address
        reader, writer = await asyncio.open_connection(host, port)  # TCP only: no ClientHello
        half = await Conn.open(server, pki.client_context())
        await half.send(b"GET /who HTTP/1.1\r\nHost: x\r\n")
        async with asyncio.timeout(GUARD_S):
            assert await reader.read() == b""
        writer.close()
        assert await half.closed_by_server() == b""
        await wait_until(lambda: server.gate.counters.get("timeout_headers", 0) == 2)
        await wait_until(lambda: server.gate.open == 0)


async def test_a_slow_body_and_an_idle_keep_alive_are_closed_but_a_busy_handler_is_not(pki: Pki) -> None:
    app = App()
    async with listener(pki, SHORT, app) as (server, _):
        stalled = await Conn.open(server, pki.client_context())
        await stalled.send(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nxx")
        assert await stalled.closed_by_server() == b""
        assert server.gate.counters["timeout_body"] == 1 and app.bodies == []

        c = await Conn.open(server, pki.client_context())
        for _ in range(3):  # each request re-arms the deadlines, its bytes arriving through TLS
            await c.send(GET)
            assert b" 200 " in await c.response()
        assert await c.closed_by_server() == b""
        assert server.gate.counters["timeout_idle"] == 1

        app.release.clear()
        slow = await Conn.open(server, pki.client_context())
        await slow.send(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nok")
        await asyncio.sleep(1.5)  # three times every timeout of this listener
        assert not slow.reader.at_eof()
        app.release.set()
        assert (await slow.response()).endswith(b"ok")
        slow.close()


async def test_the_next_request_after_idle_gets_the_header_deadline(pki: Pki) -> None:
    """Bytes of a second request arriving through TLS move the connection from idle to the header deadline,
    so it is closed when those headers stall, as in the clear."""
    async with listener(pki, SHORT) as (server, _):
        c = await Conn.open(server, pki.client_context())
        await c.send(GET)
        assert b" 200 " in await c.response()
        await c.send(b"GET /who HTTP/1.1\r\n")
        assert await c.closed_by_server() == b""
        assert server.gate.counters.get("timeout_headers", 0) == 1
        assert server.gate.counters.get("timeout_idle", 0) == 0
