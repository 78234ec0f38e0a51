"""Upstream forwarding throughput: drain queued outbox records to a local upstream, batched against single.

    python bench/upstream.py [--count 100000] [--batch 50] [--single-count N] [--rtt-ms 0,20]

The upstream is a MINIMAL local CMP responder built with the message layer (not a second Birthline instance:
that would add its own HSM issuance and group commit to what is measured). It answers p10cr with a cp holding a
certificate for the requested key (software CA), certConf with pkiConf, and nested messages with one answer per
inner message; every answer is signature-protected (software EC key) and every request's protection is
verified. The forwarder is the real one (appliance.cmp.forwarder) over a real journal and real HTTP on
127.0.0.1; its RA key is a software EC P-256 key here (the appliance uses the HSM's `cmp-ra`). `--count` records
(p10cr, 1,000 distinct device CSRs reused) are written straight into the outbox, then drained:

    batched   nested messages of --batch requests (then one nested certConf batch)
    single    one p10cr and one certConf message per record

Single mode drains `--single-count` records (default: the same as --count) and the rate is extrapolated when
smaller. Both sides share one event loop and CPU here: figures are ratios within one run.

`--rtt-ms` runs the pair once per round-trip time. 0 is plain loopback: both modes then do the same signing,
verifying and encoding per record, and batching only saves what a message costs beyond that (an HTTP exchange
and a journal commit). A factory's uplink to the manufacturer's CA is a WAN link: a TCP relay in its own thread
delays every chunk by half the RTT each way (netem is not available on these machines), so single mode waits two
round trips per record and batched mode two per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import os
import sqlite3
import sys
import tempfile
import threading
import time
from pathlib import Path

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
from appliance.cmp.forwarder import Forwarder
from appliance.config import UpstreamSection
from appliance.issuance.journal import Journal


def _cert(subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, issuer_key: ec.EllipticCurvePrivateKey,
          ca: bool) -> x509.Certificate:  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(issuer_key, hashes.SHA256())
    )


class MiniUpstream:
    def __init__(self) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        self.cert = _cert("Bench Upstream CA", self.key, "Bench Upstream CA", self.key, True)
        self.protector = SignatureProtector(self.key, self.cert)
        self.issued = 0
        self.transactions: set[bytes] = set()

    def answer(self, msg: PKIMessage) -> PKIMessage:
        verify_signature(msg)
        header = response_header(msg.header, sender=x509.DirectoryName(self.cert.subject))
        if isinstance(msg.body, NestedBody):
            inner = [self.answer(m) for m in msg.body.messages]
            body = NestedBody(tuple(NestedItem(m.der, m) for m in inner))
            return build_message(header, BodyType.NESTED, body, protection=self.protector)
        if isinstance(msg.body, P10crBody):
            self.issued += 1
            self.transactions.add(msg.header.transaction_id or b"")
            now = dt.datetime.now(dt.UTC)
            cert = (
                x509.CertificateBuilder()
                .subject_name(msg.body.csr.subject)
                .issuer_name(self.cert.subject)
                .public_key(msg.body.csr.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now)
                .not_valid_after(now + dt.timedelta(days=3650))
                .sign(self.key, hashes.SHA256())
            )
            rep = CertRepBody((CertResponse(0, PKIStatusInfo.accepted(), cert),))
            return build_message(header, BodyType.CP, rep, protection=self.protector)
        return build_message(header, BodyType.PKICONF, PkiConfBody(), protection=self.protector)

    async def handle(self, request: web.Request) -> web.Response:
        msg = parse_message(await request.read())
        return web.Response(body=self.answer(msg).der, content_type="application/pkixcmp")


class DelayRelay:
    """A TCP relay on 127.0.0.1 that forwards each chunk `one_way_s` after it arrived, in order, both ways: a
    link with that propagation delay and no bandwidth limit. It runs its own event loop in a thread so the
    bench's loop does not schedule it."""

    def __init__(self, target: tuple[str, int], one_way_s: float) -> None:
        self.target = target
        self.one_way_s = one_way_s
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="delay-relay", daemon=True)

    def __enter__(self) -> DelayRelay:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
                chunks.put_nowait((loop.time() + self.one_way_s, data))
        chunks.put_nowait(None)
        with contextlib.suppress(ConnectionError):
            await task


def queue(journal_path: Path, count: int, csrs: list[bytes]) -> None:
    conn = sqlite3.connect(journal_path)
    now = time.time()
    with conn:
        conn.execute("DELETE FROM outbox")
        conn.executemany(
            "INSERT INTO outbox (kind, cert_serial, transaction_id, csr_der, next_attempt_at, created_at)"
            " VALUES ('p10cr', ?, ?, ?, ?, ?)",
            ((f"{i:x}", os.urandom(16), csrs[i % len(csrs)], now, now) for i in range(count)),
        )
    conn.close()


async def drain(journal: Journal, url: str, mode: str, batch: int, ra: SignatureProtector,
                server: x509.Certificate) -> tuple[float, int]:  # fmt: skip
    settings = UpstreamSection(url=url, mode=mode, batch_max=batch, batch_wait_s=0, request_timeout_s=60)
    fwd = Forwarder(journal, settings, ra, server_certs=(server,))
    t0 = time.perf_counter()
    ok = await fwd.drain(timeout_s=3600)
    elapsed = time.perf_counter() - t0
    await fwd.close()
    assert ok, "the queue did not drain"
    return elapsed, fwd.stats["messages"]


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--single-count", type=int, default=None)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--rtt-ms", default="0", help="comma-separated round-trip times to run at (default 0)")
    args = p.parse_args()
    single_count = args.single_count or args.count

    up = MiniUpstream()
    app = web.Application(client_max_size=4 * 1024 * 1024)
    app.router.add_post("/cmp", up.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    url = f"http://127.0.0.1:{port}/cmp"

    ra_key = ec.generate_private_key(ec.SECP256R1())
    ra = SignatureProtector(ra_key, _cert("Bench RA", ra_key, "Bench RA", ra_key, False))
    dev = []
    for i in range(1000):
        k = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, f"SN-{i:05d}")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(k, hashes.SHA256())
        dev.append(csr.public_bytes(serialization.Encoding.DER))

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "journal.sqlite"
        Journal(path).close()
        for rtt_ms in (float(x) for x in args.rtt_ms.split(",")):
            with contextlib.ExitStack() as stack:
                target = url
                if rtt_ms > 0:
                    relay = stack.enter_context(DelayRelay(("127.0.0.1", port), rtt_ms / 2000))
                    target = f"http://127.0.0.1:{relay.port}/cmp"
                print(f"round trip {'loopback' if rtt_ms <= 0 else f'{rtt_ms:g} ms (delay relay)'}:")
                rates = {}
                for mode, n in (("batched", args.count), ("single", single_count)):
                    queue(path, n, dev)
                    before = up.issued
                    with Journal(path) as journal:
                        elapsed, messages = await drain(journal, target, mode, args.batch, ra, up.cert)
                    assert up.issued - before == n, (up.issued - before, n)
                    rates[mode] = n / elapsed
                    print(f"  {mode:8} {n:>7} records in {elapsed:7.1f} s: {rates[mode]:8.0f} records/s"
                          f" ({messages} HTTP messages)")  # fmt: skip
                print(f"  batched / single: {rates['batched'] / rates['single']:.1f}x (target >= 10x)")
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
