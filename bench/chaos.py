"""The crash campaign: SIGKILL a real `birthline run` at random moments and at every named crash point while every
front end works at once, restart it, and check after every restart that nothing signed was lost or issued twice.

    python bench/chaos.py [--kills 40] [--seed 1] [--minutes M] [--dir DIR]

What runs (all at once, against one daemon started through bench/chaos_launcher.py, which writes down every HSM
signature with fsync before the signature is returned to its caller):
  - two LAN stations (TLS) and one serial station on a socat pty pair, enrolling devices and confirming them with
    the station protocol (stations/client.py), and now and then asking again for a device they already hold;
  - a CMP client, the `openssl cmp` binary: ir with MAC protection on label "chaos", then for every third device
    rr signed with the device's own key (revocation; the daemon's CRL publisher signs a new CRL after each), and
    `openssl ocsp` asking the VA about it;
  - the project's own CMP client (bench/chaos_cmp.py: appliance/cmp build, parse, header and protection code over
    HTTP) on the local label and on an RA-mode label: ir, pollReq while "waiting", certConf; an ir a kill cut is
    sent again (same key): the stored certificate or a clean refusal, never a second one;
  - EST (stations/est.py: simpleenroll, and simplereenroll with a new key for every fourth device) and SCEP
    (micromdm's scepclient, a work-order challenge) clients (bench/chaos_http.py);
  - the upstream forwarder in local mode (every issuance, renewal and revocation goes to the upstream CA) and in
    RA mode: a second product, widget-ra, in issuance mode upstream on line L2, whose devices (a LAN station told
    PENDING until the certificate comes, and the own CMP client's RA label) get the upstream CA's certificate.
    The upstream is a second Birthline (bench/upstream_peer.py, its own SoftHSM token and journal), never killed.
Each round starts the daemon (with BIRTHLINE_CRASH_POINT set to the next named point of appliance/crashpoints.py
every other round), waits until it listens, runs the checks below, starts the clients, and SIGKILLs the daemon:
at the crash point when the round names one (the daemon kills itself there; if the round's work never reaches
the point, it is killed after a while and counted as "not reached"), otherwise after a random number of
completed operations plus a random fraction of a second, so the kill lands while requests are in flight.
After the last kill, a final round runs without a kill until every device has its certificate, every revocation
is acknowledged and the outbox is drained; then the checks run once more with the end-of-run rules.

Checks (every one a violation when it fails):
  serial       no certificate serial used twice (journal rows, and every certificate any client received)
  signature    every HSM signature is accounted for: by the issuing CA, a certificate whose TBS is an issuance row
               (issued, confirmed, burned, ...) or the delegated OCSP signer's, or a CRL, or an OCSP answer; by
               the RA key a CMP protection; by the audit key a checkpoint claim still in the chain; by the
               management CA a TLS/RA certificate the appliance keeps; by the SCEP RA at least one per SCEP answer
               received. And every certificate and daemon-made checkpoint in the journal was seen by the wrapper;
               no certificate TBS is signed twice, and the certificate signatures number the rows that reached
               signing (stored certificates + burned intents signed) and the OCSP signer certificates kept
  quota        each work order's consumed count equals its live units (appliance.production.reconcile)
  received     every certificate any client received is in the journal, same bytes, live
  retry        a device asked for again (same key) gets the certificate it got before, byte for byte
  audit        the audit chain verifies with the audit key pinned before the run, and still holds the head the
               previous check saw (truncation)
  daemon       a daemon death before the campaign's kill counts as reaching the armed point only with the marker
               that point writes (crashpoints.die); any other death (starting or working) is a violation
  outbox       at most one outbox row per record; every live certificate and revocation has its row;
               the upstream holds per device at most one certificate per record (a renewal is a second
               record; at the end: exactly that, every row done)
  revoked      every revocation the CMP client saw acknowledged is in the journal; OCSP never says good for it;
               at the end the stored CRL lists every revocation
  ra           (RA mode) at most one live ra_request per device and no device both local and RA; no request
               refused upstream; a device's certificate is its ra_request's and the upstream's, byte for byte; one
               outbox row per request; at the end every request has the upstream's certificate
It prints the kills (at each named point, how many reached it; random ones, how many landed with requests in
flight) and a final line `chaos: N kills (...), violations: V`. Exit status 0 only when V is 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import faulthandler
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance import ca as ca_mod
from appliance import stations_registry as registry
from appliance.audit.encoding import checkpoint_message
from appliance.audit.log import AUDIT_KEY_LABEL, AuditLog, ensure_audit_key
from appliance.audit.verify import verify as audit_verify
from appliance.cmp.labels import read_secret_file
from appliance.cmp.ra import RA_KEY_LABEL, ensure_ra
from appliance.crashpoints import CRASH_ENV, MARKER_ENV, POINTS
from appliance.issuance.journal import Journal
from appliance.production import store
from appliance.production.model import WorkOrderSpec
from appliance.production.reconcile import check_quota
from appliance.production.users import Role, User
from appliance.profiles import builtin_profiles
from appliance.scep import challenges
from appliance.scep.ra import RA_KEY_LABEL as SCEP_RA_KEY_LABEL
from bench import chaos_cmp
from bench.chaos_http import EST_LABEL, EST_STATION, SCEP_LABEL, SCEP_STATION, est_client, scep_client
from bench.issue import floor
from bench.upstream_peer import PATTERN, device_serial
from hsm.softhsm import create_softhsm_token
from hsm.token import Token
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key
from stations.errors import StationError
from stations.simulator import PtyPair

ROOT = Path(__file__).resolve().parents[1]
LAN_STATIONS = ("lan-0", "lan-1")
SERIAL_STATION = "ser-0"
CMP_STATION = "cmp-st"
CMP_LABEL = "chaos"
# RA mode: product widget-ra (issuance mode upstream) on line L2; the upstream CA issues its devices' certificates.
RA_STATION = "lan-ra"  # a LAN station on L2: told PENDING until the forwarder has the upstream's certificate
CMP_RA_STATION = "cmp-ra-st"
CMP_RA_LABEL = "chaos-ra"  # the project's own CMP client's RA label (ir, "waiting", pollReq until the ip)
OWN_CMP = "cmp-own"  # the project's own CMP client (bench/chaos_cmp.py), on both labels
RA_STATES = ("issued", "confirmed")  # ra_request states with the upstream's certificate
LIVE = ("issued", "confirmed", "reworked", "scrapped")
SPKI = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
START_TIMEOUT_S = 120.0
POINT_WAIT_S = 30.0
ROUND_TIMEOUT_S = 300.0  # a round that takes longer is stuck: counted as a violation, the campaign goes on  # a round that names a crash point waits this long for the daemon to reach it

CONFIG = """\
[appliance]
state_dir = "{state}"
[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "{pin}"
softhsm_conf = "{conf}"
[stations]
lan_listen = "127.0.0.1:{lan}"
tls_dir = "{state}/tls"
max_connections_per_peer = 64
[va]
listen = "127.0.0.1:{va}"
[cmp]
listen = "127.0.0.1:{cmp}"
[cmp.labels.{cmp_label}]
station = "{cmp_station}"
secret_file = "{secret}"
kid = "{cmp_label}"
[cmp.labels.{cmp_ra_label}]
station = "{cmp_ra_station}"
secret_file = "{secret}"
kid = "{cmp_ra_label}"
[est]
listen = "127.0.0.1:{est}"
[est.labels.{est_label}]
station = "{est_station}"
password_file = "{est_password}"
[scep]
listen = "127.0.0.1:{scep}"
[scep.labels.{scep_label}]
station = "{scep_station}"
legacy_algorithms = ["des", "sha1"]  # scepclient 2.1 envelopes with DES and signs with SHA-1 (docs/scep.md)
device_serial_from = "commonName"
[upstream]
url = "{upstream_url}"
mode = "batched"
batch_max = 8
batch_wait_s = 0.2
poll_s = 0.2
backoff_base_s = 0.2
backoff_cap_s = 2.0
request_timeout_s = 20.0
server_cert = "{upstream_cert}"
ca_certs = "{upstream_root}"
pending_retry_s = 0.2
[control]
enabled = false
"""


@dataclass
class Device:
    serial: str
    key: ec.EllipticCurvePrivateKey
    csr: bytes
    cert: bytes | None = None  # what a client received
    confirmed: bool = False


@dataclass
class Tally:
    violations: list[str] = field(default_factory=list)
    named: Counter[str] = field(default_factory=Counter)  # kills that named the point
    reached: Counter[str] = field(default_factory=Counter)  # ... and the daemon died there by itself
    random_kills: int = 0
    random_mid_work: int = 0  # random kills with client requests in flight
    startup_deaths: int = 0  # the daemon reached the named point before it listened (forwarding, CRL)
    unplanned_deaths: int = 0  # the daemon died without the armed point's marker: each one is a violation
    checks: int = 0
    status_lost: int = 0  # deaths at the point whose status asyncio lost (255): told by the marker
    start_s: list[float] = field(default_factory=list)  # start to listening, per start
    ops: Counter[str] = field(default_factory=Counter)

    def violation(self, what: str) -> None:
        self.violations.append(what)
        print(f"VIOLATION: {what}", flush=True)


# What the RA key (cmp-ra) may sign, by PKIBody tag: the CMP server's answers (ip cp kup rp pkiconf genp error
# pollRep) and the forwarder's requests to the upstream (cr p10cr kur rr nested certConf pollReq).
_ANSWER, _REQUEST = "server answer", "forwarder request"
CMP_SENT = {
    **dict.fromkeys((1, 3, 8, 12, 19, 22, 23, 26), _ANSWER),
    **dict.fromkeys((2, 4, 7, 11, 20, 24, 25), _REQUEST),
}

FRONT_ENDS = (
    ("stations, LAN TLS + serial pty", ("lan-0", "lan-1", "ser-0", "retry")),
    ("station, LAN, RA mode (PENDING)", ("lan-ra",)),
    ("openssl cmp + openssl ocsp", ("cmp-ir", "cmp-retry", "cmp-retry-failed", "cmp-rr", "ocsp")),
    ("own CMP client (local, RA)", ("cmp-own-local", "cmp-own-ra", "cmp-own-after a kill", "cmp-own-again",
                                    "cmp-own-refused")),
    ("EST (stations/est.py)", ("est-enroll", "est-reenroll", "est-refused")),
    ("SCEP (scepclient)", ("scep", "scep-refused")),
)  # fmt: skip


def ra_floor(journal: Journal, audit: AuditLog) -> None:
    """The RA-mode product beside bench.issue.floor's local one: widget-ra (issuance mode upstream) on line L2
    with the LAN station RA_STATION and the CMP label's station, its own work order for the same serial pattern."""
    admin = User("bench-admin", Role.ADMINISTRATOR)  # made by floor()
    store.add_product(journal, audit, admin, "widget-ra", tenant="bench", profile=builtin_profiles()["idevid"],
                      ca="issuing", issuance_mode="upstream")  # fmt: skip
    store.add_line(journal, audit, admin, "L2")
    journal.call(journal.transaction, lambda conn: conn.execute(
        "INSERT OR IGNORE INTO stations (name, kind, key, created_at) VALUES (?, 'lan', ?, ?)",
        (CMP_RA_STATION, os.urandom(32), time.time())), "chaos station")  # fmt: skip
    for name in (RA_STATION, CMP_RA_STATION):
        store.assign_station(journal, audit, admin, name, "L2")
    spec = WorkOrderSpec("WO-RA", "widget-ra", 1_000_000, ("L2",), pattern=PATTERN)
    store.add_work_order(journal, audit, admin, spec, activate=True)


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)


class Campaign:
    def __init__(self, root: Path, rng: random.Random) -> None:
        self.root = root
        self.rng = rng
        self.state = root / "state"
        self.journal_path = self.state / "journal.sqlite"
        self.siglog = root / "signatures.jsonl"
        self.audit_head: tuple[int, bytes] | None = None  # the last check's audit head: must be extended
        self.marker = root / "crash-marker"  # crashpoints.die() writes "<point> <pid>" here first
        self.tally = Tally()
        self.devices: dict[str, Device] = {}
        self.next_device = 0
        self.in_flight = 0
        self.completed = 0
        self.revoke_acked: set[str] = set()  # hex cert serials the CMP client saw revoked
        self.received_serials: dict[str, bytes] = {}  # hex cert serial -> the certificate a client received
        self.peer: asyncio.subprocess.Process | None = None
        self.pty: PtyPair | None = None
        self._owners: dict[str, set[str]] = {}  # client -> the device serials it enrols
        self.finishing = False  # the final round: finish what was started, start nothing new
        self.stopping = False  # the clients' loops end (a cancellation alone can be lost in wait_for, 3.11)
        self.phase = ""  # where the current round is (reported when a round is stuck)
        self.last_cmp_failure = ""
        self.last_ra: Counter[str] = Counter()
        self.last_forwarded: Counter[str] = Counter()
        self.ra_devices: set[str] = set()  # device serials of the RA-mode product (the upstream CA issues)
        self.renewed: dict[str, bytes] = {}  # EST simplereenroll: device serial -> the renewed certificate
        self.renew_keys: dict[str, ec.EllipticCurvePrivateKey] = {}  # ... and its new key (kept for a retry)
        self.interrupted: set[str] = set()  # the own CMP client's devices whose ir a kill cut: asked again

    # -- setup --------------------------------------------------------------------------------------------
    def setup(self) -> None:
        self.state.mkdir(mode=0o700)
        softhsm = create_softhsm_token(self.root / "softhsm", label="chaos")
        self.softhsm = softhsm
        with Token.open(softhsm.hsm_config()) as token, Journal(self.journal_path) as journal:
            ca_mod.create_root(journal, token, "root", "O=Birthline Chaos,CN=Chaos Root CA")
            ca_mod.create_issuing(journal, token, "issuing", "O=Birthline Chaos,CN=Chaos Birth CA", "root")
            management = ca_mod.create_management(
                journal, token, "management", "O=Birthline Chaos,CN=Chaos Mgmt CA"
            )
            audit = AuditLog(journal)
            (self.root / "pty").mkdir()
            for name in LAN_STATIONS:
                creds = registry.add_station(journal, token, name, "lan", audit=audit, actor="chaos")
                registry.write_bundle(creds, self.root / "stations" / name)
            creds = registry.add_station(journal, token, SERIAL_STATION, "serial", audit=audit, actor="chaos",
                                         port=str(self.root / "pty" / "appliance"))  # fmt: skip
            registry.write_bundle(creds, self.root / "stations" / SERIAL_STATION)
            floor(journal, 1_000_000, stations=(*LAN_STATIONS, SERIAL_STATION, CMP_STATION, EST_STATION,
                                                SCEP_STATION), pattern=PATTERN)  # fmt: skip
            _, self.scep_challenge = challenges.add(journal, audit, User("bench-admin", Role.ADMINISTRATOR),
                                                    SCEP_LABEL, work_order="WO-BENCH", valid_s=30 * 86400)  # fmt: skip
            creds = registry.add_station(journal, token, RA_STATION, "lan", audit=audit, actor="chaos")
            registry.write_bundle(creds, self.root / "stations" / RA_STATION)
            ra_floor(journal, audit)
            # Pinned before the run: the audit chain must verify with THIS key after every kill.
            self.audit_pin = ensure_audit_key(token).public_key()
            (self.state / "tls").mkdir(mode=0o700, exist_ok=True)
            ensure_ra(token, management, self.state / "tls" / "cmp-ra.pem")
            self.management_pem = self.root / "management.pem"
            self.management_pem.write_bytes(management.certificate.public_bytes(serialization.Encoding.PEM))
            issuing = ca_mod.load_ca(journal, "issuing")
            self.issuing_pem = self.root / "issuing.pem"
            self.issuing_pem.write_bytes(issuing.certificate.public_bytes(serialization.Encoding.PEM))
            self.key_roles = {str(r.key_label): r.name for r in ca_mod.list_cas(journal)}
            # Checkpoints signed here, outside the signature-logging launcher: the only ones it cannot have seen.
            self.setup_checkpoints = journal.call(
                lambda: {int(r[0]) for r in journal.conn.execute("SELECT seq FROM audit_checkpoint")}
            )
        self.secret = self.root / "cmp.secret"
        self.est_password = self.root / "est.password"
        for path in (self.secret, self.est_password):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, os.urandom(18).hex().encode() + b"\n")
            os.close(fd)

    async def start_peer(self) -> dict[str, Any]:
        self.peer = await asyncio.create_subprocess_exec(
            sys.executable, str(ROOT / "bench" / "upstream_peer.py"), str(self.root / "peer"),
            str(self.state / "tls" / "cmp-ra.pem"), "1000000", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
        assert self.peer.stdout is not None
        while line := await asyncio.wait_for(self.peer.stdout.readline(), START_TIMEOUT_S):
            if line.startswith(b"{"):
                info: dict[str, Any] = json.loads(line)
                self.peer_journal = Path(info["journal"])
                # RA mode: the devices' certificates must chain to the upstream's root ([upstream] ca_certs)
                peer_journal = Journal(self.peer_journal, read_only=True)
                try:
                    root = ca_mod.load_ca(peer_journal, "root").certificate
                finally:
                    peer_journal.close()
                assert root is not None
                self.peer_root = self.root / "upstream-root.pem"
                self.peer_root.write_bytes(root.public_bytes(serialization.Encoding.PEM))
                return info
        raise RuntimeError("the upstream peer exited before serving")

    async def stop_peer(self) -> None:
        if self.peer is None or self.peer.returncode is not None:
            return
        assert self.peer.stdin is not None
        self.peer.stdin.close()
        try:
            await asyncio.wait_for(self.peer.wait(), 60)
        except TimeoutError:
            os.killpg(self.peer.pid, signal.SIGKILL)
            await self.peer.wait()

    def write_config(self, peer: dict[str, Any]) -> None:
        self.lan, self.va, self.cmp, self.est, self.scep = _free_ports(5)
        self.config = self.root / "birthline.toml"
        self.config.write_text(CONFIG.format(
            state=self.state, module=self.softhsm.module, label=self.softhsm.label, pin=self.softhsm.pin_file,
            conf=self.softhsm.conf_path, lan=self.lan, va=self.va, cmp=self.cmp, cmp_label=CMP_LABEL,
            cmp_station=CMP_STATION, secret=self.secret, upstream_url=peer["url"], upstream_cert=peer["ra_cert"],
            cmp_ra_label=CMP_RA_LABEL, cmp_ra_station=CMP_RA_STATION, upstream_root=self.peer_root,
            est=self.est, est_label=EST_LABEL, est_station=EST_STATION, est_password=self.est_password,
            scep=self.scep, scep_label=SCEP_LABEL, scep_station=SCEP_STATION,
        ))  # fmt: skip

    # -- the daemon ---------------------------------------------------------------------------------------
    async def start_daemon(self, point: str | None) -> asyncio.subprocess.Process:
        env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
        if point:
            env[CRASH_ENV] = point
        env[MARKER_ENV] = str(self.marker)
        self.marker.unlink(missing_ok=True)
        with open(self.root / "daemon.log", "ab") as log:
            return await asyncio.create_subprocess_exec(
                sys.executable, str(ROOT / "bench" / "chaos_launcher.py"), str(self.siglog), "run", "--config",
                str(self.config), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    async def listening(self, proc: asyncio.subprocess.Process) -> bool:
        """True once the LAN, VA and CMP listeners accept; False if the daemon died first."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for port in (self.lan, self.va, self.cmp, self.est, self.scep):
            while True:
                if proc.returncode is not None:
                    return False
                if time.monotonic() > deadline:
                    raise RuntimeError("birthline run never listened; see daemon.log")
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                w.close()
                break
        return True

    @staticmethod
    async def kill(proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the daemon and its prepare workers
        await proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # workers of a daemon that killed itself

    # -- devices ------------------------------------------------------------------------------------------
    def new_device(self) -> Device:
        serial = device_serial(self.next_device)
        self.next_device += 1
        key = generate_device_key()
        dev = Device(serial, key, make_csr(key, serial))
        self.devices[serial] = dev
        return dev

    def received(self, dev: Device, cert: bytes, how: str) -> None:
        if dev.cert is not None and dev.cert != cert:
            self.tally.violation(f"retry: {dev.serial} ({how}) got a different certificate than before")
        dev.cert = cert
        parsed = x509.load_der_x509_certificate(cert)
        serial = format(parsed.serial_number, "x")
        # per issuer: the RA product's certificates are the upstream CA's, whose serials are its own
        other = self.received_serials.setdefault(f"{parsed.issuer.rfc4514_string()}/{serial}", cert)
        if other != cert:
            self.tally.violation(f"serial: two different certificates with serial {serial} reached clients")

    def renewal(self, dev: Device, cert: bytes, key: ec.EllipticCurvePrivateKey) -> None:
        """EST simplereenroll answered: the device's certificate is now `cert` (a retry must get the same)."""
        first = self.renewed.setdefault(dev.serial, cert)
        if first != cert:
            self.tally.violation(f"retry: {dev.serial}'s renewal sent again got a different certificate")
        if dev.cert != cert:
            dev.cert, dev.key = None, key
            self.received(dev, cert, "est simplereenroll")

    # -- clients ------------------------------------------------------------------------------------------
    async def station(self, name: str) -> None:
        """Enrol and confirm new devices, reconnecting after every failure; a device interrupted by a kill is
        asked for again (same key and CSR) before a new one; every fifth step re-asks a device already held."""
        bundle = self.root / "stations" / name
        key = read_station_key(bundle / "station.key")
        pending: list[Device] = [
            d for d in self.devices.values() if d.serial in self.owned(name) and not d.confirmed
        ]
        while not self.stopping:
            try:
                if name == SERIAL_STATION:
                    client = await StationClient.connect_serial(str(self.root / "pty" / "fixture"), 115200,
                                                                station_id=name, key=key, give_up_after=10,
                                                                request_timeout=10.0)  # fmt: skip
                else:
                    ctx = client_ssl_context(
                        bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt"
                    )
                    client = await StationClient.connect_tcp("127.0.0.1", self.lan, station_id=name, key=key,
                                                             ssl_context=ctx, server_hostname="localhost",
                                                             request_timeout=10.0, give_up_after=10)  # fmt: skip
            except (StationError, OSError):
                await asyncio.sleep(0.1)
                continue
            try:
                while not self.stopping:
                    held = [d for d in self.devices.values() if d.serial in self.owned(name) and d.confirmed]
                    if held and self.rng.random() < 0.2 and not self.finishing:
                        dev = self.rng.choice(held)
                        self.in_flight += 1
                        try:
                            chain = await client.enroll(dev.serial, dev.csr)
                        finally:
                            self.in_flight -= 1
                        self.received(dev, chain[0], f"station {name} re-asked")
                        self.tally.ops["retry"] += 1
                        continue
                    if not pending and self.finishing:
                        return
                    if not pending:
                        dev = self.new_device()
                        self.owned(name).add(dev.serial)
                        if name == RA_STATION:
                            self.ra_devices.add(dev.serial)
                        pending.append(dev)
                    dev = pending[0]
                    self.in_flight += 1
                    try:
                        chain = await client.enroll(dev.serial, dev.csr)
                        self.received(dev, chain[0], f"station {name}")
                        assert client.last_request_id is not None
                        await client.confirm(client.last_request_id, chain[0])
                    finally:
                        self.in_flight -= 1
                    dev.confirmed = True
                    pending.pop(0)
                    self.completed += 1
                    self.tally.ops[name] += 1
            except (StationError, OSError):
                await asyncio.sleep(0.1)
            finally:
                with contextlib.suppress(StationError, OSError):
                    await client.close()

    def start_clients(self) -> list[asyncio.Task[None]]:
        stations = [self.station(n) for n in (*LAN_STATIONS, SERIAL_STATION, RA_STATION)]
        others = (self.cmp_client(), self.own_cmp_client(), est_client(self), scep_client(self))
        return [asyncio.create_task(c) for c in (*stations, *others)]

    async def own_cmp_client(self) -> None:
        """The project's own CMP client (bench/chaos_cmp.py): ir for a new device on the local label or the RA
        label in turn, a device a kill interrupted asked again first (same key: the stored certificate or a clean
        refusal, never a second one), and now and then the same ir again for a device it holds."""
        secret = read_secret_file(self.secret)
        while not self.stopping:
            dev = next((d for d in self.devices.values() if d.serial in self.owned(OWN_CMP) and d.cert is None),
                       None)  # fmt: skip
            if dev is None and self.finishing:
                return
            held = [
                d for d in self.devices.values() if d.serial in self.owned(OWN_CMP) and d.cert is not None
            ]
            again = dev is None and held and self.rng.random() < 0.15
            if again:
                dev = self.rng.choice(held)
            elif dev is None:
                dev = self.new_device()
                self.owned(OWN_CMP).add(dev.serial)
                if self.next_device % 2:
                    self.ra_devices.add(dev.serial)
            assert dev is not None
            label = CMP_RA_LABEL if dev.serial in self.ra_devices else CMP_LABEL
            retried = dev.serial in self.interrupted
            self.in_flight += 1
            try:
                cert = await chaos_cmp.enrol(f"http://127.0.0.1:{self.cmp}/.well-known/cmp/p/{label}", label,
                                             secret, dev.key, dev.serial)  # fmt: skip
            except chaos_cmp.CmpBroken as exc:
                self.interrupted.add(dev.serial)  # the daemon killed under it, most likely
                self.last_cmp_failure = str(exc)
                await asyncio.sleep(0.2)
                continue
            except chaos_cmp.CmpRefused as exc:
                self.tally.ops["cmp-own-refused"] += 1
                self.last_cmp_failure = str(exc)
                await asyncio.sleep(0.2)
                continue
            finally:
                self.in_flight -= 1
            self.received(dev, cert, f"own cmp ir ({label})")
            self.interrupted.discard(dev.serial)
            dev.confirmed = True
            kind = (
                "again"
                if again
                else "after a kill"
                if retried
                else "ra"
                if label == CMP_RA_LABEL
                else "local"
            )
            self.tally.ops[f"cmp-own-{kind}"] += 1
            if not again:
                self.completed += 1

    def owned(self, name: str) -> set[str]:
        return self._owners.setdefault(name, set())

    async def openssl(self, *args: str | Path, timeout: float = 30.0) -> tuple[int, str]:
        proc = await asyncio.create_subprocess_exec(
            "openssl", *map(str, args), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            start_new_session=True,
        )  # fmt: skip
        try:
            out, err = await asyncio.wait_for(proc.communicate(), timeout)
        except (TimeoutError, asyncio.CancelledError):
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        assert proc.returncode is not None
        return proc.returncode, (out + err).decode(errors="replace")

    def cmp_args(self, *args: str | Path) -> list[str | Path]:
        return ["cmp", "-config", "", "-server", f"127.0.0.1:{self.cmp}", "-path", f".well-known/cmp/p/{CMP_LABEL}",
                "-msg_timeout", "10", "-total_timeout", "20", *args]  # fmt: skip

    async def cmp_client(self) -> None:
        """ir (MAC) for a new device; every third device is then revoked with rr signed by its own key, and
        the VA asked about it over OCSP. Whatever a kill interrupted is asked again first."""
        work = self.root / "cmp"
        work.mkdir(exist_ok=True)
        while not self.stopping:
            for got in [
                d for d in self.devices.values() if d.serial in self.owned("cmp") and d.cert is not None
            ]:
                if self._revocable(got) and self._serial_of(got) not in self.revoke_acked:
                    await self.revoke(got, work / f"{got.serial}.key", work / f"{got.serial}.pem")
            dev = next(
                (d for d in self.devices.values() if d.serial in self.owned("cmp") and d.cert is None), None
            )
            if dev is None and self.finishing:
                return
            again = [d for d in self.devices.values() if d.serial in self.owned("cmp") and d.cert is not None
                     and not self._revocable(d)]  # fmt: skip
            if dev is None and again and self.rng.random() < 0.15:
                await self.cmp_again(self.rng.choice(again), work)
                continue
            if dev is None:
                dev = self.new_device()
                self.owned("cmp").add(dev.serial)
            key = work / f"{dev.serial}.key"
            if not key.exists():
                key.write_bytes(dev.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))  # fmt: skip
            out = work / f"{dev.serial}.pem"
            out.unlink(missing_ok=True)
            self.in_flight += 1
            try:
                rc, _ = await self.openssl(*self.cmp_args(
                    "-cmd", "ir", "-ref", CMP_LABEL, "-secret", f"file:{self.secret}", "-mac", "hmacWithSHA256",
                    "-recipient", "/CN=Birthline", "-newkey", key, "-subject", f"/serialNumber={dev.serial}",
                    "-certout", out))  # fmt: skip
            finally:
                self.in_flight -= 1
            if rc != 0 or not out.exists():
                await asyncio.sleep(0.2)
                continue
            cert = x509.load_pem_x509_certificate(out.read_bytes())
            self.received(dev, cert.public_bytes(serialization.Encoding.DER), "openssl cmp ir")
            dev.confirmed = True
            self.completed += 1
            self.tally.ops["cmp-ir"] += 1
            if self._revocable(dev):
                await self.revoke(dev, key, out)

    async def cmp_again(self, dev: Device, work: Path) -> None:
        """The same ir again for a device that has its certificate (same key, same serial): the stored one."""
        out = work / f"{dev.serial}.again.pem"
        out.unlink(missing_ok=True)
        self.in_flight += 1
        try:
            rc, said = await self.openssl(*self.cmp_args(
                "-cmd", "ir", "-ref", CMP_LABEL, "-secret", f"file:{self.secret}", "-mac", "hmacWithSHA256",
                "-recipient", "/CN=Birthline", "-newkey", work / f"{dev.serial}.key", "-subject",
                f"/serialNumber={dev.serial}", "-certout", out))  # fmt: skip
        finally:
            self.in_flight -= 1
        if rc == 0 and out.exists():
            cert = x509.load_pem_x509_certificate(out.read_bytes())
            self.received(dev, cert.public_bytes(serialization.Encoding.DER), "openssl cmp ir again")
            self.tally.ops["cmp-retry"] += 1
        else:
            self.tally.ops["cmp-retry-failed"] += 1  # the daemon killed under it, most likely
            self.last_cmp_failure = said[-300:]

    @staticmethod
    def _revocable(dev: Device) -> bool:
        return int(dev.serial[-8:]) % 3 == 0

    @staticmethod
    def _serial_of(dev: Device) -> str:
        return format(x509.load_der_x509_certificate(dev.cert or b"").serial_number, "x")

    async def revoke(self, dev: Device, key: Path, cert_pem: Path) -> None:
        serial = self._serial_of(dev)
        while serial not in self.revoke_acked and not self.stopping:
            self.in_flight += 1
            try:
                rc, said = await self.openssl(*self.cmp_args(
                    "-cmd", "rr", "-oldcert", cert_pem, "-cert", cert_pem, "-key", key,
                    "-srvcert", self.state / "tls" / "cmp-ra.pem", "-revreason", "1"))  # fmt: skip
            finally:
                self.in_flight -= 1
            if rc == 0 or "certRevoked" in said or "already revoked" in said:
                self.revoke_acked.add(serial)
                self.tally.ops["cmp-rr"] += 1
            else:
                await asyncio.sleep(0.2)
                continue
            rc, said = await self.openssl("ocsp", "-issuer", self.issuing_pem, "-cert", cert_pem, "-url",
                                          f"http://127.0.0.1:{self.va}/ocsp", "-noverify", timeout=20)  # fmt: skip
            if rc == 0:
                self.tally.ops["ocsp"] += 1
                if ": good" in said:
                    self.tally.violation(f"revoked: OCSP says good for {serial}, revoked and acknowledged")

    # -- checks -------------------------------------------------------------------------------------------
    def signatures(self) -> list[dict[str, Any]]:
        if not self.siglog.exists():
            return []
        out = []
        for line in self.siglog.read_text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))  # a line cut by the kill is not a signature returned to anyone
        return out

    def check(self, *, final: bool = False) -> None:
        """Every check of the module docstring, on a consistent snapshot of the journal."""
        t = self.tally
        t.checks += 1
        sigs = self.signatures()  # before the snapshot: an issuing-key signature's intent is already durable
        conn = _ro(self.journal_path)
        try:
            conn.execute("BEGIN")
            rows = conn.execute("SELECT cert_serial, device_serial, state, tbs_sha256, cert_der FROM issuance"
                                ).fetchall()  # fmt: skip
            ocsp_signers = [bytes(r[0]) for r in conn.execute("SELECT cert_der FROM ocsp_signer")]
            tls_certs = [
                bytes(r[0])
                for r in conn.execute("SELECT tls_cert_der FROM stations WHERE tls_cert_der IS NOT NULL")
            ]
            revocations = {str(r[0]) for r in conn.execute("SELECT cert_serial FROM revocation")}
            outbox = conn.execute("SELECT kind, cert_serial, state FROM outbox WHERE ra_request_id IS NULL"
                                  ).fetchall()  # fmt: skip
            ra_outbox = Counter(int(r[0]) for r in conn.execute(
                "SELECT ra_request_id FROM outbox WHERE ra_request_id IS NOT NULL"))  # fmt: skip
            ra_open = conn.execute("SELECT COUNT(*) FROM outbox WHERE ra_request_id IS NOT NULL AND state != 'done'"
                                   ).fetchone()[0]  # fmt: skip
            self.last_forwarded = Counter({"local": conn.execute(
                "SELECT COUNT(*) FROM outbox WHERE state='done' AND ra_request_id IS NULL").fetchone()[0],
                "ra": conn.execute("SELECT COUNT(*) FROM outbox WHERE state='done' AND ra_request_id IS NOT NULL"
                                   ).fetchone()[0]})  # fmt: skip
            ra_rows = conn.execute(
                "SELECT id, device_serial, state, cert_der, failure FROM ra_request"
            ).fetchall()
            crl = conn.execute("SELECT der FROM crl WHERE ca='issuing'").fetchone()
            # What the audit key may sign: a checkpoint claim in the chain (claimed before it is signed)
            claims = {
                hashlib.sha256(checkpoint_message(int(seq), bytes(h))).hexdigest(): int(seq)
                for seq, h in conn.execute("SELECT seq, hash FROM audit WHERE event='audit.checkpoint'")
            }
            checkpoints = {
                int(seq): hashlib.sha256(checkpoint_message(int(seq), bytes(h))).hexdigest()
                for seq, h in conn.execute("SELECT seq, head_hash FROM audit_checkpoint")
                if isinstance(seq, int) and len(bytes(h)) == 32
            }
            for problem in check_quota(conn):
                t.violation(f"quota: {problem}")
            conn.execute("COMMIT")
        finally:
            conn.close()
        by_serial = {str(r[0]): r for r in rows}
        # serial: UNIQUE in the schema; a certificate's own serial must be its row's
        for r in rows:
            if r[4] is not None:
                cert = x509.load_der_x509_certificate(bytes(r[4]))
                if format(cert.serial_number, "x") != str(r[0]):
                    t.violation(f"serial: row {r[0]} holds a certificate with serial {cert.serial_number:x}")
                if hashlib.sha256(cert.tbs_certificate_bytes).digest() != bytes(r[3]):
                    t.violation(f"signature: row {r[0]}'s certificate is not the TBS its intent recorded")
            if r[2] == "intent":
                t.violation(f"serial: intent {r[0]} survived a restart")
        # signatures
        tbs = {bytes(r[3]).hex() for r in rows}
        ca_certs = {hashlib.sha256(x509.load_der_x509_certificate(d).tbs_certificate_bytes).hexdigest()
                    for d in ocsp_signers}  # fmt: skip
        mgmt_certs = {hashlib.sha256(x509.load_der_x509_certificate(d).tbs_certificate_bytes).hexdigest()
                      for d in tls_certs + _pem_certs(self.state / "tls")}  # fmt: skip
        seen: set[str] = set()
        kinds: Counter[str] = Counter()
        signed_tbs: Counter[str] = Counter()  # issuing-CA certificate signatures per TBS hash
        audit_signed: set[str] = set()
        for s in sigs:
            role = self.key_roles.get(s["key"])
            if role == "issuing" and s["kind"] == "cert":
                signed_tbs[s["msg"]] += 1
                if s["msg"] in tbs:
                    seen.add(s["msg"])
                    kinds["certificate"] += 1
                elif s["msg"] in ca_certs:
                    kinds["ocsp signer certificate"] += 1
                else:
                    t.violation(
                        f"signature: the issuing CA signed a certificate (TBS {s['msg']}) the journal lacks"
                    )
            elif role == "issuing" and s["kind"] in ("crl", "ocsp"):
                kinds[s["kind"]] += 1
            elif role == "management" and s["kind"] == "cert" and s["msg"] in mgmt_certs:
                kinds["tls/ra certificate"] += 1
            elif s["key"] == RA_KEY_LABEL and s["kind"] == "cmp" and s.get("body") in CMP_SENT:
                kinds[f"cmp protection ({CMP_SENT[s['body']]})"] += 1
            elif s["key"] == SCEP_RA_KEY_LABEL:
                # each CertRep's signed attributes; an RSA key signs a DigestInfo, so the log cannot tell the kind
                kinds["scep answer"] += 1
            elif s["key"] == AUDIT_KEY_LABEL and s["msg"] in claims:
                # the same claim may be signed again after a kill before its checkpoint was stored
                kinds["audit checkpoint"] += 1
                audit_signed.add(s["msg"])
            elif s["key"] == AUDIT_KEY_LABEL:
                t.violation(f"audit: the audit key signed a checkpoint (message {s['msg']}) for a claim the chain"
                            f" no longer holds (truncated?)")  # fmt: skip
            elif s["kind"] == "ocsp" and role is None:
                kinds["ocsp"] += 1  # the delegated OCSP signer's key
            else:
                t.violation(f"signature: unaccounted {s}")
        for r in rows:
            if r[4] is not None and bytes(r[3]).hex() not in seen:
                t.violation(
                    f"signature: certificate {r[0]} is in the journal but the HSM wrapper never saw it"
                )
        # A TBS signed twice is a certificate issued twice (one copy thrown away or handed out unrecorded).
        for digest, n in signed_tbs.items():
            if n > 1:
                t.violation(f"signature: the issuing CA signed certificate TBS {digest} {n} times")
        # Every SCEP answer a client got (a certificate or a signed refusal) is one CertRep the RA key signed; a kill
        # may cut answers after signing, so only "at least".
        scep_answers = t.ops["scep"] + t.ops["scep-refused"]
        if kinds["scep answer"] < scep_answers:
            t.violation(
                f"signature: {kinds['scep answer']} SCEP RA signatures for {scep_answers} answers received"
            )
        for seq, message in checkpoints.items():
            if seq not in self.setup_checkpoints and message not in audit_signed:
                t.violation(f"audit: checkpoint {seq} is in the journal but the wrapper never saw it signed")
        burned_signed = sum(1 for r in rows if r[2] == "burned" and bytes(r[3]).hex() in seen)
        # ... and in total: one certificate signature per row that reached signing (a stored certificate, or a
        # burned intent the log shows signed), plus one per OCSP signer certificate the journal keeps.
        reached_signing = sum(1 for r in rows if r[4] is not None) + burned_signed
        if kinds["certificate"] != reached_signing or kinds["ocsp signer certificate"] != len(ca_certs):
            t.violation(f"signature: {kinds['certificate']} certificate signatures for {reached_signing} rows that"
                        f" reached signing; {kinds['ocsp signer certificate']} OCSP signer certificate signatures"
                        f" for {len(ca_certs)} kept")  # fmt: skip
        self.last_kinds, self.burned_signed = kinds, burned_signed
        # received
        ra_by_device: dict[str, tuple[Any, ...]] = {}
        for r in ra_rows:
            if r[2] != "failed" and ra_by_device.setdefault(str(r[1]), r) is not r:
                t.violation(f"ra: two live ra_request rows for {r[1]}")
        local_devices = {str(r[1]) for r in rows if r[2] != "burned"}
        for device in local_devices & set(ra_by_device):
            t.violation(f"ra: {device} has both a local certificate and an RA request")
        for r in ra_rows:
            if r[2] == "failed":
                t.violation(f"ra: the upstream refused ra_request {r[0]} ({r[1]}): {r[4]}")
            elif r[2] in RA_STATES and r[3] is None:
                t.violation(f"ra: ra_request {r[0]} is {r[2]} without a certificate")
        for dev in self.devices.values():
            if dev.cert is None:
                continue
            if dev.serial in self.ra_devices:
                ra = ra_by_device.get(dev.serial)
                if ra is None or ra[2] not in RA_STATES or ra[3] is None or bytes(ra[3]) != dev.cert:
                    t.violation(f"received: {dev.serial}'s certificate (RA mode) is not its ra_request's, byte"
                                f" for byte")  # fmt: skip
                continue
            serial = format(x509.load_der_x509_certificate(dev.cert).serial_number, "x")
            row = by_serial.get(serial)
            if row is None or row[4] is None or bytes(row[4]) != dev.cert or str(row[1]) != dev.serial:
                t.violation(
                    f"received: {dev.serial}'s certificate {serial} is not in the journal with the same bytes"
                )
            elif row[2] not in LIVE:
                t.violation(f"received: {dev.serial}'s certificate {serial} is {row[2]} in the journal")
        # revoked
        for serial in self.revoke_acked - revocations:
            t.violation(f"revoked: {serial} was acknowledged revoked but the journal has no revocation")
        # outbox
        records = Counter((str(k), str(s)) for k, s, _ in outbox)
        for (kind, serial), n in records.items():
            if n > 1:
                t.violation(f"outbox: {n} {kind} rows for {serial}")
        issued_records = {s for k, s in records if k != "rr"}
        for r in rows:
            if r[2] in LIVE and str(r[0]) not in issued_records:
                t.violation(f"outbox: certificate {r[0]} has no outbox row")
        for serial in revocations - {s for k, s in records if k == "rr"}:
            t.violation(f"outbox: revocation {serial} has no rr row")
        for ra_id, n in ra_outbox.items():
            if n > 1:
                t.violation(f"outbox: {n} rows for ra_request {ra_id}")
        for r in ra_rows:
            if int(r[0]) not in ra_outbox:
                t.violation(f"outbox: ra_request {r[0]} ({r[1]}) has no outbox row")
        peer = _ro(self.peer_journal)
        try:
            upstream = peer.execute(
                "SELECT device_serial, cert_der FROM issuance WHERE state NOT IN ('burned', 'intent')"
            ).fetchall()
            held = Counter(str(r[0]) for r in upstream)
            peer_revoked = peer.execute("SELECT COUNT(*) FROM revocation").fetchone()[0]
        finally:
            peer.close()
        # The upstream holds one certificate per record: per device, one per live local certificate (a renewal
        # adds one: the kur record) or the RA request's one - which the upstream may hold while the request is
        # still pending here (a kill after the upstream answered, before the answer was recorded; the next send
        # is answered with the same certificate).
        ra_issued = {d: r for d, r in ra_by_device.items() if r[2] in RA_STATES and r[3] is not None}
        expected = Counter(dict.fromkeys(ra_by_device, 1)) + Counter(str(r[1]) for r in rows if r[2] in LIVE)
        for device, n in held.items():
            if n > expected[device]:
                t.violation(f"outbox: the upstream holds {n} certificates for {device}, the journal"
                            f" {expected[device]}")  # fmt: skip
        # RA mode: the certificate the RA journal stores is the one the upstream issued, byte for byte
        upstream_cert = {str(r[0]): r[1] for r in upstream}
        for device, r in ra_issued.items():
            theirs = upstream_cert.get(device)
            if theirs is None or bytes(theirs) != bytes(r[3]):
                t.violation(
                    f"ra: {device}'s certificate in ra_request {r[0]} is not the upstream's, byte for byte"
                )
        self.last_ra = Counter(str(r[2]) for r in ra_rows)
        if final:
            if ra_open:
                t.violation(f"outbox: {ra_open} RA record(s) not done at the end")
            if set(ra_issued) != set(ra_by_device):
                t.violation(f"ra: {len(set(ra_by_device) - set(ra_issued))} RA request(s) still without the"
                            f" upstream's certificate at the end")  # fmt: skip
            states = Counter(str(st) for _, _, st in outbox)
            if set(states) != {"done"}:
                t.violation(f"outbox: not every record done at the end: {dict(states)}")
            if held != expected:
                t.violation(f"outbox: the upstream holds {sum(held.values())} certificates for {len(held)} devices,"
                            f" the journal {sum(expected.values())} for {len(expected)}")  # fmt: skip
            if peer_revoked != len(revocations):
                t.violation(
                    f"outbox: the upstream has {peer_revoked} revocations, the journal {len(revocations)}"
                )
            listed = set()
            if crl is not None:
                listed = {format(e.serial_number, "x") for e in x509.load_der_x509_crl(bytes(crl[0]))}
            if revocations - listed:
                t.violation(f"revoked: the stored CRL lacks {len(revocations - listed)} revocation(s)")
        # audit (its own read-only journal: one snapshot inside verify)
        journal = Journal(self.journal_path, read_only=True)
        try:
            report = audit_verify(journal, public_key=self.audit_pin, expected_head=self.audit_head)
        finally:
            journal.close()
        if not report.ok:
            t.violation(f"audit: {'; '.join(str(p) for p in report.problems)[:500]}")
        else:
            self.audit_head = report.head  # the next check's chain must hold it: no truncation, no rewrite

    # -- the campaign -------------------------------------------------------------------------------------
    def ensure_pty(self) -> None:
        if self.pty is None or not self.pty.running:
            self.pty = PtyPair(self.root / "pty" / "appliance", self.root / "pty" / "fixture").start()

    async def round(self, point: str | None) -> None:
        self.ensure_pty()
        self.phase = "starting"
        proc = await self.start_daemon(point)
        t0 = time.monotonic()
        try:
            up = await self.listening(proc)
            self.tally.start_s.append(time.monotonic() - t0)
            if not up:
                # Died while starting: the named point (the forwarder drains or the CRL publisher runs at once)
                # only if it left its marker; anything else is a violation.
                await proc.wait()
                if point:
                    self.tally.named[point] += 1
                if self.died_at_point(proc, point, "while starting"):
                    self.tally.startup_deaths += 1
                return
            self.phase = "checking"
            self.check()
            self.phase = "working"
            clients = self.start_clients()
            try:
                if point:
                    self.tally.named[point] += 1
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(proc.wait(), POINT_WAIT_S)
                    if proc.returncode is not None:
                        self.died_at_point(proc, point, "on its own")
                else:
                    self.tally.random_kills += 1
                    target = self.completed + self.rng.randint(0, 6)
                    deadline = time.monotonic() + POINT_WAIT_S
                    while self.completed < target and proc.returncode is None and time.monotonic() < deadline:
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(self.rng.random() * 0.3)
                    self.tally.random_mid_work += self.in_flight > 0
                    if proc.returncode is not None:  # no point armed: any death before our kill is one
                        self.died_at_point(proc, None, "on its own before the random kill")
            finally:
                self.phase = "killing"
                await self.kill(proc)
                self.phase = "stopping clients"
                await self.stop_clients(clients)
                self.in_flight = 0
        finally:
            await self.kill(proc)

    def died_at_point(self, proc: asyncio.subprocess.Process, point: str | None, when: str) -> bool:
        """Whether the dead daemon died at the armed point: only its marker says so (the exit status alone cannot:
        asyncio's child watcher may lose it, and SIGKILL may come from elsewhere). Else a violation with the log's
        tail."""
        try:
            marks = self.marker.read_text().split()
        except FileNotFoundError:
            marks = []
        if point is not None and marks == [point, str(proc.pid)]:
            self.tally.reached[point] += 1
            if proc.returncode != -signal.SIGKILL:
                self.tally.status_lost += 1  # asyncio lost the status (255); the marker is the evidence
            return True
        self.tally.unplanned_deaths += 1
        tail = _tail(self.root / "daemon.log")
        self.tally.violation(f"daemon: died {when} (exit {proc.returncode}, armed {point or 'nothing'}, marker"
                             f" {' '.join(marks) or 'none'}); daemon.log ends:\n{tail}")  # fmt: skip
        return False

    async def stop_clients(self, clients: list[asyncio.Task[None]]) -> None:
        """Cancel the clients until they are all done: their loops also watch `stopping`, since a cancellation can
        be swallowed by asyncio.wait_for when the awaited call finishes at the same moment (Python 3.11)."""
        self.stopping = True
        try:
            pending = set(clients)
            while pending:
                for c in pending:
                    c.cancel()
                _, pending = await asyncio.wait(pending, timeout=2)
        finally:
            self.stopping = False

    async def final_round(self) -> None:
        """No kill: every interrupted device and revocation is finished, the outbox drains, the CRL catches up."""
        self.ensure_pty()
        proc = await self.start_daemon(None)
        try:
            if not await self.listening(proc):
                raise RuntimeError("the daemon died in the final round; see daemon.log")
            self.check()
            self.finishing = True
            clients = self.start_clients()
            deadline = time.monotonic() + 300
            _, pending = await asyncio.wait(clients, timeout=300)
            await self.stop_clients(clients)
            if pending or not self._settled():
                self.tally.violation("final: the clients did not finish their devices within 300 s")
            # let the forwarder and the CRL publisher finish what the clients' last requests started
            while time.monotonic() < deadline and not self._drained():
                await asyncio.sleep(0.5)
            self.check(final=True)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 60)
                except TimeoutError:
                    await self.kill(proc)
                    self.tally.violation("daemon: did not stop on SIGTERM")

    def _settled(self) -> bool:
        """Every device some client started holds a certificate (and the stations' are confirmed)."""
        return all(d.cert is not None for d in self.devices.values())

    def _drained(self) -> bool:
        conn = _ro(self.journal_path)
        try:
            open_rows = conn.execute("SELECT COUNT(*) FROM outbox WHERE state != 'done'").fetchone()[0]
            rev = conn.execute("SELECT COUNT(*) FROM revocation WHERE ca='issuing'").fetchone()[0]
            crl = conn.execute("SELECT revoked_count FROM crl WHERE ca='issuing'").fetchone()
        finally:
            conn.close()
        return open_rows == 0 and (rev == 0 or (crl is not None and crl[0] == rev))


def _tail(path: Path, lines: int = 12) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4000))
            text = f.read().decode(errors="replace")
    except OSError as exc:
        return f"({exc})"
    return "\n".join("    " + line for line in text.splitlines()[-lines:])


def _pem_certs(folder: Path) -> list[bytes]:
    out = []
    for path in folder.glob("*"):
        with contextlib.suppress(OSError, ValueError):
            data = path.read_bytes()
            if b"-----BEGIN CERTIFICATE-----" in data:
                out += [
                    c.public_bytes(serialization.Encoding.DER) for c in x509.load_pem_x509_certificates(data)
                ]
    return out


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together while chosen, so they differ)."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


async def run(args: argparse.Namespace, root: Path) -> int:
    rng = random.Random(args.seed)
    c = Campaign(root, rng)
    t0 = time.monotonic()
    c.setup()
    info = await c.start_peer()
    try:
        c.write_config(info)
        plan: list[str | None] = []
        named = list(POINTS)
        for i in range(args.kills):
            plan.append(named[(i // 2) % len(named)] if i % 2 == 0 else None)
        stop_at = t0 + args.minutes * 60 if args.minutes else None
        for i, point in enumerate(plan):
            if stop_at is not None and time.monotonic() > stop_at:
                print(f"  --minutes {args.minutes} reached after {i} kills: final round", flush=True)
                break
            try:
                await asyncio.wait_for(c.round(point), ROUND_TIMEOUT_S)
            except TimeoutError:
                c.tally.violation(f"round {i} ({point or 'random'}) did not end within {ROUND_TIMEOUT_S:.0f} s"
                                  f" (at: {c.phase})")  # fmt: skip
            if (i + 1) % 10 == 0 or i + 1 == len(plan):
                print(f"  {i + 1} kills, {len(c.devices)} devices, {c.tally.checks} checks, "
                      f"{len(c.tally.violations)} violations, {time.monotonic() - t0:.0f} s; reached "
                      f"{sum(c.tally.reached.values())}/{sum(c.tally.named.values())} named, "
                      f"{c.tally.random_mid_work}/{c.tally.random_kills} random mid-work", flush=True)  # fmt: skip
        await c.final_round()
    finally:
        await c.stop_peer()
        if c.pty is not None:
            c.pty.stop()
    t = c.tally
    kills = sum(t.named.values()) + t.random_kills
    print("named crash points (kills / reached):")
    for p in POINTS:
        print(f"  {p:24} {t.named[p]:5} / {t.reached[p]}")
    print(
        f"  ({t.startup_deaths} of the reached ones while the daemon was starting: forwarding or CRL at startup;"
        f" {t.status_lost} whose exit status asyncio lost, counted by their marker)"
    )
    if t.unplanned_deaths:
        print(f"daemon deaths without the armed point's marker (violations): {t.unplanned_deaths}")
    print(f"random kills: {t.random_kills}, with requests in flight: {t.random_mid_work}")
    print(
        "per front end (operations completed; a device's first certificate counts once, its re-asks apart):"
    )
    for front_end, keys in FRONT_ENDS:
        print(f"  {front_end:34} " + ", ".join(f"{k} {t.ops[k]}" for k in keys))
    print(f"  {'forwarder (to the upstream CA)':34} records done: local {c.last_forwarded['local']}, "
          f"RA {c.last_forwarded['ra']}; ra_request rows by state {dict(c.last_ra)}")  # fmt: skip
    other = {k: v for k, v in t.ops.items() if not any(k in keys for _, keys in FRONT_ENDS)}
    print(f"devices {len(c.devices)} ({len(c.ra_devices)} in RA mode); checks {t.checks}; burned after signing "
          f"{c.burned_signed}; other: {other}")  # fmt: skip
    print(f"signatures by kind: {dict(c.last_kinds)}")
    starts = sorted(t.start_s)
    print(f"daemon start to listening: median {starts[len(starts) // 2]:.1f} s, max {starts[-1]:.1f} s")
    reached = sum(t.reached.values())
    print(f"chaos: {kills} kills ({sum(t.named.values())} at named points, {reached} of them reached; "
          f"{t.random_kills} random, {t.random_mid_work} of them mid-work; {t.unplanned_deaths} deaths without the"
          f" marker) in {time.monotonic() - t0:.0f} s, violations: {len(t.violations)}", flush=True)  # fmt: skip
    return 0 if not t.violations else 1


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1` prints where a stuck campaign is
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=40, help="kills before the final round (default 40)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--minutes", type=float, default=0, help="start no new kill after this long (0: no limit)")
    p.add_argument("--dir", type=Path, default=None, help="work here (kept) instead of a temporary directory")
    args = p.parse_args()
    for tool in ("openssl", "socat", "scepclient"):
        if shutil.which(tool) is None:
            sys.exit(f"chaos: {tool} is not installed (scepclient: Debian package scep)")
    if args.dir is not None:
        args.dir.mkdir(parents=True)
        sys.exit(asyncio.run(run(args, args.dir.resolve())))
    with tempfile.TemporaryDirectory(prefix="chaos-") as tmp:
        sys.exit(asyncio.run(run(args, Path(tmp))))


if __name__ == "__main__":
    main()
