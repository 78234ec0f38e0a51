"""Connection floods against every listener of a real daemon (`birthline run` in its own process).

    python bench/listeners.py [--connections 2000] [--sources 8] [--hold 20] [--listeners station,va,cmp]
                              [--fresh] [--set SECTION.KEY=VALUE ...]

A fresh appliance in a temporary directory (SoftHSM2 token, root/issuing/management CAs, one LAN station on a
line with a work order, a CMP label) runs as `birthline run` with its embedded defaults for every bound. For
each listener in turn this opens `--connections` TCP connections, spread over `--sources` addresses
127.0.0.2, 127.0.0.3, ..., that never finish anything:

    station      plain TCP to the TLS port, no TLS ClientHello (idle before the TLS handshake)
    station-tls  the TLS handshake done with the station's own client certificate, then silence (no HELLO)
    va           HTTP request headers never finished ("GET /crl/issuing.crl HTTP/1.1\\r\\nHost: x\\r\\n")
    va-headers   the most header bytes the VA accepts for one request (31 fields of 4 KiB), never finished
    cmp          the same with a POST to /.well-known/cmp
    cmp-415      a POST to /.well-known/cmp without a Content-Type (answered 415 unread) announcing 256 KiB of
                 body and sending 200,000 bytes of it at once, then silence

and prints the daemon's RSS (VmRSS of the main process) and open file descriptors before, during (all flood
connections made; and the highest RSS sampled every 0.1 s from the first flood connection until the flood's
sockets are closed) and after (flood sockets closed, the daemon's descriptors back), the RSS growth per admitted
connection, how many flood connections the daemon refused at once and how many it closed itself within `--hold`
seconds, and whether a good client from 127.0.0.1 (a station enrolment over TLS, a CRL fetch, a CMP POST) was
served during and after the flood.

Clients and daemon share this machine's cores; the figures are what one run on a loaded box shows.
`--set stations.max_connections=2100` (repeatable) changes a key of [stations], [va] or [cmp] from its default;
`--fresh` starts a new daemon for each listener's flood, so one flood's freed memory does not hide the next's.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from appliance import ca as ca_mod
from appliance import stations_registry as registry
from appliance.config import load_config
from appliance.httplisten import MAX_FIELD, MAX_HEADERS
from appliance.runtime import open_core
from bench.issue import floor
from hsm.softhsm import create_softhsm_token
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key

CONFIG = """\
[appliance]
state_dir = "{base}/state"
[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "{pin}"
softhsm_conf = "{conf}"
[stations]
lan_listen = "127.0.0.1:{lan}"
tls_dir = "{base}/tls"
{stations}
[va]
listen = "127.0.0.1:{va}"
{va_extra}
[cmp]
listen = "127.0.0.1:{cmp}"
{cmp_extra}
[cmp.labels.bench]
station = "lan00"
secret_file = "{base}/cmp.secret"
"""

PARTIAL = {
    "va": b"GET /crl/issuing.crl HTTP/1.1\r\nHost: x\r\n",
    "cmp": b"POST /.well-known/cmp/p/bench HTTP/1.1\r\nHost: x\r\nContent-Type: application/pkixcmp\r\n",
    "station": b"",
    "station-tls": b"",
    # The most header bytes aiohttp keeps for one request (appliance/httplisten.py), and never the blank line.
    "cmp-415": b"POST /.well-known/cmp/p/bench HTTP/1.1\r\nHost: x\r\nContent-Length: 262144\r\n\r\n"
    + b"A" * 200_000,
    "va-headers": b"GET /crl/issuing.crl HTTP/1.1\r\n"
    + b"".join(b"X-Pad-%02d: %s\r\n" % (i, b"a" * (MAX_FIELD - 12)) for i in range(MAX_HEADERS - 1)),
}
PORT = {
    "va": "va",
    "va-headers": "va",
    "cmp": "cmp",
    "cmp-415": "cmp",
    "station": "station",
    "station-tls": "station",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def raise_own_fd_limit(wanted: int) -> int:
    """The flood's sockets are this process's descriptors too: raise the soft limit up to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard == resource.RLIM_INFINITY else min(hard, max(soft, wanted))
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return int(resource.getrlimit(resource.RLIMIT_NOFILE)[0])


@dataclass
class Appliance:
    base: Path
    config: Path
    ports: dict[str, int]
    bundle: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def build(base: Path, extra: dict[str, list[str]]) -> Appliance:
    token = create_softhsm_token(base / "softhsm", label="bench")
    ports = {"station": free_port(), "va": free_port(), "cmp": free_port()}
    secret = base / "cmp.secret"
    secret.write_text(secrets.token_hex(16))
    secret.chmod(0o600)
    config = base / "birthline.toml"
    config.write_text(
        CONFIG.format(base=base, module=token.module, label=token.label, pin=token.pin_file,
                      conf=token.conf_path, lan=ports["station"], va=ports["va"], cmp=ports["cmp"],
                      stations="\n".join(extra.get("stations", [])), va_extra="\n".join(extra.get("va", [])),
                      cmp_extra="\n".join(extra.get("cmp", [])))
    )  # fmt: skip
    with open_core(load_config(config)) as core:
        ca_mod.create_root(core.journal, core.token, "root", "O=Bench,CN=Bench Root CA")
        ca_mod.create_issuing(core.journal, core.token, "issuing", "O=Bench,CN=Bench Birth CA", "root")
        ca_mod.create_management(core.journal, core.token, "management", "O=Bench,CN=Bench Management CA")
        creds = registry.add_station(
            core.journal, core.token, "lan00", "lan", audit=core.audit, actor="bench"
        )
        bundle = registry.write_bundle(creds, base / "bundles" / "lan00")
        floor(core.journal, 1_000_000, stations=["lan00"], pattern="FLOOD-[0-9]+")
    return Appliance(base, config, ports, bundle)


async def wait_listening(app: Appliance, timeout: float = 90.0) -> None:
    assert app.proc is not None
    deadline = time.monotonic() + timeout
    for port in app.ports.values():
        while True:
            if app.proc.poll() is not None:
                raise RuntimeError(f"birthline run exited with {app.proc.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("birthline run did not start listening")
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            break


class GoodClients:
    """The well-behaved peers: a LAN station that enrols devices, a CRL fetch, an OCSP POST."""

    def __init__(self, app: Appliance) -> None:
        self.app = app
        self.n = 0

    async def enrol(self) -> str:
        b = self.app.bundle
        ctx = client_ssl_context(b / "tls-client.crt", b / "tls-client.key", b / "ca.crt")
        self.n += 1
        serial = f"FLOOD-{self.n}"
        client = await StationClient.connect_tcp(
            "127.0.0.1", self.app.ports["station"], station_id="lan00",
            key=read_station_key(b / "station.key"), ssl_context=ctx, server_hostname="localhost",
            give_up_after=60.0,
        )  # fmt: skip
        try:
            chain = await client.enroll(serial, make_csr(generate_device_key(), serial))
        finally:
            await client.close()
        return f"enrolled {serial} ({len(chain)} certificates)"

    async def http(self, listener: str) -> str:
        port = self.app.ports[listener]
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as s:
            if listener == "va":
                async with s.get(f"http://127.0.0.1:{port}/crl/issuing.crl") as r:
                    body = await r.read()
                    return f"CRL HTTP {r.status}, {len(body)} bytes"
            async with s.post(
                f"http://127.0.0.1:{port}/.well-known/cmp/p/bench", data=b"\x30\x00",
                headers={"Content-Type": "application/pkixcmp"},
            ) as r:  # fmt: skip
                await r.read()
                return f"CMP HTTP {r.status} (a CMP error answer to an empty message)"

    async def check(self, listener: str) -> str:
        start = time.monotonic()
        try:
            what = await (self.enrol() if PORT[listener] == "station" else self.http(PORT[listener]))
        except Exception as exc:  # noqa: BLE001 - the bench reports any failure of the good client
            return f"FAILED: {type(exc).__name__}: {exc}"
        return f"{what} in {time.monotonic() - start:.2f} s"


class Flood:
    """The flood's connections. Plain ones are bare sockets; TLS ones keep their asyncio writer open."""

    def __init__(self) -> None:
        self.socks: list[socket.socket] = []
        self.writers: list[asyncio.StreamWriter] = []
        self.errors = 0

    def __len__(self) -> int:
        return len(self.socks) + len(self.writers)

    def closed_by_server(self) -> tuple[int, int]:
        """(answered with HTTP 503, closed) among the connections, the server's doing."""
        answered = closed = 0
        for s in self.socks:
            try:
                data = s.recv(4096, socket.MSG_PEEK)
            except BlockingIOError:
                continue
            except OSError:
                closed += 1
                continue
            closed += 1
            answered += data.startswith(b"HTTP/1.1 503")
        closed += sum(1 for w in self.writers if w.transport.is_closing())
        return answered, closed

    def close(self) -> None:
        for s in self.socks:
            s.close()
        for w in self.writers:
            w.transport.abort()


async def flood(listener: str, app: Appliance, n: int, sources: int) -> Flood:
    """n connections from 127.0.0.2.. (`sources` addresses), each sending the listener's partial request."""
    loop = asyncio.get_running_loop()
    port = app.ports[PORT[listener]]
    out = Flood()
    b = app.bundle
    ctx = client_ssl_context(b / "tls-client.crt", b / "tls-client.key", b / "ca.crt")

    async def one(i: int) -> None:
        source = (f"127.0.0.{2 + i % sources}", 0)
        if listener == "station-tls":
            try:
                async with asyncio.timeout(20):
                    _, writer = await asyncio.open_connection(
                        "127.0.0.1", port, ssl=ctx, server_hostname="localhost", local_addr=source
                    )
            except (OSError, TimeoutError):
                out.errors += 1
                return
            out.writers.append(writer)
            return
        s = socket.socket()
        s.setblocking(False)
        try:
            s.bind(source)
            async with asyncio.timeout(10):
                await loop.sock_connect(s, ("127.0.0.1", port))
            if PARTIAL[listener]:
                await loop.sock_sendall(s, PARTIAL[listener])
        except (OSError, TimeoutError):
            out.errors += 1
            s.close()
            return
        out.socks.append(s)

    for i in range(0, n, 200):  # in waves: the listen backlog is finite
        await asyncio.gather(*(one(j) for j in range(i, min(i + 200, n))))
    return out


async def wait_for(cond: Callable[[], bool], timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        await asyncio.sleep(step)
    return cond()


async def run_listener(
    app: Appliance, good: GoodClients, listener: str, n: int, sources: int, hold: float
) -> None:
    pid = app.pid
    await good.check(listener)  # warm: first use loads what the path needs
    rss0, fd0 = rss_kib(pid), fds(pid)
    peak = rss0

    async def sample() -> None:
        nonlocal peak
        while True:
            with contextlib.suppress(OSError, ValueError):
                peak = max(peak, rss_kib(pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    conns = await flood(listener, app, n, sources)
    await asyncio.sleep(0.5)
    rss1, fd1 = rss_kib(pid), fds(pid)
    answered, closed = conns.closed_by_server()
    during_result = await good.check(listener)
    gone = await wait_for(lambda: conns.closed_by_server()[1] == len(conns), hold)
    _, closed_hold = conns.closed_by_server()
    rss_hold = rss_kib(pid)
    conns.close()
    sampler.cancel()
    await wait_for(lambda: fds(pid) <= fd0 + 2, 30)
    await asyncio.sleep(1.0)
    after_result = await good.check(listener)
    rss2, fd2 = rss_kib(pid), fds(pid)
    held = fd1 - fd0
    print(
        f"[{listener}] {n} connections from {sources} addresses 127.0.0.2.. ({conns.errors} connect errors)"
    )
    print(f"  before: RSS {rss0 / 1024:7.1f} MiB, fds {fd0}")
    print(f"  during: RSS {rss1 / 1024:7.1f} MiB, fds {fd1} ({held} more); refused or closed at once: {closed}"
          f" ({answered} with HTTP 503)")  # fmt: skip
    if held > 0:
        print(f"          {(rss1 - rss0) / held:.1f} KiB of RSS per connection the daemon holds")
    print(f"  highest RSS while the flood was open: {peak / 1024:7.1f} MiB ({(peak - rss0) / 1024:+.1f} MiB)")
    print(f"  good client from 127.0.0.1 during the flood: {during_result}")
    print(f"  after holding up to {hold:.0f} s: {closed_hold} of {len(conns)} closed by the daemon"
          f"{' (all)' if gone else ''}; RSS {rss_hold / 1024:.1f} MiB")  # fmt: skip
    print(f"  after:  RSS {rss2 / 1024:7.1f} MiB ({(rss2 - rss0) / 1024:+.1f} MiB), fds {fd2}")
    print(f"  good client after the flood: {after_result}")
    sys.stdout.flush()


async def main_async(args: argparse.Namespace) -> int:
    limit = raise_own_fd_limit(args.connections + 256)
    if limit < args.connections + 64:
        print(f"this process may open only {limit} descriptors: lower --connections", file=sys.stderr)
        return 2
    extra: dict[str, list[str]] = {}
    for item in args.set:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if section not in ("stations", "va", "cmp") or not name or not value:
            print(f"--set {item}: expected stations|va|cmp.KEY=VALUE", file=sys.stderr)
            return 2
        extra.setdefault(section, []).append(f"{name} = {value}")
    if extra:
        print("configuration changed: " + "; ".join(f"[{k}] {', '.join(v)}" for k, v in extra.items()))
    listeners = args.listeners.split(",")
    with tempfile.TemporaryDirectory(prefix="birthline-bench-") as tmp:
        app = build(Path(tmp), extra)
        good = GoodClients(app)
        # --fresh: a new daemon process per listener, so memory freed by one flood is not what the next reuses.
        for group in [[name] for name in listeners] if args.fresh else [listeners]:
            app.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(app.config)],
                stderr=subprocess.DEVNULL if not args.log else None,
            )
            try:
                await wait_listening(app)
                print(
                    f"birthline run pid {app.pid}: RSS {rss_kib(app.pid) / 1024:.1f} MiB, fds {fds(app.pid)}"
                )
                for listener in group:
                    await run_listener(app, good, listener, args.connections, args.sources, args.hold)
            finally:
                app.proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    app.proc.wait(timeout=30)
                if app.proc.poll() is None:
                    app.proc.kill()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--connections", type=int, default=2000)
    p.add_argument("--sources", type=int, default=8, help="flood source addresses 127.0.0.2 and up")
    p.add_argument("--hold", type=float, default=20.0, help="seconds to wait for the daemon to close them")
    p.add_argument("--listeners", default="station,va,cmp")
    p.add_argument("--set", action="append", default=[], help="SECTION.KEY=VALUE in [stations], [va], [cmp]")
    p.add_argument("--fresh", action="store_true", help="a new daemon for each listener's flood")
    p.add_argument("--log", action="store_true", help="show the daemon's log")
    return asyncio.run(main_async(p.parse_args()))


if __name__ == "__main__":
    sys.exit(main())
