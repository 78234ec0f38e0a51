"""Upstream forwarding throughput: drain queued outbox records to a local upstream, batched against single.

    python bench/upstream.py [--count 100000] [--batch 50] [--in-flight 2] [--single-count N] [--rtt-ms 0,20]
                             [--upstream mini|birthline]

`--upstream mini` (the default): the upstream is bench/upstream_mini.py in a process of its own: a MINIMAL CMP
responder built with the message layer (not a second Birthline instance: that would add its own HSM issuance and
group commit to what is measured). Its module docstring lists exactly what it checks (the RA's signature on each
message, once per nested message; each CSR's signature once) and what it caches (the certificate per CSR); every
answer it sends is signed. The forwarder is the real one (appliance.cmp.forwarder) over a real journal and real
HTTP on 127.0.0.1, its RA key in a SoftHSM2 token as on the appliance (`--ra-key software`: in memory). `--count`
records (p10cr, 1,000 distinct device CSRs reused) are written straight into the outbox, then drained:

    batched   nested messages of --batch requests, --in-flight of them at once ([upstream] batches_in_flight),
              then one nested certConf message per batch
    single    one p10cr and one certConf message per record

With --implicit-confirm the forwarder asks for implicitConfirm ([upstream] implicit_confirm) and the minimal
upstream grants it: no certConf, one exchange and one RA signature per record instead of two.

Single mode drains `--single-count` records (default: the same as --count) and the rate is extrapolated when
smaller. After each mode the bench prints the CPU time per record of this process (the forwarder, with its
journal and PKCS#11 threads), of the upstream process and of the relay process, and how busy each was: the
three share this machine's cores, so figures are ratios within one run.

`--upstream birthline`: the upstream is a REAL second Birthline instance in its own process
(bench/upstream_peer.py: SoftHSM2 token, journal, CA hierarchy, production floor with an active work order, the
issuance core with the work-order policy and audit log, and the CMP server with one label trusting the bench's
RA; answers signed by the `cmp-ra` key in its token). Every record carries a CSR of its own key and device serial
(a Birthline upstream refuses a second device with a key it certified, and answers the same device and key from
its journal without issuing); they are made before anything is timed. Each round-trip time gets a fresh peer.
After each mode the peer's journal (read-only) must hold exactly one confirmed certificate per record sent and
every outbox row must be done; the peer also tells how its core grouped the requests into batches. The two
processes share this machine's cores: figures are ratios within one run; the same run with `--upstream mini` shows
what the forwarder and the message layer cost without an issuing upstream.

`--rtt-ms` runs the pair once per round-trip time. 0 is plain loopback: both modes then do the same signing,
verifying and encoding per record, and batching only saves what a message costs beyond that (an HTTP exchange
and a journal commit). A factory's uplink to the manufacturer's CA is a WAN link: a TCP relay in a process of its
own (bench/upstream_mini.py relay, with either upstream) delays every chunk by half the RTT each way (netem is not
available on these machines), so single mode waits two round trips per record and batched mode two per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import os
import resource
import signal
import sqlite3
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.cmp import (
    SignatureProtector,
)
from appliance.cmp.forwarder import Forwarder
from appliance.cmp.model import PKIHeader
from appliance.config import UpstreamSection
from appliance.issuance.journal import Journal
from bench import upstream_peer
from hsm.algorithms import KeyAlgorithm
from hsm.softhsm import create_softhsm_token
from hsm.token import Token


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


@dataclasses.dataclass(frozen=True)
class OneByOne:
    """A SignatureProtector without protect_many: the forwarder then signs every message in its own call."""

    inner: SignatureProtector

    @property
    def extra_certs(self) -> tuple[x509.Certificate, ...]:
        return self.inner.extra_certs

    def prepare(self, header: PKIHeader) -> PKIHeader:
        return self.inner.prepare(header)

    def protect(self, header: PKIHeader, protected_part: bytes) -> bytes:
        return self.inner.protect(header, protected_part)


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


def outbox_states(journal_path: Path) -> dict[str, int]:
    conn = sqlite3.connect(journal_path)
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM outbox GROUP BY state").fetchall())
    finally:
        conn.close()


async def drain(journal: Journal, url: str, mode: str, batch: int, ra: SignatureProtector,
                server: x509.Certificate, in_flight: int, implicit_confirm: bool = False) -> tuple[float, int]:  # fmt: skip
    settings = UpstreamSection(url=url, mode=mode, batch_max=batch, batch_wait_s=0, request_timeout_s=60,
                               batches_in_flight=in_flight, implicit_confirm=implicit_confirm)  # fmt: skip
    fwd = Forwarder(journal, settings, ra, server_certs=(server,))
    # A record that keeps failing would be retried with backoff for up to an hour: give up after a few.
    retry_limit = 10 + batch
    t0 = time.perf_counter()
    task = asyncio.create_task(fwd.drain(timeout_s=3600))
    try:
        while not task.done() and fwd.stats["retried"] <= retry_limit:
            await asyncio.wait({task}, timeout=0.5)
        if not task.done():
            last = journal.call(lambda: journal.conn.execute(
                "SELECT last_error FROM outbox WHERE last_error IS NOT NULL ORDER BY id DESC LIMIT 1").fetchone())  # fmt: skip
            raise AssertionError(f"{fwd.stats['retried']} records retried; last error: {last and last[0]}")
        ok = task.result()
    finally:
        if not task.done():  # given up, or the bench was interrupted
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await fwd.close()
    elapsed = time.perf_counter() - t0
    assert ok, "the queue did not drain"
    return elapsed, fwd.stats["messages"]


def device_csrs(first: int, count: int) -> list[bytes]:
    """`count` CSRs, each with a fresh key, for devices BENCH<first> ... (the peer's work-order pattern)."""
    out = []
    for i in range(first, first + count):
        k = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, upstream_peer.device_serial(i))])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(k, hashes.SHA256())
        out.append(csr.public_bytes(serialization.Encoding.DER))
    return out


def describe_rtt(rtt_ms: float) -> str:
    return f"round trip {'loopback' if rtt_ms <= 0 else f'{rtt_ms:g} ms (delay relay)'}:"


async def run_modes(path: Path, port: int, url_path: str, rtt_ms: float, args: argparse.Namespace,
                    ra: SignatureProtector, server: x509.Certificate,
                    plan: list[tuple[str, int, list[bytes]]],
                    check: Callable[[str, int], Awaitable[None]]) -> None:  # fmt: skip
    """Drain each (mode, records, CSRs) of `plan` at one round-trip time and print the rates; `check(mode, n)`
    asserts the upstream issued n certificates for that mode."""
    async with contextlib.AsyncExitStack() as stack:
        target = f"http://127.0.0.1:{port}{url_path}"
        if rtt_ms > 0:
            relay = await stack.enter_async_context(Child("relay", str(port), str(rtt_ms / 2000)))
            target = f"http://127.0.0.1:{relay.info['port']}{url_path}"
        rates = {}
        for mode, n, csrs in plan:
            queue(path, n, csrs)
            with Journal(path) as journal:
                elapsed, messages = await drain(journal, target, mode, args.batch, ra, server, args.in_flight)
            assert (states := outbox_states(path)) == {"done": n}, states
            rates[mode] = n / elapsed
            print(f"  {mode:8} {n:>7} records in {elapsed:7.1f} s: {rates[mode]:8.0f} records/s"
                  f" ({messages} HTTP messages)", flush=True)  # fmt: skip
            await check(mode, n)
        print(f"  batched / single: {rates['batched'] / rates['single']:.1f}x (target >= 10x)", flush=True)


class Child:
    """A bench/upstream_mini.py process (`serve` or `relay`), a session of its own: its first JSON line says where
    it listens; `stats()` asks for its counters and CPU time; closing its stdin stops it."""

    def __init__(self, *argv: str) -> None:
        self.argv = argv
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}

    async def __aenter__(self) -> Child:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("upstream_mini.py")), *self.argv,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), 60)
        if not line:
            await self.__aexit__()
            raise RuntimeError(f"bench/upstream_mini.py {self.argv[0]} exited before serving")
        self.info = json.loads(line)
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 30)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise

    async def stats(self) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stats\n")
        await self.proc.stdin.drain()
        line = await asyncio.wait_for(self.proc.stdout.readline(), 30)
        assert line, f"bench/upstream_mini.py {self.argv[0]} exited"
        result: dict[str, Any] = json.loads(line)
        return result


def cpu_s() -> float:
    """This process's CPU time so far, every thread (the forwarder, the journal's, PKCS#11's): user + system."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run_mini(args: argparse.Namespace, single_count: int, rtts: list[float], tmp: Path, path: Path,
                   ra: SignatureProtector) -> None:  # fmt: skip
    """The minimal upstream (bench/upstream_mini.py serve) and, at a round-trip time, the delay relay, each in a
    process of its own: they do not share this process's event loop or GIL. Each mode's line gives the CPU
    seconds this process (forwarder), the upstream and the relay spent on it."""
    ra_pem = tmp / "bench-ra.pem"
    ra_pem.write_bytes(ra.certificate.public_bytes(serialization.Encoding.PEM))
    dev = []
    for i in range(1000):
        k = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, f"SN-{i:05d}")])
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(k, hashes.SHA256())
        dev.append(csr.public_bytes(serialization.Encoding.DER))
    async with Child("serve", str(ra_pem)) as up:
        assert up.proc is not None
        server = x509.load_pem_x509_certificate(up.info["cert"].encode())
        print(f"upstream: bench/upstream_mini.py in process {up.proc.pid}", flush=True)
        for rtt_ms in rtts:
            print(describe_rtt(rtt_ms), flush=True)
            async with contextlib.AsyncExitStack() as stack:
                port = int(up.info["port"])
                link: Child | None = None
                if rtt_ms > 0:
                    link = await stack.enter_async_context(Child("relay", str(port), str(rtt_ms / 2000)))
                    port = int(link.info["port"])
                target = f"http://127.0.0.1:{port}/cmp"
                rates = {}
                for mode, n in (("batched", args.count), ("single", single_count)):
                    queue(path, n, dev)
                    before = (cpu_s(), await up.stats(), await link.stats() if link else None)
                    with Journal(path) as journal:
                        elapsed, messages = await drain(journal, target, mode, args.batch, ra, server,
                                                        args.in_flight, args.implicit_confirm)  # fmt: skip
                    after = (cpu_s(), await up.stats(), await link.stats() if link else None)
                    assert (states := outbox_states(path)) == {"done": n}, states
                    issued = after[1]["issued"] - before[1]["issued"]
                    assert issued == n and after[1]["refused"] == 0, (issued, n, after[1])
                    rates[mode] = n / elapsed
                    cpu = {"forwarder (this process)": after[0] - before[0],
                           "upstream": after[1]["cpu_s"] - before[1]["cpu_s"]}  # fmt: skip
                    if link is not None:
                        assert before[2] is not None and after[2] is not None
                        cpu["relay"] = after[2]["cpu_s"] - before[2]["cpu_s"]
                    print(f"  {mode:8} {n:>7} records in {elapsed:7.1f} s: {rates[mode]:8.0f} records/s"
                          f" ({messages} HTTP messages)", flush=True)  # fmt: skip
                    print("    CPU per record: " + ", ".join(f"{k} {v / n * 1e3:.3f} ms" for k, v in cpu.items())
                          + "; CPU busy: " + ", ".join(f"{k} {v / elapsed:.0%}" for k, v in cpu.items()),
                          flush=True)  # fmt: skip
                    own = cpu["forwarder (this process)"] / n
                    print(f"    forwarder alone on one core: about {1 / own:.0f} records/s (1 / its CPU per record:"
                          " an inference from this run, not a measured rate)", flush=True)  # fmt: skip
                print(
                    f"  batched / single: {rates['batched'] / rates['single']:.1f}x (target >= 10x)",
                    flush=True,
                )


class Peer:
    """bench/upstream_peer.py in a child process (a session of its own, so its prepare worker goes with it)."""

    START_TIMEOUT_S = 180.0
    STOP_TIMEOUT_S = 60.0

    def __init__(self, directory: Path, ra_cert: Path, quantity: int) -> None:
        self.args = [str(directory), str(ra_cert), str(quantity)]
        self.proc: asyncio.subprocess.Process | None = None
        self.info: dict[str, Any] = {}

    async def __aenter__(self) -> Peer:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, str(Path(__file__).with_name("upstream_peer.py")), *self.args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        try:
            self.info = await asyncio.wait_for(self._json_line(), self.START_TIMEOUT_S)
            if not self.info:
                raise RuntimeError(f"the upstream peer exited ({await self.proc.wait()}) before serving")
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def stop(self) -> None:
        """Close its stdin (it stops, closing its journal); SIGKILL its process group if it does not exit."""
        proc = self.proc
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            rc = await asyncio.wait_for(proc.wait(), self.STOP_TIMEOUT_S)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
            raise
        if rc != 0:
            raise RuntimeError(f"the upstream peer exited with {rc}")

    async def stats(self) -> dict[str, Any]:
        """Its issuance core's and CMP responder's counters (cumulative)."""
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(b"stats\n")
        await self.proc.stdin.drain()
        result = await asyncio.wait_for(self._json_line(), 30)
        assert result, "the upstream peer exited"
        return result

    async def _json_line(self) -> dict[str, Any]:
        """The next JSON object it prints ({} at EOF); other lines (a tool it ran) are passed on to stderr."""
        assert self.proc is not None and self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            if line.startswith(b"{"):
                result: dict[str, Any] = json.loads(line)
                return result
            sys.stderr.write(line.decode(errors="replace"))
        return {}

    def issued(self) -> dict[str, int]:
        """Its journal's certificates by state, read-only (WAL: readers do not disturb the writer)."""
        conn = sqlite3.connect(f"file:{self.info['journal']}?mode=ro", uri=True)
        try:
            return dict(conn.execute("SELECT state, COUNT(*) FROM issuance GROUP BY state").fetchall())
        finally:
            conn.close()

    def checker(self) -> Callable[[str, int], Awaitable[None]]:
        """For run_modes: after each mode, its journal holds one confirmed certificate per record sent so far
        (none issued twice, none answered from the journal instead, none left unconfirmed or burned); prints how
        the upstream's core grouped that mode's requests."""
        sent = 0
        last = {"issued": 0, "batches": 0}

        async def check(mode: str, n: int) -> None:
            nonlocal sent
            sent += n
            issued = self.issued()
            assert issued == {"confirmed": sent}, (mode, issued, sent)
            core = (await self.stats())["core"]
            batches = core["batches"] - last["batches"]
            print(f"    upstream: {core['issued'] - last['issued']} issued in {batches} core batches"
                  f" ({n / max(batches, 1):.1f} per batch), all confirmed", flush=True)  # fmt: skip
            last.update(issued=core["issued"], batches=core["batches"])

        return check


async def run_birthline(args: argparse.Namespace, single_count: int, rtts: list[float], tmp: Path, path: Path,
                        ra: SignatureProtector) -> None:  # fmt: skip
    t0 = time.perf_counter()
    # Distinct keys and serials per record: a Birthline upstream refuses a second device with a key it certified
    # and answers the same device and key from its journal. Each round-trip time gets a fresh peer.
    batched_csrs = device_csrs(0, args.count)
    single_csrs = device_csrs(args.count, single_count)
    made = time.perf_counter() - t0
    print(f"made {args.count + single_count} device keys and CSRs in {made:.1f} s (not timed)")
    ra_pem = tmp / "bench-ra.pem"
    ra_pem.write_bytes(ra.certificate.public_bytes(serialization.Encoding.PEM))
    for n, rtt_ms in enumerate(rtts):
        print(describe_rtt(rtt_ms), flush=True)
        t0 = time.perf_counter()
        async with Peer(tmp / f"peer-{n}", ra_pem, args.count + single_count) as peer:
            server = x509.load_pem_x509_certificate(Path(peer.info["ra_cert"]).read_bytes())
            assert peer.proc is not None
            print(f"  upstream: Birthline in process {peer.proc.pid}, ready in {time.perf_counter() - t0:.1f} s"
                  " (SoftHSM token, CA hierarchy, floor, CMP server)", flush=True)  # fmt: skip
            plan = [("batched", args.count, batched_csrs), ("single", single_count, single_csrs)]
            port = int(peer.info["port"])
            await run_modes(path, port, f"/.well-known/cmp/p/{upstream_peer.LABEL}", rtt_ms, args, ra, server,
                            plan, peer.checker())  # fmt: skip
        total = args.count + single_count
        print(f"  upstream journal: {total} certificates issued and confirmed for {total} records sent,"
              " every outbox row done", flush=True)  # fmt: skip


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=100_000)
    p.add_argument("--single-count", type=int, default=None)
    p.add_argument("--batch", type=int, default=50)
    p.add_argument("--implicit-confirm", action="store_true",
                   help="mini upstream: the forwarder asks for implicitConfirm, which the upstream grants (no certConf)")  # fmt: skip
    p.add_argument("--in-flight", type=int, default=UpstreamSection().batches_in_flight,
                   help="batched mode: nested messages in flight at once ([upstream] batches_in_flight)")  # fmt: skip
    p.add_argument("--rtt-ms", default="0", help="comma-separated round-trip times to run at (default 0)")
    p.add_argument("--upstream", choices=("mini", "birthline"), default="mini",
                   help="mini: the in-process responder (default); birthline: a real Birthline in a child process")  # fmt: skip
    p.add_argument(
        "--ra-key",
        choices=("hsm", "software"),
        default="hsm",
        help="hsm: the RA key in a SoftHSM2 token, as on the appliance (default); software: in memory",
    )
    p.add_argument(
        "--one-by-one",
        action="store_true",
        help="sign each inner message in its own HSM call (as before sign_many), for comparison",
    )
    args = p.parse_args()
    args.ra_key = args.ra_key or ("hsm" if args.upstream == "mini" else "software")
    single_count = args.single_count or args.count
    rtts = [float(x) for x in args.rtt_ms.split(",")]

    # SIGTERM as Ctrl-C: cancelled, the finally blocks stop the peer and remove the temporary directory.
    main_task = asyncio.current_task()
    assert main_task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        ra_key: ec.EllipticCurvePrivateKey
        if args.ra_key == "hsm":
            # As on the appliance: the RA key in the HSM (SoftHSM2 here), so each signature is a PKCS#11 call.
            softhsm = create_softhsm_token(Path(tmp) / "softhsm", label="bench")
            token = stack.enter_context(Token.open(softhsm.hsm_config()))
            hsm_key = token.generate_key("cmp-ra", KeyAlgorithm.EC_P256)
            assert isinstance(hsm_key, ec.EllipticCurvePrivateKey)
            ra_key = hsm_key
            issuer = ec.generate_private_key(ec.SECP256R1())  # cryptography cannot self-sign with an HSM key
            ra = SignatureProtector(ra_key, _cert("Bench RA", ra_key, "Bench RA issuer", issuer, False))
        else:
            ra_key = ec.generate_private_key(ec.SECP256R1())
            ra = SignatureProtector(ra_key, _cert("Bench RA", ra_key, "Bench RA", ra_key, False))
        if args.one_by_one:
            ra = OneByOne(ra)  # type: ignore[assignment]
        print(
            f"RA key: {args.ra_key}, {'one signature per call' if args.one_by_one else 'batched'}", flush=True
        )
        path = Path(tmp) / "journal.sqlite"
        Journal(path).close()
        if args.upstream == "mini":
            await run_mini(args, single_count, rtts, Path(tmp), path, ra)
        else:
            await run_birthline(args, single_count, rtts, Path(tmp), path, ra)


if __name__ == "__main__":
    asyncio.run(main())
