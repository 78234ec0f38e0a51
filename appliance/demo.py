"""`birthline demo`: the whole appliance on embedded defaults, in one directory, through real stations.

A SoftHSM2 token, a root, an issuing and a management CA, a journal, the daemon with its TLS listener on
loopback, one serial station on a socat pty pair and one LAN station over TLS. Simulated fixtures enrol N
devices (P-256 keys they generate), confirm each certificate, and the demo verifies every certificate against
the chain, in-process and with `openssl verify -x509_strict`. Running it again adds N more devices and shows
that a retried request gets the stored certificate byte for byte. With --serve it then keeps the appliance
running and describes how to reach it in DIR/demo.json.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import secrets
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from appliance import ca as ca_mod
from appliance import stations_registry as registry
from appliance.ca import identity
from appliance.config import Config, MetricsSection, load_config
from appliance.daemon import Daemon
from appliance.daemon_lock import running
from appliance.demo_dashboard import run_dashboard
from appliance.errors import BirthlineError
from appliance.files import PRIVATE, PRIVATE_DIR, tighten, write_private, write_public
from appliance.issuance.journal import journal_files
from appliance.production import store, users
from appliance.production.allowlist import SerialRange
from appliance.production.model import WorkOrderSpec
from appliance.production.users import Role, User
from appliance.runtime import Core, open_core
from appliance.scep import challenges
from hsm.softhsm import create_softhsm_token
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key
from stations.codes import Code
from stations.errors import StationError
from stations.simulator import PtyPair

DEMO_ORG = identity.DEMO_ORGANISATION
# A private-enterprise arc for the demo's hwType; a manufacturer puts its own OID here.
DEMO_HW_TYPE = "1.3.6.1.4.1.59999.1.1"
DEMO_PROFILE = "demo-idevid"
SERIAL_STATION = "demo-serial"
CMP_STATION = "demo-cmp"  # the station the CMP label "demo" acts as (its line and work orders apply)
CMP_LABEL = "demo"
EST_STATION = "demo-est"  # the station the EST label "demo" acts as (docs/est.md)
EST_LABEL = "demo"
EST_USER = "fixture"  # the demo EST label's HTTP Basic user; the password is in est-demo.secret
EST_PORT_OFFSET = 4
# Greenfield: a device signs its ir with the birth certificate it got on the line and gets an operational
# certificate (an LDevID) from another issuing CA, within work order WO-FIELD, through label "field".
FIELD_LABEL = "field"
FIELD_STATION = "demo-field"
FIELD_LINE = "FIELD"
FIELD_CA = "operational"
FIELD_PROFILE = "demo-ldevid"
FIELD_PRODUCT = "demo-sensor-op"
FIELD_WORK_ORDER = "WO-FIELD"
LAN_STATION = "demo-lan"
DEFAULT_PORT = 7450
# SCEP (docs/scep.md) on port + 5: label "scep" (AES, SHA-256: certmonger), and "scep-legacy" for micromdm's
# scepclient, which sends DES and SHA-1 whatever GetCACaps says and can put the device serial in its CN only.
# Both act as station demo-scep on LINE-1; challenge passwords for a few MYDEV serials are in DIR/scep/.
SCEP_STATION = "demo-scep"
SCEP_LABEL = "scep"
SCEP_LEGACY_LABEL = "scep-legacy"
SCEP_PORT_OFFSET = 5
SCEP_DEVICES = {  # a device challenge each, for the label its client speaks (README)
    "MYDEV-0030": SCEP_LEGACY_LABEL, "MYDEV-0031": SCEP_LABEL, "MYDEV-0032": SCEP_LABEL, "MYDEV-0033": SCEP_LABEL,
}  # fmt: skip

CONFIG_TEMPLATE = """\
# Written by `birthline demo`. Every key is documented in docs/configuration.md.
[appliance]
state_dir = "{state}"

[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "{pin_file}"
softhsm_conf = "{softhsm_conf}"

[journal]
path = "journal.sqlite"

[issuance]
issuing_ca = "issuing"
default_profile = "demo-idevid"

[stations]
lan_listen = "127.0.0.1:{port}"
tls_dir = "tls"

[va]
listen = "127.0.0.1:{va_port}"

[cmp]
listen = "127.0.0.1:{cmp_port}"

[cmp.labels.{cmp_label}]
station = "{cmp_station}"
secret_file = "{state}/cmp-demo.secret"
kid = "{cmp_label}"

# Greenfield: devices sign their ir with their birth certificate for an operational certificate. The anchor is
# the CA that issues birth certificates, not the root: the root also certifies the operational CA, and every
# certificate under an idevid_roots anchor is taken for a birth certificate.
[cmp.labels.{field_label}]
station = "{field_station}"
profile = "{field_profile}"
issuing_ca = "{field_ca}"
idevid_roots = "{state}/issuing.pem"

[metrics]
listen = "127.0.0.1:{metrics_port}"

# SCEP: labels act as station {scep_station}; devices authenticate with challenge passwords a supervisor makes
# (`birthline scep challenge add`; the demo's are in {state}/scep/).
[scep]
listen = "127.0.0.1:{scep_port}"

[scep.labels.{scep_label}]
station = "{scep_station}"

# micromdm's scepclient 2.1: DES and SHA-1 (docs/scep.md says what that exposes), device serial in the CN.
[scep.labels.{scep_legacy_label}]
station = "{scep_station}"
legacy_algorithms = ["des", "sha1"]
device_serial_from = "commonName"

# EST (docs/est.md) on port + 4: the label "demo" (also /.well-known/est/...) acts as station {est_station}; a
# fixture authenticates with that station's TLS client certificate or with HTTP Basic.
[est]
listen = "127.0.0.1:{est_port}"
default_label = "{est_label}"

[est.labels.{est_label}]
station = "{est_station}"
station_certificate = true
username = "{est_user}"
password_file = "{state}/est-demo.secret"

[profiles.demo-idevid]
base = "idevid"
subject_o = "{org}"
hardware_module_name = "{hw_type}"
crl_urls = ["http://127.0.0.1:{va_port}/crl/issuing.crl"]
ocsp_url = "http://127.0.0.1:{va_port}/ocsp"

# The operational certificate (LDevID): the birth certificate's subject and extensions, a year's validity.
[profiles.{field_profile}]
base = "idevid"
subject_o = "{org}"
subject_ou = "Operations"
hardware_module_name = "{hw_type}"
validity_days = 365
crl_urls = ["http://127.0.0.1:{va_port}/crl/{field_ca}.crl"]
ocsp_url = "http://127.0.0.1:{va_port}/ocsp"
"""


def _write_config(state: Path, port: int) -> Path:
    """The demo's configuration, written anew on every run: it describes the appliance this run serves (the
    LAN port `port`, the VA on port + 1, CMP on + 2, metrics on + 3, EST on + 4, SCEP on + 5, and the CRL and OCSP URLs
    certificates carry), so every command run with it (`station rotate-key`, `birthline run`, reports) agrees
    with demo.json."""
    token = create_softhsm_token(state / "softhsm", label="birthline-demo")
    secret = state / "cmp-demo.secret"
    if not secret.exists():
        write_private(secret, secrets.token_urlsafe(24).encode() + b"\n")
    est_secret = state / "est-demo.secret"
    if not est_secret.exists():
        write_private(est_secret, secrets.token_urlsafe(18).encode() + b"\n")
    path = state / "birthline.toml"
    write_public(path, CONFIG_TEMPLATE.format(
            state=state,
            module=token.module,
            label=token.label,
            pin_file=token.pin_file,
            softhsm_conf=token.conf_path,
            port=port,
            va_port=port + 1,
            cmp_port=port + 2,
            metrics_port=port + 3,
            scep_port=port + SCEP_PORT_OFFSET,
            scep_label=SCEP_LABEL,
            scep_legacy_label=SCEP_LEGACY_LABEL,
            scep_station=SCEP_STATION,
            est_port=port + EST_PORT_OFFSET,
            est_label=EST_LABEL,
            est_station=EST_STATION,
            est_user=EST_USER,
            cmp_label=CMP_LABEL,
            cmp_station=CMP_STATION,
            field_label=FIELD_LABEL,
            field_station=FIELD_STATION,
            field_profile=FIELD_PROFILE,
            field_ca=FIELD_CA,
            org=DEMO_ORG,
            hw_type=DEMO_HW_TYPE,
        ).encode())  # fmt: skip
    return path


def _next_run(state: Path) -> int:
    marker = state / "demo-runs"
    run = int(marker.read_text()) + 1 if marker.exists() else 1
    write_public(marker, str(run).encode())
    return run


DEMO_LINE = "LINE-1"
DEMO_PRODUCT = "demo-sensor"
HAND_WORK_ORDER = "WO-HAND"
HAND_RANGE = SerialRange("MYDEV-", 1, 100, 4)  # MYDEV-0001 .. MYDEV-0100, for enrolling by hand


def _people(core: Core, state: Path) -> tuple[User, User]:
    """The demo's administrator and supervisor, logged in; their password is a file only root can read."""
    secret = state / "demo-users.secret"
    if not users.list_users(core.journal):
        password = secrets.token_urlsafe(18)
        write_private(secret, password.encode())
        admin = users.bootstrap(core.journal, core.audit, "demo-admin", password)
        users.add_user(core.journal, core.audit, admin, "demo-supervisor", Role.SUPERVISOR, password)
    password = secret.read_text()
    return (
        users.login(core.journal, core.audit, "demo-admin", password),
        users.login(core.journal, core.audit, "demo-supervisor", password),
    )


def _field(core: Core, admin: User, supervisor: User) -> None:
    """The greenfield half: an operational issuing CA, an LDevID product, line FIELD with the station the "field"
    label acts as, and a work order for the hand-enrolled serials. Made once; an older demo state gets it too."""
    who: dict[str, Any] = {"audit": core.audit, "actor": admin.name, "demo": True}
    if FIELD_CA not in {r.name for r in ca_mod.list_cas(core.journal)}:
        ca_mod.create_issuing(core.journal, core.token, FIELD_CA,
                              f"O={DEMO_ORG},CN={DEMO_ORG} Operational CA", "root", **who)  # fmt: skip
    if FIELD_PRODUCT not in {p.name for p in store.list_products(core.journal)}:
        store.add_product(core.journal, core.audit, admin, FIELD_PRODUCT, tenant="demo",
                          profile=core.config.profiles[FIELD_PROFILE], ca=FIELD_CA)  # fmt: skip
    if FIELD_LINE not in {line.name for line in store.list_lines(core.journal)}:
        store.add_line(
            core.journal, core.audit, admin, FIELD_LINE, "devices in the field (greenfield enrolment)"
        )
    if FIELD_STATION not in {r.name for r in registry.list_stations(core.journal)}:
        registry.add_station(
            core.journal, core.token, FIELD_STATION, "lan", audit=core.audit, actor=admin.name
        )
        store.assign_station(core.journal, core.audit, supervisor, FIELD_STATION, FIELD_LINE)
    if FIELD_WORK_ORDER not in {w.id for w in store.list_work_orders(core.journal)}:
        store.add_work_order(core.journal, core.audit, supervisor, WorkOrderSpec(
            FIELD_WORK_ORDER, FIELD_PRODUCT, HAND_RANGE.last, (FIELD_LINE,), ranges=(HAND_RANGE,)), activate=True)  # fmt: skip


def _scep(core: Core, state: Path, admin: User, supervisor: User) -> None:
    """The station the SCEP labels act as, on LINE-1, and challenge passwords made anew on every run (a day's
    validity): one per device in SCEP_DEVICES, and one for work order WO-HAND, in DIR/scep/ (0600)."""
    if SCEP_STATION not in {r.name for r in registry.list_stations(core.journal)}:
        registry.add_station(
            core.journal, core.token, SCEP_STATION, "lan", audit=core.audit, actor=admin.name
        )
        store.assign_station(core.journal, core.audit, supervisor, SCEP_STATION, DEMO_LINE)
    folder = state / "scep"
    folder.mkdir(exist_ok=True, mode=PRIVATE_DIR)
    for device, label in SCEP_DEVICES.items():
        _, secret = challenges.add(core.journal, core.audit, supervisor, label, device_serial=device,
                                   valid_s=86400.0)  # fmt: skip
        write_private(folder / f"{device}.challenge", secret.encode() + b"\n")
    _, secret = challenges.add(core.journal, core.audit, supervisor, SCEP_LEGACY_LABEL,
                               work_order=HAND_WORK_ORDER, valid_s=86400.0)  # fmt: skip
    write_private(folder / f"{HAND_WORK_ORDER}.challenge", secret.encode() + b"\n")


def _production(core: Core, admin: User, supervisor: User, run: int, devices: int) -> list[str]:
    """Tenant, product, a line with both stations, a work order per run and one for trying stations by hand."""
    if not store.list_tenants(core.journal):
        store.add_tenant(core.journal, core.audit, admin, "demo", DEMO_ORG)
        store.add_product(core.journal, core.audit, admin, DEMO_PRODUCT, tenant="demo",
                          profile=core.config.profiles["demo-idevid"], ca="issuing")  # fmt: skip
        store.add_line(core.journal, core.audit, admin, DEMO_LINE)
        for station in (SERIAL_STATION, LAN_STATION, CMP_STATION, EST_STATION):
            store.assign_station(core.journal, core.audit, supervisor, station, DEMO_LINE)
        store.add_work_order(core.journal, core.audit, supervisor, WorkOrderSpec(
            HAND_WORK_ORDER, DEMO_PRODUCT, HAND_RANGE.last, (DEMO_LINE,), ranges=(HAND_RANGE,)), activate=True)  # fmt: skip
    if not devices:
        return []
    spec = WorkOrderSpec(f"WO-{run:04d}", DEMO_PRODUCT, devices, (DEMO_LINE,),
                         ranges=(SerialRange(f"BLD{run:04d}", 1, devices, 6),))  # fmt: skip
    store.add_work_order(core.journal, core.audit, supervisor, spec, activate=True)
    return [spec.id]


def gentle_range(run: int) -> SerialRange:
    """The serials simulated fixtures enrol with --gentle-rate in run `run` (one work order per run)."""
    return SerialRange(f"GEN{run:04d}-", 1, 999_999, 6)


def _gentle_work_order(core: Core, supervisor: User, run: int) -> list[str]:
    rng = gentle_range(run)
    spec = WorkOrderSpec(f"WO-GENTLE-{run:04d}", DEMO_PRODUCT, rng.last, (DEMO_LINE,), ranges=(rng,))
    store.add_work_order(core.journal, core.audit, supervisor, spec, activate=True)
    return [spec.id]


def paused_stations(core: Core) -> set[str]:
    """The stations an operator left paused: the daemon keeps them paused (docs/control-api.md), so the demo's
    fixtures enrol through the others, and the console shows them paused until someone resumes them."""
    rows = core.journal.call(
        lambda: core.journal.conn.execute("SELECT station FROM station_pause").fetchall()
    )
    return {str(r[0]) for r in rows}


def _withdraw(config: Config, state: Path, work_orders: list[str]) -> None:
    """A run that failed closes the work orders it made and used for nothing, so none is left active unused."""
    with open_core(config) as core:
        _, supervisor = _people(core, state)
        for wo in work_orders:
            if store.get_work_order(core.journal, wo).consumed == 0:
                store.close_work_order(core.journal, core.audit, supervisor, wo)


def _setup(
    config: Config, state: Path, run: int, devices: int, *, lan_host: str, gentle: bool = False
) -> tuple[set[str], list[str]]:
    """CAs, stations and production control, created once; a second run finds them and adds a work order.
    LAN bundles name `lan_host`, the listener the configuration file describes. Returns the demo stations an
    operator left paused and the work orders this run made."""
    with open_core(config) as core:
        admin, supervisor = _people(core, state)
        who: dict[str, Any] = {"audit": core.audit, "actor": admin.name}
        # The demo's organisation is its own: refused anywhere else (appliance/ca/identity.py).
        identity.record(core.journal, DEMO_ORG, audit=core.audit, actor=admin.name, demo=True)
        who["demo"] = True
        names = {r.name for r in ca_mod.list_cas(core.journal)}
        if "root" not in names:
            ca_mod.create_root(core.journal, core.token, "root", f"O={DEMO_ORG},CN={DEMO_ORG} Root CA", **who)
        if "issuing" not in names:
            ca_mod.create_issuing(
                core.journal,
                core.token,
                "issuing",
                f"O={DEMO_ORG},CN={DEMO_ORG} Birth Certificate CA",
                "root",
                **who,
            )
        if "management" not in names:
            ca_mod.create_management(
                core.journal, core.token, "management", f"O={DEMO_ORG},CN={DEMO_ORG} Management CA", **who
            )
        issuing = core.issuing_ca()
        write_public(
            state / "ca-chain.pem",
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issuing.chain),
        )
        # The issuing CA is the greenfield label's trust anchor for birth certificates (idevid_roots); the root
        # with it is what a relying party verifies them against (docs: README).
        write_public(state / "root.pem", issuing.chain[-1].public_bytes(serialization.Encoding.PEM))
        write_public(state / "issuing.pem", issuing.certificate.public_bytes(serialization.Encoding.PEM))
        known = {r.name for r in registry.list_stations(core.journal)}
        (state / "pty").mkdir(exist_ok=True)
        for name, kind in (
            (SERIAL_STATION, "serial"),
            (LAN_STATION, "lan"),
            (CMP_STATION, "lan"),
            (EST_STATION, "lan"),
        ):
            bundle = state / "stations" / name
            host = lan_host if kind == "lan" else None
            if name in known and (bundle / "station.key").exists():
                if kind == "lan":
                    registry.set_bundle_host(bundle, host)
                continue
            port = str(state / "pty" / f"{name}.appliance") if kind == "serial" else None
            creds = (
                registry.rotate_key(core.journal, core.token, name, audit=core.audit, actor=admin.name)
                if name in known
                else registry.add_station(
                    core.journal, core.token, name, kind, port=port, audit=core.audit, actor=admin.name
                )
            )
            registry.write_bundle(creds, bundle, lan_host=host)
        paused = paused_stations(core) & {SERIAL_STATION, LAN_STATION}
        if paused == {SERIAL_STATION, LAN_STATION}:
            devices = 0  # nothing to enrol through: no work order for them either
        made = _production(core, admin, supervisor, run, devices)
        _field(core, admin, supervisor)
        _scep(core, state, admin, supervisor)
        if gentle:
            made += _gentle_work_order(core, supervisor, run)
        for label_station in (CMP_STATION, EST_STATION):
            on_line = core.journal.call(
                lambda name=label_station: core.journal.conn.execute(
                    "SELECT line FROM stations WHERE name=?", (name,)
                ).fetchone()
            )
            if on_line is None or on_line[0] is None:  # a demo state made before the CMP or EST label existed
                store.assign_station(core.journal, core.audit, supervisor, label_station, DEMO_LINE)
    return paused, made


class _Fixture:
    """One simulated test fixture: it owns its device keys, as a real fixture's devices do."""

    def __init__(self, client: StationClient) -> None:
        self.client = client

    async def enrol(self, serial: str) -> tuple[bytes, bytes]:
        csr = make_csr(generate_device_key(), serial)
        chain = await self.client.enroll(serial, csr)
        assert self.client.last_request_id is not None
        await self.client.confirm(self.client.last_request_id, chain[0])
        return chain[0], csr


async def _connect(state: Path, name: str, lan: tuple[str, int], fixture_port: str) -> StationClient:
    bundle = state / "stations" / name
    key = read_station_key(bundle / "station.key")
    if name == SERIAL_STATION:
        return await StationClient.connect_serial(
            fixture_port, 115200, station_id=name, key=key, give_up_after=30
        )
    ctx = client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt")
    return await StationClient.connect_tcp(
        lan[0],
        lan[1],
        station_id=name,
        key=key,
        ssl_context=ctx,
        server_hostname="localhost",
        give_up_after=30,
    )


def _describe(
    state: Path, config: Config, lan: tuple[str, int], fixture_port: str, metrics_url: str | None = None
) -> dict[str, object]:
    va_url = config.va.listen and f"http://{config.va.listen}"
    return {
        "control": {"socket": str(config.control_socket), "api": "docs/control-api.md",
                    "login": "demo-supervisor or demo-admin, password in the supervisor's password_file"},
        "metrics": {"url": metrics_url, "format": "OpenMetrics (docs/metrics.md)"},
        "listener": {"host": lan[0], "port": lan[1], "transport": "TLS 1.2+ with station client certificates",
                     "protocol": "docs/station-protocol.md"},
        "stations": [
            {"name": SERIAL_STATION, "kind": "serial", "pty": fixture_port,
             "appliance_port": str(state / "pty" / f"{SERIAL_STATION}.appliance"), "baud": 115200,
             "credentials": str(state / "stations" / SERIAL_STATION)},
            {"name": LAN_STATION, "kind": "lan", "host": f"{lan[0]}:{lan[1]}",
             "credentials": str(state / "stations" / LAN_STATION)},
        ],
        "ca_chain": str(state / "ca-chain.pem"),
        "cmp": {
            "url": f"http://{config.cmp.listen}/.well-known/cmp/p/{CMP_LABEL}",
            "server": config.cmp.listen, "path": f".well-known/cmp/p/{CMP_LABEL}", "kid": CMP_LABEL,
            "secret_file": str(state / "cmp-demo.secret"), "mac": "hmacWithSHA256",
            "ra_cert": str(config.cmp.ra_cert or config.stations.tls_dir / "cmp-ra.pem"),
            "root": str(state / "root.pem"), "issuing": str(state / "issuing.pem"),
        },
        "greenfield": {
            "server": config.cmp.listen, "path": f".well-known/cmp/p/{FIELD_LABEL}",
            "idevid_roots": str(state / "issuing.pem"), "issuing_ca": FIELD_CA, "profile": FIELD_PROFILE,
            "work_order": FIELD_WORK_ORDER, "line": FIELD_LINE,
            "note": "a device with a birth certificate from this demo signs its ir with it (see README)",
        },
        "scep": _describe_scep(state, config),
        "est": {
            "url": f"https://{config.est.listen}/.well-known/est",
            "server": config.est.listen, "label": EST_LABEL, "station": EST_STATION,
            "tls_ca": str(config.stations.tls_dir / "management-ca.crt"),
            "basic_user": EST_USER, "password_file": str(state / "est-demo.secret"),
            "station_tls_cert": str(state / "stations" / EST_STATION / "tls-client.crt"),
            "station_tls_key": str(state / "stations" / EST_STATION / "tls-client.key"),
            "docs": "docs/est.md",
        },
        "crl_url": f"{va_url}/crl/issuing.crl",
        "ocsp_url": f"{va_url}/ocsp",
        "supervisor": {"user": "demo-supervisor", "password_file": str(state / "demo-users.secret")},
        "config": str(config.source),
        "journal": str(config.journal.path),
        "device_serials": {
            "work_order": HAND_WORK_ORDER,
            "line": DEMO_LINE,
            "accepted": f"{HAND_RANGE.prefix}{HAND_RANGE.first:0{HAND_RANGE.width}d} .. "
            f"{HAND_RANGE.prefix}{HAND_RANGE.last:0{HAND_RANGE.width}d}",
            "quantity": HAND_RANGE.last,
            "note": "each serial once; other serials are refused as not authorised (see docs/production.md)",
        },
    }  # fmt: skip


def _describe_scep(state: Path, config: Config) -> dict[str, object]:
    base = f"http://{config.scep.listen}/scep"
    ra_cert = config.scep.ra_cert or config.stations.tls_dir / "scep-ra.pem"
    fingerprint = None
    if ra_cert.exists():
        cert = x509.load_pem_x509_certificate(ra_cert.read_bytes())
        fingerprint = cert.fingerprint(hashes.SHA256()).hex()
    return {
        "url": f"{base}/{SCEP_LABEL}", "legacy_url": f"{base}/{SCEP_LEGACY_LABEL}", "station": SCEP_STATION,
        "ra_cert": str(ra_cert), "ra_fingerprint_sha256": fingerprint,
        "challenges": [{"device_serial": d, "label": label, "url": f"{base}/{label}",
                        "file": str(state / "scep" / f"{d}.challenge")} for d, label in SCEP_DEVICES.items()],
        "work_order_challenge": {"work_order": HAND_WORK_ORDER, "label": SCEP_LEGACY_LABEL,
                                 "file": str(state / "scep" / f"{HAND_WORK_ORDER}.challenge")},
        "note": "url: AES and SHA-256 (certmonger); legacy_url: DES and SHA-1 for micromdm's scepclient, the device"
                " serial in the CN (docs/scep.md); each device challenge is one-time, valid for a day",
    }  # fmt: skip


async def _run(
    config: Config, state: Path, run: int, devices: int, serve: bool, gentle_rate: float = 0.0,
    dashboard: bool = False, paused: frozenset[str] = frozenset(),
) -> int:  # fmt: skip
    serials = [f"BLD{run:04d}{n:06d}" for n in range(1, devices + 1)]
    for name in sorted(paused):
        print(f"demo: station {name} is paused (an operator resumes it on the console); the demo's devices are"
              " enrolled through the others")  # fmt: skip
    appliance_port = str(state / "pty" / f"{SERIAL_STATION}.appliance")
    fixture_port = str(state / "pty" / f"{SERIAL_STATION}.fixture")
    with PtyPair(appliance_port, fixture_port) as _pty:
        async with Daemon(config) as daemon:
            lan = daemon.lan_address
            assert lan is not None
            serial_client = await _connect(state, SERIAL_STATION, lan, fixture_port)
            lan_client = await _connect(state, LAN_STATION, lan, fixture_port)
            fixtures = [
                _Fixture(c)
                for name, c in ((SERIAL_STATION, serial_client), (LAN_STATION, lan_client))
                if name not in paused
            ]
            try:
                t0 = time.perf_counter()

                async def line(fixture: _Fixture, mine: list[str]) -> list[tuple[str, bytes, bytes]]:
                    return [(s, *await fixture.enrol(s)) for s in mine]

                n = max(len(fixtures), 1)
                per_line = await asyncio.gather(*(line(f, serials[i::n]) for i, f in enumerate(fixtures)))
                elapsed = time.perf_counter() - t0
                results = sorted((r for rs in per_line for r in rs), key=lambda r: r[0])
                retry_same = True
                if results:
                    # The fixture lost the answer and asks again, on the other line, with the same CSR.
                    serial, cert, csr = results[0]
                    retry = serial_client if LAN_STATION in paused else lan_client
                    again = await retry.enroll(serial, csr)
                    retry_same = again[0] == cert
                if serve:
                    metrics = daemon.control.metrics_url if daemon.control is not None else None
                    write_public(
                        state / "demo.json",
                        json.dumps(_describe(state, config, lan, fixture_port, metrics), indent=2).encode(),
                    )
            finally:
                for c in (serial_client, lan_client):
                    await c.close()
            counts = daemon.journal.counts()
            unconfirmed = _unconfirmed(daemon, serials)
            rc = _report(state, config, run, serials, results, elapsed, retry_same, counts, unconfirmed)
            if serve and rc == 0:
                gentle = GentleLine(state, lan, fixture_port, run, gentle_rate) if gentle_rate > 0 else None
                await _serve(daemon, state, lan, fixture_port, gentle,
                             config.control_socket if dashboard else None)  # fmt: skip
            return rc


async def _serve(
    daemon: Daemon, state: Path, lan: tuple[str, int], fixture_port: str, gentle: GentleLine | None = None,
    dashboard: Path | None = None,
) -> None:  # fmt: skip
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, daemon.stop)
    print(
        f"\nServing on {lan[0]}:{lan[1]} (LAN, TLS) and {fixture_port} (serial pty). Described in {state}/demo.json."
    )
    if gentle is not None:
        print(f"Simulated fixtures enrol {gentle.rate:g} device(s)/s on both stations (work order"
              f" WO-GENTLE-{gentle.run:04d}).")  # fmt: skip
    print("Try a station by hand (see README), then press Ctrl-C to stop.", flush=True)
    async with gentle if gentle is not None else contextlib.nullcontext():
        done = asyncio.ensure_future(daemon.wait())
        if dashboard is not None:
            closed = await run_dashboard(dashboard, "demo-supervisor", state / "demo.log", done)
            if closed:
                print(f"The dashboard closed; the appliance goes on serving (its log: {state}/demo.log). Open the"
                      f" dashboard again with `birthline dashboard --config {state}/birthline.toml`; Ctrl-C stops"
                      " the demo.", flush=True)  # fmt: skip
        await done


class GentleLine:
    """Simulated fixtures that keep enrolling at a gentle rate while the demo is served, so a console has
    something to show: one on each demo station, together `rate` devices per second. A fixture refused (a
    paused station, a refusal) notes it, waits a second and goes on; one whose link broke (the daemon
    restarting) connects again. Used as an async context manager around the served demo.

    `issued`, `refused` and `last_error` say what happened (for the dashboard's tests and the demo's output).
    """

    def __init__(self, state: Path, lan: tuple[str, int], fixture_port: str, run: int, rate: float) -> None:
        self.state = state
        self.lan = lan
        self.fixture_port = fixture_port
        self.run = run
        self.rate = rate
        self.issued = 0
        self.refused: dict[str, int] = {}
        self.last_error: str | None = None
        self._next = 0
        self._tasks: list[asyncio.Task[None]] = []

    def _serial(self) -> str:
        rng = gentle_range(self.run)
        self._next += 1
        return f"{rng.prefix}{self._next:0{rng.width}d}"

    async def __aenter__(self) -> GentleLine:
        for name in (SERIAL_STATION, LAN_STATION):
            self._tasks.append(asyncio.create_task(self._fixture(name), name=f"gentle {name}"))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _fixture(self, name: str) -> None:
        interval = 2.0 / self.rate  # two fixtures share the rate
        while True:
            try:
                client = await _connect(self.state, name, self.lan, self.fixture_port)
            except (StationError, OSError) as exc:
                self.last_error = f"{name}: {exc}"
                await asyncio.sleep(1.0)
                continue
            try:
                serial = self._serial()
                while True:
                    await asyncio.sleep(interval)
                    try:
                        await _Fixture(client).enrol(serial)
                    except StationError as exc:
                        self.refused[exc.code.name] = self.refused.get(exc.code.name, 0) + 1
                        self.last_error = f"{name}: {exc}"
                        if exc.code in (Code.STATION_PAUSED, Code.BUSY):
                            await asyncio.sleep(1.0)
                            continue  # the same device again once the station is resumed
                        if exc.code.value >= 100 or exc.code is Code.INTERNAL:
                            raise  # the link, not the device: connect again
                    else:
                        self.issued += 1
                    serial = self._serial()
            except (StationError, OSError) as exc:
                self.last_error = f"{name}: {exc}"
                await asyncio.sleep(1.0)
            finally:
                await client.close()


def _unconfirmed(daemon: Daemon, serials: list[str]) -> list[str]:
    """This run's devices whose certificate is not confirmed. Only these: anything else in the journal (a CMP
    client that never sent certConf, a station that gave up) is normal and none of this run's business."""
    wanted = set(serials)

    def q() -> list[str]:
        rows = daemon.journal.conn.execute(
            "SELECT device_serial FROM issuance WHERE state = 'issued' AND station IN (?, ?)",
            (SERIAL_STATION, LAN_STATION),
        ).fetchall()
        return sorted(str(r[0]) for r in rows if r[0] in wanted)

    return daemon.journal.call(q)


def _report(
    state: Path, config: Config, run: int, serials: list[str], results: list[tuple[str, bytes, bytes]],
    elapsed: float, retry_same: bool, counts: dict[str, int], unconfirmed: list[str],
) -> int:  # fmt: skip
    issued_dir = state / "issued"
    issued_dir.mkdir(exist_ok=True)
    chain = x509.load_pem_x509_certificates((state / "ca-chain.pem").read_bytes())
    files = []
    for serial, der, _ in results:
        cert = x509.load_der_x509_certificate(der)
        cert.verify_directly_issued_by(chain[0])
        f = issued_dir / f"{serial}.pem"
        write_public(f, cert.public_bytes(serialization.Encoding.PEM))
        files.append(f)
    ok = _openssl_verify(state / "ca-chain.pem", files)
    rate = len(results) / elapsed if elapsed > 0 else 0.0
    print(
        f"Birthline demo, run {run}: issued {len(results)} birth certificates in {elapsed:.2f} s ({rate:.0f}/s)"
    )
    print(f"  stations:      {SERIAL_STATION} (serial, socat pty) and {LAN_STATION} (TLS on 127.0.0.1)")
    print(f"  CA chain:      {state / 'ca-chain.pem'} (issuing CA, then root)")
    if serials:
        print(f"  certificates:  {issued_dir}/<device-serial>.pem ({serials[0]} .. {serials[-1]})")
    print(f"  journal:       {config.journal.path}: {json.dumps(counts, sort_keys=True)}")
    print(f"  verified:      {len(files)} against the chain in-process; openssl verify -x509_strict: {ok}")
    print(
        f"  retry of {serials[0] if serials else '-'}: {'same certificate, byte for byte' if retry_same else 'MISMATCH'}"
    )
    confirmed_all = not unconfirmed
    if not confirmed_all:
        print(f"  not confirmed by their station: {', '.join(unconfirmed[:10])}")
    return 0 if ok == "OK" and retry_same and len(results) == len(serials) and confirmed_all else 1


DASHBOARD_GENTLE_RATE = (
    1.0  # devices/s the simulated fixtures enrol under `--dashboard` unless told otherwise
)


def run_demo(
    state: Path, devices: int, *, serve: bool = False, port: int | None = None, gentle_rate: float = 0.0,
    dashboard: bool = False,
) -> int:  # fmt: skip
    """The demo; `dashboard` (which implies `serve`) opens `birthline dashboard` on it in this terminal, with
    simulated fixtures enrolling at `gentle_rate` (DASHBOARD_GENTLE_RATE if not given)."""
    if dashboard:
        serve = True
        gentle_rate = gentle_rate or DASHBOARD_GENTLE_RATE
    state = state.resolve()
    holder = running(state)
    if holder is not None:
        print(f"demo: {holder} already runs on {state}; stop it first")
        return 1
    state.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    # The file names the served ports (DEFAULT_PORT unless --port); a run that does not serve takes any free
    # ports instead, in memory, so it never collides with a running demo.
    file_port = port if port is not None else DEFAULT_PORT
    config = load_config(_write_config(state, file_port))
    # The demo owns its directory: state an older version (or another umask) left readable is made private
    # here, where any other command refuses it (appliance.runtime.check_state).
    tighten([state], PRIVATE_DIR)
    tighten(journal_files(config.journal.path), PRIVATE)
    if not serve:
        config = dataclasses.replace(
            config,
            stations=dataclasses.replace(config.stations, lan_listen="127.0.0.1:0"),
            va=dataclasses.replace(config.va, listen="127.0.0.1:0"),
            cmp=dataclasses.replace(config.cmp, listen="127.0.0.1:0"),
            scep=dataclasses.replace(config.scep, listen="127.0.0.1:0"),
            est=dataclasses.replace(config.est, listen="127.0.0.1:0"),
            metrics=MetricsSection(listen=""),
        )
    try:
        run = _next_run(state)
        paused, made = _setup(
            config, state, run, devices, lan_host=f"127.0.0.1:{file_port}", gentle=serve and gentle_rate > 0
        )
    except (BirthlineError, StationError) as exc:
        print(f"demo: {exc}")
        return 1
    if paused == {SERIAL_STATION, LAN_STATION}:
        devices = 0
    try:
        return asyncio.run(
            _run(config, state, run, devices, serve, gentle_rate, dashboard, frozenset(paused))
        )
    except (BirthlineError, StationError, OSError) as exc:
        print(f"demo: {exc}")
        with contextlib.suppress(BirthlineError):
            _withdraw(config, state, made)
            if made:
                print(f"demo: the unused work orders this run made are closed ({', '.join(made)})")
        return 1


def _openssl_verify(chain: Path, files: list[Path]) -> str:
    if not files:
        return "OK"
    openssl = shutil.which("openssl")
    if openssl is None:
        return "skipped (openssl not installed)"
    certs = x509.load_pem_x509_certificates(chain.read_bytes())
    root = chain.with_name("root.pem")
    untrusted = chain.with_name("issuing.pem")
    write_public(root, certs[-1].public_bytes(serialization.Encoding.PEM))
    write_public(untrusted, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[:-1]))
    proc = subprocess.run(
        [
            openssl,
            "verify",
            "-x509_strict",
            "-CAfile",
            str(root),
            "-untrusted",
            str(untrusted),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    good = sum(1 for line in proc.stdout.splitlines() if line.endswith(": OK"))
    return (
        "OK"
        if proc.returncode == 0 and good == len(files)
        else f"FAILED ({proc.stdout[-300:]}{proc.stderr[-300:]})"
    )
