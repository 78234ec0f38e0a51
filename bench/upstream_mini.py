"""The minimal CMP upstream and the delay relay of bench/upstream.py, each in a process of its own.

    python bench/upstream_mini.py serve RA_CERT_PEM
    python bench/upstream_mini.py relay TARGET_PORT ONE_WAY_S

Each prints ONE JSON line on stdout once it listens on 127.0.0.1 (`serve`: {"port": ..., "cert": PEM of its
signer}; `relay`: {"port": ...}), answers each line "stats" on stdin with one JSON line of its counters and its
own CPU time (user + system, all threads), and exits when stdin closes (the bench closed it, or died).

`serve` is as little as a CA can do and still answer correctly. What it checks, for each POST:
- the message parses (appliance.cmp.parse_message: strict DER framing, the header and body field by field, each
  inner message of a nested body too, CSRs through cryptography's loader);
- its protection is a signature that verifies with the certificate it carries first in extraCerts, senderKID
  names that certificate, and that certificate IS the bench's RA certificate (RA_CERT_PEM): a CA trusts its RA;
- for a nested message, the outer signature is that check. The inner messages are NOT verified again: the outer
  signature covers their exact bytes, and each must carry the same sender and the same senderKID as the outer
  one (the same RA key), so a second verification of each would prove nothing more;
- a p10cr's CSR signature is verified (proof of possession) once per distinct CSR, and the certificate issued for
  that CSR is made once and cached: the bench reuses 1,000 CSRs, and a CA answering the same key with the same
  certificate is what the forwarder must accept anyway (a retry is answered so);
- a certConf is answered pkiConf (its certHash is not compared: the forwarder's side is what is measured);
  implicitConfirm is granted to a request that asks for it (then no certConf follows).
Every answer (each inner one and the outer nested one) is signed with its own software EC P-256 key: they carry
fresh senderNonces and the request's recipNonce, so no signature can be computed ahead or cached.

`relay` is a link with a propagation delay: a TCP relay that forwards each chunk ONE_WAY_S after it arrived, in
order, both ways (no bandwidth limit; netem is not available on these machines).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import resource
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.cmp import (
    BodyType,
    CertRepBody,
    CertResponse,
    CmpError,
    NestedBody,
    NestedItem,
    P10crBody,
    PkiConfBody,
    PKIMessage,
    PKIStatusInfo,
    SignatureProtector,
    build_message,
    parse_message,
    response_header,
    verify_signature,
)
from appliance.cmp.build import build_messages
from appliance.cmp.model import PKIHeader
from bench.stdin_control import until_stdin_closes


def cpu_s() -> float:
    """This process's CPU time so far, every thread: user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def self_signed_ca(common_name: str, key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


class Refused(Exception):
    """A request this upstream does not answer (the bench treats any as a failed run)."""


class MiniUpstream:
    """See the module docstring: the checks, the caches, one signature per answer."""

    def __init__(self, ra_cert: x509.Certificate) -> None:
        self.ra_cert = ra_cert
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = self_signed_ca("Bench Upstream CA", self.key)
        self.protector = SignatureProtector(self.key, self.cert)
        self.sender = x509.DirectoryName(self.cert.subject)
        self.issued_for: dict[bytes, x509.Certificate] = {}  # CSR DER -> the certificate issued for it
        self.stats = {"requests": 0, "inner": 0, "issued": 0, "confirmed": 0, "certificates_made": 0,
                      "refused": 0}  # fmt: skip

    def _trusted(self, msg: PKIMessage) -> None:
        if verify_signature(msg) != self.ra_cert:
            raise Refused("not signed by the bench's RA")

    def _same_signer(self, inner: PKIMessage, outer: PKIHeader) -> None:
        h = inner.header
        if h.protection_alg is None or h.sender != outer.sender or h.sender_kid != outer.sender_kid:
            raise Refused("an inner message from another sender than the nested one's")

    def _certificate(self, body: P10crBody, der: bytes) -> x509.Certificate:
        csr_der = body.csr.public_bytes(serialization.Encoding.DER)
        cert = self.issued_for.get(csr_der)
        if cert is None:
            if not body.csr.is_signature_valid:
                raise Refused("the CSR's signature does not verify")
            now = dt.datetime.now(dt.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(body.csr.subject)
                .issuer_name(self.cert.subject)
                .public_key(body.csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now)
                .not_valid_after(now + dt.timedelta(days=3650))
                .sign(self.key, hashes.SHA256())
            )
            self.issued_for[csr_der] = cert
            self.stats["certificates_made"] += 1
        return cert

    def _answer_spec(self, msg: PKIMessage) -> tuple[PKIHeader, BodyType, Any]:
        # implicitConfirm is granted when the request asks for it (response_header grants it only then)
        header = response_header(msg.header, sender=self.sender, implicit_confirm=True)
        if isinstance(msg.body, P10crBody):
            self.stats["issued"] += 1
            cert = self._certificate(msg.body, msg.der)
            return header, BodyType.CP, CertRepBody((CertResponse(0, PKIStatusInfo.accepted(), cert),))
        if msg.body_type is BodyType.CERTCONF:
            self.stats["confirmed"] += 1
            return header, BodyType.PKICONF, PkiConfBody()
        raise Refused(f"this upstream answers p10cr and certConf, not {msg.body_type.asn1_name}")

    def answer(self, der: bytes) -> bytes:
        self.stats["requests"] += 1
        msg = parse_message(der)
        self._trusted(msg)
        if not isinstance(msg.body, NestedBody):
            h, t, b = self._answer_spec(msg)
            return build_message(h, t, b, protection=self.protector).der
        if len(msg.body.messages) != len(msg.body.items):
            raise Refused("an inner message does not parse")
        for inner in msg.body.messages:
            self._same_signer(inner, msg.header)
        self.stats["inner"] += len(msg.body.messages)
        answers = build_messages([self._answer_spec(m) for m in msg.body.messages], protection=self.protector)
        body = NestedBody(tuple(NestedItem(a.der, a) for a in answers))
        header = response_header(msg.header, sender=self.sender)
        return build_message(header, BodyType.NESTED, body, protection=self.protector).der

    async def handle(self, request: web.Request) -> web.Response:
        try:
            der = self.answer(await request.read())
        except (Refused, CmpError) as exc:
            self.stats["refused"] += 1
            return web.Response(status=400, text=f"refused: {exc}")
        return web.Response(body=der, content_type="application/pkixcmp")


class DelayRelay:
    """Forwards each chunk `one_way_s` after it arrived, in order, both ways: a link with that propagation delay
    and no bandwidth limit."""

    def __init__(self, target: tuple[str, int], one_way_s: float) -> None:
        self.target = target
        self.one_way_s = one_way_s
        self.stats = {"connections": 0, "chunks": 0, "bytes": 0}

    async def accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.stats["connections"] += 1
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

        async def deliver() -> None:
            while (item := await chunks.get()) is not None:
                due, data = item
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        task = asyncio.create_task(deliver())
        with contextlib.suppress(ConnectionError):
            while data := await reader.read(1 << 16):
                self.stats["chunks"] += 1
                self.stats["bytes"] += len(data)
                chunks.put_nowait((loop.time() + self.one_way_s, data))
        chunks.put_nowait(None)
        with contextlib.suppress(ConnectionError):
            await task


async def serve(ra_cert: x509.Certificate) -> None:
    up = MiniUpstream(ra_cert)
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app.router.add_post("/cmp", up.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        pem = up.cert.public_bytes(serialization.Encoding.PEM).decode()
        print(json.dumps({"port": port, "cert": pem}), flush=True)
        await until_stdin_closes(lambda: {**up.stats, "cpu_s": cpu_s()})
    finally:
        await runner.cleanup()


async def relay(target_port: int, one_way_s: float) -> None:
    r = DelayRelay(("127.0.0.1", target_port), one_way_s)
    server = await asyncio.start_server(r.accept, "127.0.0.1", 0)
    async with server:
        print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)
        await until_stdin_closes(lambda: {**r.stats, "cpu_s": cpu_s()})


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "serve":
        ra_cert = x509.load_pem_x509_certificate(Path(sys.argv[2]).read_bytes())
        asyncio.run(serve(ra_cert))
    elif len(sys.argv) == 4 and sys.argv[1] == "relay":
        asyncio.run(relay(int(sys.argv[2]), float(sys.argv[3])))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
