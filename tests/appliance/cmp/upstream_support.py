"""What the forwarder and RA-mode tests share: the `local` fixture (this appliance's journal with the production
floor, its issuance service and RA key) and the `upstream` fixture (a second Birthline instance acting as the
upstream CA: its CMP server on 127.0.0.1 with a label that trusts our RA), both registered in conftest.py; the
`openssl cmp` mock server in a private network namespace with a forwarder child process, a proxy that can hold
an answer back while a child is killed, a config file for `birthline` child processes, and the outbox as the
tests read it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.cmp.forwarder import Forwarder
from appliance.cmp.protection import SignatureProtector
from appliance.cmp.ra import ensure_ra
from appliance.cmp.server import CmpLabel, CmpResponder, make_cmp_app
from appliance.config import UpstreamSection
from appliance.issuance.journal import Journal
from appliance.issuance.service import IssueService
from appliance.production.policy import WorkOrderPolicy
from appliance.profiles import builtin_profiles
from appliance.va.http import VaServer
from hsm.softhsm import SoftHsmToken
from hsm.token import Token

SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
REPO = Path(__file__).resolve().parents[3]
MOCK_PORT = 1700
MOCK_SECRET = "mock secret"
MOCK_REF = "ref"


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def netns_ok() -> bool:
    """unshare -n works here (root, or user namespaces) and lo can be brought up in it."""
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    try:
        return (
            subprocess.run(
                ["unshare", "-n", "sh", "-c", "ip link set lo up"], timeout=10, check=False
            ).returncode
            == 0
        )
    except (OSError, subprocess.TimeoutExpired):
        return False


# -- fixtures --------------------------------------------------------------------------------------------------------
def device_csr(serial: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.DER)


@dataclass
class Upstream:
    journal: Journal
    responder: CmpResponder
    ra: SignatureProtector
    url: str
    port: int

    def issued(self) -> list[tuple[str, str]]:
        rows = self.journal.call(
            lambda: self.journal.conn.execute(
                "SELECT request_id, device_serial FROM issuance WHERE state != 'burned' ORDER BY id"
            ).fetchall()
        )
        return [(str(a), str(b)) for a, b in rows]


@dataclass
class Local:
    journal: Journal
    service: IssueService
    ra: SignatureProtector
    audit: AuditLog


@pytest.fixture(name="upstream")
async def upstream_fixture(
    production_journal_template: Path, hsm_token: Token, tmp_path: Path
) -> AsyncIterator[Upstream]:
    (tmp_path / "up").mkdir()
    shutil.copy(production_journal_template, tmp_path / "up" / "journal.sqlite")
    with Journal(tmp_path / "up" / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        issuing = ca_mod.load_ca(journal, "issuing")
        management = ca_mod.load_ca(journal, "management")
        ra = ensure_ra(hsm_token, management, tmp_path / "up" / "ra.pem")
        label = CmpLabel("ra", "fixture-1", trusted_cas=(management.certificate,), allow_nested=True, signer_revocation="none",
                         allow_rr=True, accept_ra_verified=True)  # fmt: skip
        service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                               policy=WorkOrderPolicy("issuing"), audit=audit)  # fmt: skip
        async with service:
            responder = CmpResponder(service, journal, audit, {"ra": label}, management_ca=management.certificate,
                                     ra=ra)  # fmt: skip
            async with VaServer(make_cmp_app(responder), "127.0.0.1", 0) as http:
                port = http.address[1]
                yield Upstream(journal, responder, ra, f"http://127.0.0.1:{port}/.well-known/cmp/p/ra", port)


@pytest.fixture(name="local")
async def local_fixture(
    production_journal_template: Path, hsm_token: Token, tmp_path: Path
) -> AsyncIterator[Local]:
    shutil.copy(production_journal_template, tmp_path / "journal.sqlite")
    with Journal(tmp_path / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        issuing = ca_mod.load_ca(journal, "issuing")
        ra = ensure_ra(hsm_token, ca_mod.load_ca(journal, "management"), tmp_path / "ra.pem")
        service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                               policy=WorkOrderPolicy("issuing"), audit=audit)  # fmt: skip
        async with service:
            yield Local(journal, service, ra, audit)


def settings(url: str, **kw: object) -> UpstreamSection:
    base = UpstreamSection(url=url, mode="batched", batch_max=10, batch_wait_s=0, backoff_base_s=1,
                           backoff_cap_s=10, request_timeout_s=10)  # fmt: skip
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def forwarder(local: Local, up: Upstream, url: str | None = None, **kw: object) -> Forwarder:
    return Forwarder(
        local.journal, settings(url or up.url, **kw), local.ra, server_certs=(up.ra.certificate,)
    )


# -- a proxy in front of the upstream --------------------------------------------------------------------------------
@dataclass
class Exchange:
    request: bytes
    response: bytes | None = None  # what the upstream answered (whether or not it reached the client)
    delivered: bool = False


@dataclass
class StallingProxy:
    """POSTs go on to `target` and its answers come back, all recorded. The request numbered `stall_at` (1-based)
    is forwarded, then its answer is held back until `release()`: a client killed meanwhile had its request
    processed by the upstream and never heard the answer. `stalled` is set once that request was forwarded."""

    target: str
    stall_at: int | None = None
    exchanges: list[Exchange] = field(default_factory=list)
    stalled: asyncio.Event = field(default_factory=asyncio.Event)
    _go: asyncio.Event = field(default_factory=asyncio.Event)
    url: str = ""

    def release(self) -> None:
        self._go.set()

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        ex = Exchange(body)
        self.exchanges.append(ex)
        timeout = aiohttp.ClientTimeout(total=30)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(self.target, data=body, headers={"Content-Type": "application/pkixcmp"}) as rsp,
        ):
            ex.response = await rsp.read()
            status, ctype = rsp.status, rsp.content_type
        if len(self.exchanges) == self.stall_at:
            self.stalled.set()
            await self._go.wait()
        ex.delivered = True
        return web.Response(body=ex.response, status=status, content_type=ctype)


@contextlib.asynccontextmanager
async def stalling_proxy(target: str, stall_at: int | None = None) -> AsyncIterator[StallingProxy]:
    proxy = StallingProxy(target, stall_at)
    app = web.Application()
    app.router.add_post("/{tail:.*}", proxy._handle)
    async with VaServer(app, "127.0.0.1", 0) as http:
        proxy.url = f"{http.url}/.well-known/cmp/p/ra"
        try:
            yield proxy
        finally:
            proxy.release()  # let a held answer go, or the server's shutdown waits for it


# -- a config file for `birthline` child processes -------------------------------------------------------------------
def write_config(
    path: Path,
    softhsm_token: SoftHsmToken,
    *,
    state: Path,
    journal: Path,
    upstream: dict[str, object],
    extra: str = "",
) -> Path:
    """A birthline.toml over the session's SoftHSM token and `journal`, with [upstream] from `upstream`; the
    station and VA listeners are off unless `extra` sets them."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        return json.dumps(str(v))

    lines = [
        "[appliance]", f"state_dir = {value(state)}",
        "[hsm]", f"module = {value(softhsm_token.module)}", f"token_label = {value(softhsm_token.label)}",
        f"pin_file = {value(softhsm_token.pin_file)}", f"softhsm_conf = {value(softhsm_token.conf_path)}",
        "[journal]", f"path = {value(journal)}",
        "[upstream]", *(f"{k} = {value(v)}" for k, v in upstream.items()),
    ]  # fmt: skip
    if "[stations]" not in extra:
        lines += ["[stations]", 'lan_listen = ""', f"tls_dir = {value(state / 'tls')}"]
    if "[va]" not in extra:
        lines += ["[va]", 'listen = ""']
    path.write_text("\n".join(lines) + "\n" + extra)
    return path


def write_pem(path: Path, *certs: Any) -> Path:
    path.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs))
    return path


def birthline(*args: str) -> list[str]:
    """The command line of `birthline ARGS` in a child process (this interpreter, this checkout)."""
    return [sys.executable, "-m", "appliance.cli.main", *args]


def outbox_rows(journal: Journal) -> list[dict[str, Any]]:
    """Every outbox row as a dict (the columns of docs/cmp.md "The outbox")."""

    def q() -> list[dict[str, Any]]:
        cur = journal.conn.execute("SELECT * FROM outbox ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]

    return journal.call(q)


# A forwarder over a journal file, in a child process, against the mock at 127.0.0.1:MOCK_PORT (MAC, single mode).
# Every exchange is recorded: when it was sent and answered, the body types both ways, the row's state at the time
# of sending, the checkAfter of a pollRep, and the bytes sent. It prints one JSON line at the end.
MOCK_CHILD = """
import asyncio, json, sys, time
from pathlib import Path
from appliance.cmp import parse_message
from appliance.cmp.forwarder import Forwarder, HttpTransport
from appliance.cmp.model import PollRepBody
from appliance.cmp.protection import MacProtector
from appliance.config import UpstreamSection
from appliance.issuance.journal import Journal

SECRET = sys.argv[3].encode()

class Recording:
    def __init__(self, journal, url):
        self.journal, self.http, self.log = journal, HttpTransport(url, 5, 10), []

    async def post(self, der):
        sent = parse_message(der)
        state = await self.journal.acall(lambda: self.journal.conn.execute(
            "SELECT state FROM outbox WHERE transaction_id=?", (sent.header.transaction_id,)).fetchone())
        entry = {"sent": sent.body_type.asn1_name, "tid": sent.header.transaction_id.hex(), "der": der.hex(),
                 "state": state[0] if state else None, "t_sent": time.time()}
        self.log.append(entry)
        got = await self.http.post(der)
        entry["t_got"] = time.time()
        entry["got_der"] = got.hex()
        reply = parse_message(got)
        entry["got"] = reply.body_type.asn1_name
        if isinstance(reply.body, PollRepBody):
            entry["check_after"] = [e.check_after for e in reply.body.entries]
        return got

async def main() -> int:
    kw = json.loads(sys.argv[2])
    timeout = kw.pop("drain_timeout_s")
    url = f"http://127.0.0.1:{kw.pop('port')}/pkix/"
    with Journal(Path(sys.argv[1])) as journal:
        s = UpstreamSection(url=url, mode="single", protection="mac", kid="ref", recipient="CN=mock",
                            request_timeout_s=10, accept_sha1_mac=True, **kw)
        rec = Recording(journal, url)
        fwd = Forwarder(journal, s, MacProtector(SECRET, b"ref"), secret=SECRET, transport=rec)
        try:
            ok = await fwd.drain(timeout_s=timeout)
        finally:
            await rec.http.close()
            await fwd.close()
        print(json.dumps({"ok": ok, "stats": fwd.stats, "exchanges": rec.log, "clock": time.time()}))
        return 0

sys.exit(asyncio.run(main()))
"""


@dataclass
class MockRun:
    ok: bool
    stats: dict[str, int]
    exchanges: list[dict[str, Any]]
    mock_log: str
    end: float

    def received(self, body: str) -> int:
        """How many requests of this body type (P10CR, POLLREQ, CERTCONF, ...) the mock server logged."""
        return self.mock_log.count(f"received {body}\n")

    def sent(self, body: str) -> list[dict[str, Any]]:
        return [e for e in self.exchanges if e["sent"] == body]


async def forward_to_openssl_mock(
    journal_path: Path,
    work: Path,
    rsp_cert: Path,
    mock_args: list[str],
    *,
    drain_timeout_s: float = 30.0,
    **settings: object,
) -> MockRun:
    """Start `openssl cmp -port` (MAC protection, `rsp_cert` as the enrolment result, plus `mock_args`) and a
    forwarder child process over `journal_path`, both inside a private network namespace (the mock listens on all
    interfaces); return what the child recorded and the mock's log."""
    work.mkdir(parents=True, exist_ok=True)
    child = work / "child.py"
    child.write_text(MOCK_CHILD)
    log = work / "mock.log"
    mock = shlex.join(
        ["openssl", "cmp", "-config", "", "-port", str(MOCK_PORT), "-srv_ref", MOCK_REF,
         "-srv_secret", f"pass:{MOCK_SECRET}", "-mac", "hmacWithSHA256", "-rsp_cert", str(rsp_cert),
         "-verbosity", "7", *mock_args]
    )  # fmt: skip
    kw = json.dumps({"port": MOCK_PORT, "drain_timeout_s": drain_timeout_s, **settings})
    child_cmd = shlex.join([sys.executable, str(child), str(journal_path), kw, MOCK_SECRET])
    script = (
        f"ip link set lo up; {mock} >{shlex.quote(str(log))} 2>&1 & pid=$!; "
        # wait until the mock listens (its log says ACCEPT), at most 5 s; exit 97 if it never does
        f"for i in $(seq 50); do grep -q ACCEPT {shlex.quote(str(log))} && break; sleep 0.1; done; "
        f"grep -q ACCEPT {shlex.quote(str(log))} || exit 97; "
        f"{child_cmd}; rc=$?; kill $pid; wait $pid; exit $rc"
    )
    proc = await asyncio.create_subprocess_exec(
        "unshare", "-n", "sh", "-c", script, env=child_env(),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), drain_timeout_s + 60)
    mock_log = log.read_text() if log.exists() else ""
    assert proc.returncode == 0, (out + err).decode() + mock_log
    data = json.loads(out.decode().strip().splitlines()[-1])
    return MockRun(data["ok"], data["stats"], data["exchanges"], mock_log, data["clock"])
