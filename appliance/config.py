"""Appliance configuration: TOML into frozen dataclasses, every problem reported at once with where it is.

Secrets are never in this file: the HSM PIN comes from a file or a systemd credential named here.
"""

from __future__ import annotations

import grp
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from cryptography import x509

from appliance import names
from appliance.connections import HttpLimits
from appliance.errors import ConfigError, Problem
from appliance.profiles import Profile, builtin_profiles, parse_profiles
from appliance.text import safe_repr
from appliance.va.service import VaSettings
from hsm.config import HsmConfig

if TYPE_CHECKING:
    # Imported where used: the audit package brings the HSM session layer, which a read-only command never needs.
    from appliance.audit.claims import CheckpointPolicy

DEFAULT_CONFIG_PATH = Path("/etc/birthline/birthline.toml")


@dataclass(frozen=True)
class ApplianceSection:
    state_dir: Path
    # The DNS names and IP addresses the appliance answers to on the LAN: its TLS server certificate carries them
    # (docs/station-protocol.md 13.3). Empty: the built-in names (localhost, birthline, the loopback addresses).
    names: tuple[str, ...] = ()


@dataclass(frozen=True)
class JournalSection:
    path: Path
    batch_max: int = 256
    prewarm: bool = True  # read the public-key index into the page cache after a start (issuance/prewarm.py)


@dataclass(frozen=True)
class IssuanceSection:
    issuing_ca: str = "issuing"
    default_profile: str = "idevid"
    max_csr_bytes: int = 8192
    clock_skew_s: int = 300
    # One: a second worker issued ~1 point of the raw sign rate more (docs/performance.md) for ~36 MB more RSS,
    # past the 150 MB the daemon and its children are held to.
    prepare_workers: int = 1
    pipeline_depth: int = 4
    refusal_burst: int = 60  # refusals per station and window audited in full; the rest are counted
    refusal_window_s: float = 60.0
    quota_warning_percent: int = 5  # warning alarm when an active work order has this share of units left
    max_queued: int = 1024  # requests waiting for the issuance loop; past it one is refused BUSY at once


@dataclass(frozen=True)
class AuditSection:
    """[audit]: how often the daemon signs the audit log; every checkpoint states it, and promises at most
    twice as many unsigned entries and seconds, which `birthline audit verify` enforces (docs/audit.md)."""

    checkpoint_every_entries: int = 1000
    checkpoint_every_s: float = 300.0

    @property
    def policy(self) -> CheckpointPolicy:
        from appliance.audit.claims import CheckpointPolicy

        return CheckpointPolicy(self.checkpoint_every_entries, self.checkpoint_every_s)


@dataclass(frozen=True)
class StationsSection:
    """The station server: the LAN (TLS) listener and the session timers. Serial ports come from the registry."""

    lan_listen: str = "127.0.0.1:7450"  # "host:port"; "" disables the LAN listener
    tls_dir: Path = Path("/var/lib/birthline/tls")
    management_ca: str = "management"
    handshake_timeout_s: float = 10.0
    idle_timeout_s: float = 90.0
    frame_timeout_s: float = 0.5
    reopen_interval_s: float = 0.5
    registry_poll_s: float = 1.0
    failure_limit: int = 10  # failed handshakes / forged frames per station and window before BUSY
    failure_window_s: float = 60.0
    max_connections: int = 128  # LAN listener: open TCP connections, TLS or not yet
    max_connections_per_peer: int = 16  # of these, from one IP address
    auth_timeout_s: float = (
        30.0  # a LAN connection with no authenticated station session after this is closed
    )

    @property
    def lan_address(self) -> tuple[str, int] | None:
        if not self.lan_listen:
            return None
        host, _, port = self.lan_listen.rpartition(":")
        return host.strip("[]"), int(port)


def _is_port(text: str) -> bool:
    """ASCII digits, 0..65535. str.isdigit() alone takes '\u00b2' (which int() refuses) and strings of thousands of
    digits (which int() refuses past 4300)."""
    return text.isascii() and text.isdigit() and len(text) <= 5 and int(text) <= 65535


def _split_listen(value: str) -> tuple[str, int] | None:
    if not value:
        return None
    host, _, port = value.rpartition(":")
    return host.strip("[]"), int(port)


# The HTTP listeners' embedded bounds (docs/configuration.md). The LAN listener and the VA with their accepts in
# flight and the process's reserve fit in the common default file-descriptor limit of 1024; CMP raises it.
VA_LIMITS = HttpLimits(
    max_connections=256, max_connections_per_peer=64, header_timeout_s=10.0, body_timeout_s=10.0,
    idle_timeout_s=15.0,
)  # fmt: skip
CMP_LIMITS = HttpLimits(
    max_connections=128, max_connections_per_peer=32, header_timeout_s=10.0, body_timeout_s=30.0,
    idle_timeout_s=30.0,
)  # fmt: skip


@dataclass(frozen=True)
class VaSection:
    """The validation authority: CRLs and OCSP over HTTP on the appliance's LAN side."""

    listen: str = "127.0.0.1:7451"  # "host:port"; "" serves no CRL or OCSP
    settings: VaSettings = field(default_factory=VaSettings)
    limits: HttpLimits = field(default_factory=lambda: VA_LIMITS)
    ocsp_listen: str = ""  # the OCSP line listener (appliance/va/fastpath.py), "host:port"; "" none

    @property
    def address(self) -> tuple[str, int] | None:
        return _split_listen(self.listen)

    @property
    def ocsp_address(self) -> tuple[str, int] | None:
        return _split_listen(self.ocsp_listen)


@dataclass(frozen=True)
class CmpLabelSection:
    """[cmp.labels.<name>]: a CMP label acts AS a registered station (work-order authorisation). Secrets stay in
    files: `secret_file` (mode 0600) holds the MAC secret; it is read when the daemon starts."""

    station: str
    profile: str | None = None
    secret_file: Path | None = None
    kid: str = ""
    station_signature: bool = False
    trusted_ca: Path | None = None
    allow_rr: bool = False
    allow_nested: bool = False
    implicit_confirm: bool = True
    accept_ra_verified: bool = False
    issuing_ca: str | None = None  # the issuing CA of this label's ir/cr/p10cr; None: [issuance] issuing_ca
    idevid_roots: Path | None = (
        None  # PEM: greenfield, devices sign with a birth certificate chaining to these
    )
    signer_revocation: str = "crl"  # crl | none: revocation of signers from trusted_ca / idevid_roots
    crl_files: tuple[Path, ...] = ()
    crl_fetch: bool = True


@dataclass(frozen=True)
class CmpSection:
    """The CMP server (RFC 9483 over HTTP) on the appliance's LAN side (docs/cmp.md)."""

    listen: str = ""  # "host:port"; "" (the default) serves no CMP
    max_message_bytes: int = 256 * 1024
    confirm_wait_s: float = 300.0
    max_pending: int = 10_000
    default_label: str = ""
    ra_cert: Path | None = None  # where the RA certificate is kept; default <stations.tls_dir>/cmp-ra.pem
    labels: Mapping[str, CmpLabelSection] = field(default_factory=dict)
    limits: HttpLimits = field(default_factory=lambda: CMP_LIMITS)
    crl_timeout_s: float = 5.0  # fetching a signer's CRL from its distribution point
    crl_max_bytes: int = 1024 * 1024
    crl_retry_s: float = 60.0  # after a failed fetch, the same URL is not tried again for this long
    crl_refresh_s: float = 3600.0  # a fetched CRL is fetched again after this long, or at its nextUpdate
    # What peers that have not authenticated may make the server do (appliance/admission.py, docs/cmp.md)
    max_mac_iterations: int = 10_000  # PBM / PBKDF2 iterations a received message may ask for
    check_rate_per_client: float = 5.0  # requests per second per client that do not authenticate
    check_burst_per_client: int = 32
    check_rate_total: float = 20.0  # ... from all clients together (clients known to authenticate excepted)
    check_burst_total: int = 64
    pace_max_delay_s: float = 1.0  # the longest a request is held; further over budget: held, then HTTP 503
    checks_in_flight: int = 2  # MAC derivations and signature verifications at once
    clients_max: int = 4096
    known_client_s: float = 600.0  # a client that authenticated spends no shared budget for this long

    @property
    def address(self) -> tuple[str, int] | None:
        return _split_listen(self.listen)


SCEP_LIMITS = HttpLimits(
    max_connections=128, max_connections_per_peer=32, header_timeout_s=10.0, body_timeout_s=30.0,
    idle_timeout_s=30.0,
)  # fmt: skip
SCEP_LEGACY_ALGORITHMS = ("des", "3des", "sha1", "md5")
SCEP_DEVICE_SERIAL_FROM = ("serialNumber", "commonName")


@dataclass(frozen=True)
class ScepLabelSection:
    """[scep.labels.<name>]: a SCEP URL (/scep/<name>) acting AS a registered station (work-order authorisation,
    as a CMP label). Devices authenticate with challenge passwords made by a supervisor (`birthline scep
    challenge add`), never configured here."""

    station: str
    profile: str | None = None
    device_serial_from: str = (
        "serialNumber"  # the CSR subject attribute a work-order challenge's device names
    )
    renewal: bool = True  # RenewalReq signed by the certificate being renewed
    legacy_algorithms: tuple[str, ...] = ()  # des, 3des, sha1, md5: refused unless listed (docs/scep.md)


@dataclass(frozen=True)
class ScepSection:
    """The SCEP server (RFC 8894 over plain HTTP: the messages are signed and encrypted) (docs/scep.md)."""

    listen: str = ""  # "host:port"; "" (the default) serves no SCEP
    max_message_bytes: int = 64 * 1024
    default_label: str = ""  # the label /scep (without a label) serves; "": 404
    ra_cert: Path | None = None  # where the RA certificate is kept; default <stations.tls_dir>/scep-ra.pem
    labels: Mapping[str, ScepLabelSection] = field(default_factory=dict)
    limits: HttpLimits = field(default_factory=lambda: SCEP_LIMITS)
    # What peers that have not authenticated may make the server do (appliance/admission.py, docs/scep.md):
    # the same keys and defaults as [cmp]'s, a budget of SCEP's own
    check_rate_per_client: float = 5.0  # PKIOperations per second per client that do not authenticate
    check_burst_per_client: int = 32
    check_rate_total: float = 20.0  # ... from all clients together (clients known to authenticate excepted)
    check_burst_total: int = 64
    pace_max_delay_s: float = 1.0  # the longest a request is held; further over budget: held, then HTTP 503
    checks_in_flight: int = 2  # signature verifications and HSM decryptions at once
    clients_max: int = 4096
    known_client_s: float = 600.0  # a client that authenticated spends no shared budget for this long

    @property
    def address(self) -> tuple[str, int] | None:
        return _split_listen(self.listen)


EST_LIMITS = HttpLimits(
    max_connections=128, max_connections_per_peer=32, header_timeout_s=10.0, body_timeout_s=30.0,
    idle_timeout_s=30.0,
)  # fmt: skip


@dataclass(frozen=True)
class EstLabelSection:
    """[est.labels.<name>]: an EST label acts AS a registered station (work-order authorisation), as a CMP label
    does. The HTTP Basic password stays in `password_file` (mode 0600), read when the daemon starts."""

    station: str
    profile: str | None = None
    issuing_ca: str | None = None  # the issuing CA of this label's enrolments; None: [issuance] issuing_ca
    station_certificate: bool = False  # accept the station's own TLS client certificate
    username: str = ""  # HTTP Basic user name; "": the label's name
    password_file: Path | None = None  # HTTP Basic password (0600); None: no Basic authentication
    idevid_roots: Path | None = None  # PEM: greenfield, devices authenticate with a birth certificate
    signer_revocation: str = "crl"  # crl | none: revocation of birth certificates from idevid_roots
    crl_files: tuple[Path, ...] = ()
    crl_fetch: bool = True
    channel_binding: str = "optional"  # optional | required: tls-unique / tls-exporter in the CSR
    serverkeygen: bool = False  # /serverkeygen: the appliance generates the device's key


@dataclass(frozen=True)
class EstSection:
    """The EST server (RFC 7030 with RFC 8951) over TLS on the appliance's LAN side (docs/est.md)."""

    listen: str = ""  # "host:port"; "" (the default) serves no EST
    default_label: str = ""  # the label of /.well-known/est/<operation>; "": those paths answer 404
    max_request_bytes: int = 16 * 1024
    handshake_timeout_s: float = 10.0
    keygen_in_flight: int = 4  # serverkeygen key generations at once; more are answered 503
    auth_failure_limit: int = 10  # failed HTTP Basic logins per peer address and window before 429
    auth_failure_window_s: float = 60.0
    labels: Mapping[str, EstLabelSection] = field(default_factory=dict)
    limits: HttpLimits = field(default_factory=lambda: EST_LIMITS)

    @property
    def address(self) -> tuple[str, int] | None:
        return _split_listen(self.listen)


@dataclass(frozen=True)
class UpstreamSection:
    """[upstream]: the forwarder that sends every issuance and revocation to the upstream CA over CMP as an RA
    (docs/cmp.md "The forwarder"). An empty url (the default): a standalone line, which forwards nothing and writes
    no issuance to the outbox."""

    url: str = ""
    mode: str = "single"  # single | batched
    batch_max: int = 50
    batch_wait_s: float = 2.0
    batches_in_flight: int = 2  # batched mode: nested messages sent at once
    protection: str = "signature"  # signature (the RA key in the HSM) | mac
    secret_file: Path | None = None
    kid: str = ""
    server_cert: Path | None = None  # PEM: the upstream's protection certificate(s), or the CA(s) issuing it
    ca_certs: Path | None = None  # PEM: RA mode: the upstream CA(s) the devices' certificates must chain to
    recipient: str = "CN=Upstream CA"
    implicit_confirm: bool = False
    accept_sha1_mac: bool = (
        False  # accept replies MAC-protected with SHA-1 (openssl's mock server sends them)
    )
    connect_timeout_s: float = 5.0
    request_timeout_s: float = 30.0
    backoff_base_s: float = 2.0
    backoff_cap_s: float = 600.0
    poll_s: float = 1.0
    pending_retry_s: float = 2.0  # RA mode: how long a station told PENDING waits before asking again
    max_queue_age_s: float = 86400.0
    max_queue_size: int = 100_000
    hard_max_queue_age_s: float = 7 * 86400.0
    hard_max_queue_size: int = 1_000_000

    @property
    def enabled(self) -> bool:
        return bool(self.url)


@dataclass(frozen=True)
class ControlSection:
    """[control]: the control API (docs/control-api.md) on a Unix socket; never on TCP."""

    socket: Path | None = None  # None: <state_dir>/control.sock (Config.control_socket)
    group: str = ""  # the group whose members may connect (socket mode 0660); "": the daemon's own group
    enabled: bool = True
    max_connections: int = 32
    max_subscribers: int = 8  # event streams open at once
    subscriber_queue: int = 2048  # events buffered per stream; a stream that falls this far behind is dropped
    request_timeout_s: float = 10.0  # a request's headers and body must arrive within this of connect / idle
    max_body_bytes: int = 16 * 1024
    session_ttl_s: float = 8 * 3600.0  # a console login lasts this long (a shift)
    max_sessions: int = 64
    disk_low_mb: int = 256  # alarm disk.low when the state directory's filesystem has less free than this
    disk_check_s: float = 10.0


@dataclass(frozen=True)
class MetricsSection:
    """[metrics]: OpenMetrics for the plant's monitoring (docs/metrics.md), on its own HTTP listener."""

    listen: str = ""  # "host:port"; "" (the default) serves no metrics

    @property
    def address(self) -> tuple[str, int] | None:
        return _split_listen(self.listen)


@dataclass(frozen=True)
class Config:
    appliance: ApplianceSection
    hsm: HsmConfig
    journal: JournalSection
    issuance: IssuanceSection
    stations: StationsSection = field(default_factory=StationsSection)
    va: VaSection = field(default_factory=VaSection)
    cmp: CmpSection = field(default_factory=CmpSection)
    upstream: UpstreamSection = field(default_factory=UpstreamSection)
    audit: AuditSection = field(default_factory=AuditSection)
    profiles: Mapping[str, Profile] = field(default_factory=dict)
    source: Path | None = None
    control: ControlSection = field(default_factory=ControlSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    scep: ScepSection = field(default_factory=ScepSection)
    est: EstSection = field(default_factory=EstSection)

    @property
    def control_socket(self) -> Path:
        return self.control.socket or self.appliance.state_dir / "control.sock"


class _Reader:
    """Reads one TOML table, collecting problems instead of stopping at the first."""

    def __init__(self, table: Mapping[str, Any], where: str, problems: list[Problem]) -> None:
        self.table = table
        self.where = where
        self.problems = problems
        self.seen: set[str] = set()

    def _get(self, key: str, kind: type | tuple[type, ...], default: Any, required: bool) -> Any:
        self.seen.add(key)
        if key not in self.table:
            if required:
                self.problems.append(Problem(f"{self.where}.{key}", "is required"))
            return default
        value = self.table[key]
        # bool is an int in Python; a TOML `true` is never a valid count.
        if isinstance(value, bool) and kind is int:
            self.problems.append(Problem(f"{self.where}.{key}", f"expected an integer, got {value!r}"))
            return default
        if not isinstance(value, kind):
            name = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            self.problems.append(
                Problem(f"{self.where}.{key}", f"expected {name}, got {type(value).__name__}")
            )
            return default
        return value

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> Any:
        value = self._get(key, str, default, required)
        if isinstance(value, str) and not value and required:
            self.problems.append(Problem(f"{self.where}.{key}", "must not be empty"))
        return value

    def integer(self, key: str, default: int, *, lo: int, hi: int) -> int:
        value = self._get(key, int, default, False)
        if isinstance(value, int) and not lo <= value <= hi:
            self.problems.append(
                Problem(f"{self.where}.{key}", f"must be between {lo} and {hi}, got {value}")
            )
            return default
        return int(value)

    def number(self, key: str, default: float, *, lo: float, hi: float) -> float:
        value = self._get(key, (int, float), default, False)
        if isinstance(value, bool):
            self.problems.append(Problem(f"{self.where}.{key}", f"expected a number, got {value!r}"))
            return default
        if isinstance(value, int | float) and not lo <= value <= hi:
            self.problems.append(
                Problem(f"{self.where}.{key}", f"must be between {lo:g} and {hi:g}, got {value}")
            )
            return default
        return float(value)

    def name(self, key: str, rule: names.Rule) -> None:
        """Check a name-valued key against its kind's rule (appliance.names); the value is read as text after."""
        value = self.table.get(key)
        if isinstance(value, str) and value and (problem := rule.problem(value)) is not None:
            self.problems.append(Problem(f"{self.where}.{key}", problem))

    def flag(self, key: str, default: bool) -> bool:
        return bool(self._get(key, bool, default, False))

    def done(self) -> None:
        for key in sorted(set(self.table) - self.seen):
            self.problems.append(Problem(f"{self.where}.{_shown_key(key)}", "unknown key"))


def _table(data: Mapping[str, Any], key: str, problems: list[Problem]) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, Mapping):
        problems.append(Problem(key, f"expected a table, got {type(value).__name__}"))
        return {}
    return value


def parse_config(
    data: Mapping[str, Any], *, source: Path | None = None, base_dir: Path | None = None
) -> Config:
    """Build a Config from parsed TOML. Relative paths are relative to the config file's directory."""
    if wide := _wide_integers(data):
        # Checked before anything else: the problem texts below print values, and Python refuses to print an
        # integer of more than 4300 digits (a ValueError where a ConfigError is due).
        raise ConfigError(wide, str(source) if source else "")
    problems: list[Problem] = []
    base = base_dir or (source.parent if source else Path.cwd())

    def path(value: str | None) -> Path | None:
        if value is None:
            return None
        p = Path(value)
        return p if p.is_absolute() else (base / p)

    sections = ("appliance", "hsm", "journal", "issuance", "stations", "va", "cmp", "upstream", "audit", "control",
                "metrics", "scep", "est")  # fmt: skip
    for key in sorted(set(data) - {*sections, "profiles"}):
        problems.append(Problem(_shown_key(key), "unknown section"))

    r = _Reader(_table(data, "appliance", problems), "appliance", problems)
    state_dir = path(r.text("state_dir", "/var/lib/birthline")) or Path("/var/lib/birthline")
    host_names = _host_names(r, "names")
    r.done()

    r = _Reader(_table(data, "hsm", problems), "hsm", problems)
    module = r.text("module", required=True)
    token_label = r.text("token_label", required=True)
    pin_file = r.text("pin_file")
    pin_credential = r.text("pin_credential")
    softhsm_conf = r.text("softhsm_conf")
    call_timeout = r.integer("call_timeout_s", 10, lo=1, hi=600)
    if "pin" in r.table:
        problems.append(
            Problem("hsm.pin", "the PIN must never be in the config file; use pin_file or pin_credential")
        )
        r.seen.add("pin")
    if (pin_file is None) == (pin_credential is None):
        problems.append(Problem("hsm", "set exactly one of pin_file or pin_credential"))
    r.done()
    hsm = HsmConfig(
        module=str(module or ""),
        token_label=str(token_label or ""),
        pin_file=str(path(pin_file)) if pin_file else None,
        pin_credential=pin_credential,
        softhsm_conf=str(path(softhsm_conf)) if softhsm_conf else None,
        call_timeout_s=float(call_timeout),
        # Beside the journal: every process of this appliance (daemon, CLI) shares it, and it outlives restarts.
        refused_pin_record=str(state_dir / "hsm-pin-refused"),
    )

    r = _Reader(_table(data, "journal", problems), "journal", problems)
    journal_path = r.text("path", "journal.sqlite")
    batch_max = r.integer("batch_max", 256, lo=1, hi=4096)
    prewarm = r.flag("prewarm", True)
    r.done()
    jp = Path(journal_path or "journal.sqlite")
    journal = JournalSection(
        path=jp if jp.is_absolute() else state_dir / jp, batch_max=batch_max, prewarm=prewarm
    )

    r = _Reader(_table(data, "issuance", problems), "issuance", problems)
    r.name("issuing_ca", names.CA)
    issuance = IssuanceSection(
        issuing_ca=r.text("issuing_ca", "issuing") or "issuing",
        default_profile=r.text("default_profile", "idevid") or "idevid",
        max_csr_bytes=r.integer("max_csr_bytes", 8192, lo=256, hi=65536),
        clock_skew_s=r.integer("clock_skew_s", 300, lo=0, hi=86400),
        prepare_workers=r.integer("prepare_workers", 1, lo=0, hi=64),
        pipeline_depth=r.integer("pipeline_depth", 4, lo=1, hi=16),
        refusal_burst=r.integer("refusal_burst", 60, lo=1, hi=1_000_000),
        refusal_window_s=r.number("refusal_window_s", 60.0, lo=1, hi=86400),
        quota_warning_percent=r.integer("quota_warning_percent", 5, lo=0, hi=100),
        max_queued=r.integer("max_queued", 1024, lo=1, hi=1_000_000),
    )
    r.done()

    r = _Reader(_table(data, "stations", problems), "stations", problems)
    r.name("management_ca", names.CA)
    lan_listen = r.text("lan_listen", "127.0.0.1:7450")
    if isinstance(lan_listen, str) and lan_listen:
        host, sep, port = lan_listen.rpartition(":")
        if not sep or not host or not _is_port(port):
            problems.append(
                Problem("stations.lan_listen", f"expected host:port or empty, got {lan_listen!r}")
            )
            lan_listen = ""
    stations = StationsSection(
        lan_listen=lan_listen if isinstance(lan_listen, str) else "",
        tls_dir=path(r.text("tls_dir", str(state_dir / "tls"))) or state_dir / "tls",
        management_ca=r.text("management_ca", "management") or "management",
        handshake_timeout_s=r.number("handshake_timeout_s", 10.0, lo=0.05, hi=300),
        idle_timeout_s=r.number("idle_timeout_s", 90.0, lo=0.05, hi=86400),
        frame_timeout_s=r.number("frame_timeout_s", 0.5, lo=0.01, hi=60),
        reopen_interval_s=r.number("reopen_interval_s", 0.5, lo=0.01, hi=60),
        registry_poll_s=r.number("registry_poll_s", 1.0, lo=0.01, hi=60),
        failure_limit=r.integer("failure_limit", 10, lo=1, hi=100_000),
        failure_window_s=r.number("failure_window_s", 60.0, lo=1, hi=86400),
        max_connections=r.integer("max_connections", 128, lo=1, hi=1_000_000),
        max_connections_per_peer=r.integer("max_connections_per_peer", 16, lo=1, hi=1_000_000),
        auth_timeout_s=r.number("auth_timeout_s", 30.0, lo=0.05, hi=3600),
    )
    _per_peer_within(stations.max_connections, stations.max_connections_per_peer, "stations", problems)
    r.done()

    r = _Reader(_table(data, "va", problems), "va", problems)
    va_listen = r.text("listen", "127.0.0.1:7451")
    if isinstance(va_listen, str) and va_listen:
        host, sep, port = va_listen.rpartition(":")
        if not sep or not host or not _is_port(port):
            problems.append(Problem("va.listen", f"expected host:port or empty, got {va_listen!r}"))
            va_listen = ""
    never_issued = r.text("never_issued", "unknown")
    if never_issued not in ("unknown", "revoked"):
        problems.append(Problem("va.never_issued", f"expected 'unknown' or 'revoked', got {never_issued!r}"))
        never_issued = "unknown"
    va = VaSection(
        listen=va_listen if isinstance(va_listen, str) else "",
        settings=VaSettings(
            crl_validity_s=r.number("crl_validity_s", 86400.0, lo=600, hi=31 * 86400),
            ocsp_validity_s=r.number("ocsp_validity_s", 3600.0, lo=60, hi=7 * 86400),
            signer_validity_days=r.integer("signer_validity_days", 30, lo=2, hi=365),
            signer_renew_days=r.integer("signer_renew_days", 10, lo=1, hi=364),
            never_issued=never_issued,
            poll_s=r.number("poll_s", 2.0, lo=0.05, hi=3600),
            max_request_bytes=r.integer("max_request_bytes", 4096, lo=256, hi=65536),
            http_max_age_s=r.integer("http_max_age_s", 300, lo=0, hi=86400),
            max_inflight_signs=r.integer("max_inflight_signs", 4, lo=1, hi=64),
            sign_wait_s=r.number("sign_wait_s", 2.0, lo=0, hi=60),
            sign_rate_per_client=r.number("sign_rate_per_client", 50.0, lo=0.001, hi=100_000),
            sign_burst_per_client=r.integer("sign_burst_per_client", 100, lo=1, hi=100_000),
            sign_rate_total=r.number("sign_rate_total", 200.0, lo=0.001, hi=100_000),
            request_rate_per_client=r.number("request_rate_per_client", 200.0, lo=0.001, hi=1_000_000),
            request_burst_per_client=r.integer("request_burst_per_client", 400, lo=1, hi=1_000_000),
            pace_max_delay_s=r.number("pace_max_delay_s", 1.0, lo=0, hi=30),
            request_rate_while_issuing=r.number("request_rate_while_issuing", 2000.0, lo=1, hi=1_000_000),
            clients_max=r.integer("clients_max", 4096, lo=16, hi=1_000_000),
            cache_max=r.integer("cache_max", 10_000, lo=100, hi=1_000_000),
            presign_max=r.integer("presign_max", 0, lo=0, hi=10_000_000),
            presign_batch=r.integer("presign_batch", 128, lo=1, hi=1024),
        ),
        limits=_http_limits(r, VA_LIMITS),
        ocsp_listen=_listen(r, "ocsp_listen", ""),
    )
    if va.settings.signer_renew_days >= va.settings.signer_validity_days:
        problems.append(Problem("va.signer_renew_days", "must be less than signer_validity_days"))
    if va.settings.presign_max > va.settings.cache_max:
        problems.append(Problem(
            "va.presign_max",
            f"must not exceed cache_max ({va.settings.cache_max}): answers made ahead of time past it would push"
            " each other out of the cache",
        ))  # fmt: skip
    r.done()

    cmp = _parse_cmp(_table(data, "cmp", problems), problems, path)
    est = _parse_est(_table(data, "est", problems), problems, path)
    upstream = _parse_upstream(_table(data, "upstream", problems), problems, path)

    r = _Reader(_table(data, "audit", problems), "audit", problems)
    # Lower bounds: the promise of twice the interval must leave room for the checkpointer's 1 s poll and the
    # signing round trip on a loaded machine, or verify would report a healthy appliance's log as overdue.
    audit = AuditSection(
        checkpoint_every_entries=r.integer("checkpoint_every_entries", 1000, lo=10, hi=10_000_000),
        checkpoint_every_s=r.number("checkpoint_every_s", 300.0, lo=10, hi=86400),
    )
    r.done()

    control = _parse_control(_table(data, "control", problems), problems, path, state_dir)
    r = _Reader(_table(data, "metrics", problems), "metrics", problems)
    metrics = MetricsSection(listen=_listen(r, "listen", ""))
    r.done()

    # Only the 802.1AR built-in is served unconfigured: the Matter built-in carries a test vendor ID and must be
    # configured (base = "matter-dac") with the manufacturer's own before any device gets one.
    profiles: dict[str, Profile] = {"idevid": builtin_profiles()["idevid"]}
    configured, profile_problems = parse_profiles(_table(data, "profiles", problems), "profiles")
    profiles.update(configured)
    problems.extend(profile_problems)
    for name, label in cmp.labels.items():
        if label.profile is not None and label.profile not in profiles:
            problems.append(Problem(f"cmp.labels.{name}.profile", f"no profile named {label.profile!r}"))
    scep = _parse_scep(_table(data, "scep", problems), problems, path)
    for name, scep_label in scep.labels.items():
        if scep_label.profile is not None and scep_label.profile not in profiles:
            problems.append(
                Problem(f"scep.labels.{name}.profile", f"no profile named {scep_label.profile!r}")
            )
    for name, est_label in est.labels.items():
        if est_label.profile is not None and est_label.profile not in profiles:
            problems.append(Problem(f"est.labels.{name}.profile", f"no profile named {est_label.profile!r}"))
    if issuance.default_profile not in profiles:
        problems.append(
            Problem(
                "issuance.default_profile",
                f"no profile named {issuance.default_profile!r}; known: {', '.join(sorted(profiles))}",
            )
        )

    problems.extend(
        _shared_listeners(
            {
                "stations.lan_listen": stations.lan_address, "va.listen": va.address, "va.ocsp_listen": va.ocsp_address, "cmp.listen": cmp.address,
                "scep.listen": scep.address, "est.listen": est.address, "metrics.listen": metrics.address,
            }
        )
    )  # fmt: skip

    if problems:
        raise ConfigError(problems, str(source) if source else "")
    return Config(
        appliance=ApplianceSection(state_dir=state_dir, names=host_names),
        hsm=hsm,
        journal=journal,
        issuance=issuance,
        stations=stations,
        va=va,
        cmp=cmp,
        upstream=upstream,
        audit=audit,
        profiles=profiles,
        source=source,
        control=control,
        metrics=metrics,
        scep=scep,
        est=est,
    )


_WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104 - compared against, never bound


def _shared_listeners(addresses: dict[str, tuple[str, int] | None]) -> list[Problem]:
    """Two listeners on one port of one address (or one of them on the wildcard) cannot both bind: the second
    would fail at `birthline run`, as if another program held the port."""
    problems: list[Problem] = []
    seen: list[tuple[str, tuple[str, int]]] = []
    for key, address in addresses.items():
        if address is None or address[1] == 0:  # port 0: each gets a free port of its own
            continue
        for other, taken in seen:
            if address[1] == taken[1] and (
                address[0] == taken[0] or _WILDCARDS.count(address[0]) + _WILDCARDS.count(taken[0])
            ):
                problems.append(
                    Problem(key, f"port {address[1]} is {other}'s too: give each listener its own port")
                )
                break
        seen.append((key, address))
    return problems


def _host_names(r: _Reader, key: str) -> tuple[str, ...]:
    """A list of network names (appliance.names.HOST), each once (DNS names compared without case)."""
    value = r._get(key, list, [], False)
    found: list[str] = []
    for i, item in enumerate(value if isinstance(value, list) else []):
        problem = names.HOST.problem(item)
        if problem is not None:
            r.problems.append(Problem(f"{r.where}.{key}[{i}]", problem))
        elif any(item.lower() == seen.lower() for seen in found):
            r.problems.append(Problem(f"{r.where}.{key}[{i}]", f"{item!r} is listed twice"))
        else:
            found.append(item)
    return tuple(found)


def _listen(r: _Reader, key: str, default: str) -> str:
    value = r.text(key, default)
    if isinstance(value, str) and value:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not _is_port(port):
            r.problems.append(Problem(f"{r.where}.{key}", f"expected host:port or empty, got {value!r}"))
            return ""
    return value if isinstance(value, str) else ""


def _http_limits(r: _Reader, d: HttpLimits) -> HttpLimits:
    """The connection bounds of an HTTP listener's section ([va], [cmp])."""
    limits = HttpLimits(
        max_connections=r.integer("max_connections", d.max_connections, lo=1, hi=1_000_000),
        max_connections_per_peer=r.integer(
            "max_connections_per_peer", d.max_connections_per_peer, lo=1, hi=1_000_000
        ),
        header_timeout_s=r.number("header_timeout_s", d.header_timeout_s, lo=0.05, hi=600),
        body_timeout_s=r.number("body_timeout_s", d.body_timeout_s, lo=0.05, hi=3600),
        idle_timeout_s=r.number("idle_timeout_s", d.idle_timeout_s, lo=0.05, hi=3600),
    )
    _per_peer_within(limits.max_connections, limits.max_connections_per_peer, r.where, r.problems)
    return limits


def _per_peer_within(total: int, per_peer: int, where: str, problems: list[Problem]) -> None:
    if per_peer > total:
        problems.append(
            Problem(f"{where}.max_connections_per_peer", f"must not exceed max_connections ({total})")
        )


# sockaddr_un.sun_path is 108 bytes with its NUL; longer paths are bound through the directory (control/unix.py),
# but a name alone longer than this cannot be bound at all.
_SOCKET_NAME_MAX = 100


def _parse_control(
    table: Mapping[str, Any],
    problems: list[Problem],
    path: Callable[[str | None], Path | None],
    state_dir: Path,
) -> ControlSection:
    r = _Reader(table, "control", problems)
    d = ControlSection()
    socket_path = path(r.text("socket")) or state_dir / "control.sock"
    if len(socket_path.name.encode()) > _SOCKET_NAME_MAX:
        problems.append(Problem("control.socket", f"the file name is longer than {_SOCKET_NAME_MAX} bytes"))
    group = r.text("group", "") or ""
    if group:
        try:
            grp.getgrnam(group)
        except (KeyError, ValueError):  # ValueError: a NUL in the name
            problems.append(Problem("control.group", f"no group named {group!r} on this system"))
    section = ControlSection(
        socket=socket_path,
        group=group,
        enabled=r.flag("enabled", d.enabled),
        max_connections=r.integer("max_connections", d.max_connections, lo=2, hi=4096),
        max_subscribers=r.integer("max_subscribers", d.max_subscribers, lo=1, hi=1024),
        subscriber_queue=r.integer("subscriber_queue", d.subscriber_queue, lo=16, hi=1_000_000),
        request_timeout_s=r.number("request_timeout_s", d.request_timeout_s, lo=0.1, hi=600),
        max_body_bytes=r.integer("max_body_bytes", d.max_body_bytes, lo=1024, hi=1024 * 1024),
        session_ttl_s=r.number("session_ttl_s", d.session_ttl_s, lo=60, hi=7 * 86400),
        max_sessions=r.integer("max_sessions", d.max_sessions, lo=1, hi=10_000),
        disk_low_mb=r.integer("disk_low_mb", d.disk_low_mb, lo=0, hi=10_000_000),
        disk_check_s=r.number("disk_check_s", d.disk_check_s, lo=0.05, hi=3600),
    )
    r.done()
    if section.max_subscribers >= section.max_connections:
        problems.append(
            Problem("control.max_subscribers", "must be below max_connections (actions need room)")
        )
    return section


def _private_file(value: Path | None, where: str, problems: list[Problem]) -> None:
    """A secret file must exist and be readable by its owner only (0600 or stricter)."""
    if value is None:
        return
    try:
        mode = value.stat().st_mode
    except OSError as exc:
        problems.append(Problem(where, f"cannot read {value}: {exc.strerror}"))
        return
    except ValueError:  # a NUL in the path, which no file name holds
        problems.append(Problem(where, f"not a file name: {safe_repr(str(value))}"))
        return
    if mode & 0o077:
        problems.append(
            Problem(where, f"{value} is readable by others (mode {mode & 0o777:o}); chmod 600 it")
        )


def _parse_cmp(
    table: Mapping[str, Any], problems: list[Problem], path: Callable[[str | None], Path | None]
) -> CmpSection:
    r = _Reader(table, "cmp", problems)
    listen = _listen(r, "listen", "")
    max_bytes = r.integer("max_message_bytes", 256 * 1024, lo=1024, hi=4 * 1024 * 1024)
    confirm_wait = r.number("confirm_wait_s", 300.0, lo=1, hi=86400)
    max_pending = r.integer("max_pending", 10_000, lo=1, hi=1_000_000)
    r.name("default_label", names.CMP_LABEL)
    default_label = r.text("default_label", "") or ""
    ra_cert = path(r.text("ra_cert"))
    limits = _http_limits(r, CMP_LIMITS)
    crl_timeout = r.number("crl_timeout_s", 5.0, lo=0.1, hi=120)
    crl_max_bytes = r.integer("crl_max_bytes", 1024 * 1024, lo=1024, hi=64 * 1024 * 1024)
    crl_retry = r.number("crl_retry_s", 60.0, lo=1, hi=86400)
    crl_refresh = r.number("crl_refresh_s", 3600.0, lo=10, hi=7 * 86400)
    costs = CmpSection(
        max_mac_iterations=r.integer("max_mac_iterations", 10_000, lo=100, hi=100_000), **_admission_keys(r)
    )
    raw_labels = r.table.get("labels", {})
    r.seen.add("labels")
    r.done()
    labels: dict[str, CmpLabelSection] = {}
    if not isinstance(raw_labels, Mapping):
        problems.append(Problem("cmp.labels", f"expected a table, got {type(raw_labels).__name__}"))
        raw_labels = {}
    for name, raw in raw_labels.items():
        where = f"cmp.labels.{name}"
        if not isinstance(raw, Mapping):
            problems.append(Problem(where, f"expected a table, got {type(raw).__name__}"))
            continue
        label_problem = names.CMP_LABEL.problem(name)
        if label_problem is not None:
            where = f"cmp.labels.{safe_repr(str(name))}"
            problems.append(Problem(where, label_problem))
        lr = _Reader(raw, where, problems)
        lr.name("station", names.STATION)
        lr.name("issuing_ca", names.CA)
        if "secret" in raw:
            problems.append(Problem(f"{where}.secret", "never put the secret in the config; use secret_file"))
            lr.seen.add("secret")
        label = CmpLabelSection(
            station=lr.text("station", required=True) or "",
            profile=lr.text("profile"),
            secret_file=path(lr.text("secret_file")),
            kid=lr.text("kid", "") or "",
            station_signature=lr.flag("station_signature", False),
            trusted_ca=path(lr.text("trusted_ca")),
            allow_rr=lr.flag("allow_rr", False),
            allow_nested=lr.flag("allow_nested", False),
            implicit_confirm=lr.flag("implicit_confirm", True),
            accept_ra_verified=lr.flag("accept_ra_verified", False),
            issuing_ca=lr.text("issuing_ca"),
            idevid_roots=path(lr.text("idevid_roots")),
            signer_revocation=lr.text("signer_revocation", "crl") or "crl",
            crl_files=_paths(lr, "crl_files", path),
            crl_fetch=lr.flag("crl_fetch", True),
        )
        lr.done()
        _private_file(label.secret_file, f"{where}.secret_file", problems)
        if label.signer_revocation not in ("crl", "none"):
            problems.append(Problem(f"{where}.signer_revocation",
                                    f"expected 'crl' or 'none', got {label.signer_revocation!r}"))  # fmt: skip
        if (
            label.secret_file is None
            and not label.station_signature
            and label.trusted_ca is None
            and label.idevid_roots is None
        ):
            problems.append(Problem(where, "set secret_file, station_signature, trusted_ca or idevid_roots: no"
                                    " peer could authenticate"))  # fmt: skip
        labels[str(name)] = label
    if default_label and default_label not in labels:
        problems.append(Problem("cmp.default_label", f"no label {default_label!r} in [cmp.labels]"))
    return replace(
        costs, listen=listen, max_message_bytes=max_bytes, confirm_wait_s=confirm_wait, max_pending=max_pending,
        default_label=default_label, ra_cert=ra_cert, labels=labels, limits=limits, crl_timeout_s=crl_timeout,
        crl_max_bytes=crl_max_bytes, crl_retry_s=crl_retry, crl_refresh_s=crl_refresh,
    )  # fmt: skip


def _admission_keys(r: _Reader) -> dict[str, Any]:
    """The keys of what unauthenticated peers may cost, the same in [cmp] and [scep] (appliance/admission.py)."""
    return {
        "check_rate_per_client": r.number("check_rate_per_client", 5.0, lo=0.001, hi=100_000),
        "check_burst_per_client": r.integer("check_burst_per_client", 32, lo=1, hi=100_000),
        "check_rate_total": r.number("check_rate_total", 20.0, lo=0.001, hi=100_000),
        "check_burst_total": r.integer("check_burst_total", 64, lo=1, hi=100_000),
        "pace_max_delay_s": r.number("pace_max_delay_s", 1.0, lo=0, hi=30),
        "checks_in_flight": r.integer("checks_in_flight", 2, lo=1, hi=64),
        "clients_max": r.integer("clients_max", 4096, lo=16, hi=1_000_000),
        "known_client_s": r.number("known_client_s", 600.0, lo=0, hi=86400),
    }


def _parse_scep(
    table: Mapping[str, Any], problems: list[Problem], path: Callable[[str | None], Path | None]
) -> ScepSection:
    r = _Reader(table, "scep", problems)
    d = ScepSection()
    listen = _listen(r, "listen", "")
    max_bytes = r.integer("max_message_bytes", d.max_message_bytes, lo=4096, hi=1024 * 1024)
    r.name("default_label", names.SCEP_LABEL)
    default_label = r.text("default_label", "") or ""
    ra_cert = path(r.text("ra_cert"))
    limits = _http_limits(r, SCEP_LIMITS)
    costs = _admission_keys(r)
    raw_labels = r.table.get("labels", {})
    r.seen.add("labels")
    r.done()
    labels: dict[str, ScepLabelSection] = {}
    if not isinstance(raw_labels, Mapping):
        problems.append(Problem("scep.labels", f"expected a table, got {type(raw_labels).__name__}"))
        raw_labels = {}
    for name, raw in raw_labels.items():
        where = f"scep.labels.{name}"
        label_problem = names.SCEP_LABEL.problem(name)
        if label_problem is not None:
            where = f"scep.labels.{safe_repr(str(name))}"
            problems.append(Problem(where, label_problem))
        if not isinstance(raw, Mapping):
            problems.append(Problem(where, f"expected a table, got {type(raw).__name__}"))
            continue
        lr = _Reader(raw, where, problems)
        lr.name("station", names.STATION)
        for key in ("challenge", "challenge_password", "secret"):
            if key in raw:
                problems.append(Problem(f"{where}.{key}", "challenge passwords are never configured: a supervisor"
                                        " makes them (birthline scep challenge add)"))  # fmt: skip
                lr.seen.add(key)
        serial_from = lr.text("device_serial_from", "serialNumber") or "serialNumber"
        if serial_from not in SCEP_DEVICE_SERIAL_FROM:
            problems.append(Problem(f"{where}.device_serial_from",
                                    f"expected one of {', '.join(SCEP_DEVICE_SERIAL_FROM)}, got {serial_from!r}"))  # fmt: skip
        lr.seen.add("legacy_algorithms")
        legacy = raw.get("legacy_algorithms", [])
        if not isinstance(legacy, list) or not all(isinstance(v, str) for v in legacy):
            problems.append(Problem(f"{where}.legacy_algorithms", "expected a list of algorithm names"))
            legacy = []
        for value in legacy:
            if value not in SCEP_LEGACY_ALGORITHMS:
                problems.append(Problem(f"{where}.legacy_algorithms", f"{safe_repr(value)} is not one of"
                                        f" {', '.join(SCEP_LEGACY_ALGORITHMS)}"))  # fmt: skip
        label = ScepLabelSection(
            station=lr.text("station", required=True) or "",
            profile=lr.text("profile"),
            device_serial_from=serial_from,
            renewal=lr.flag("renewal", True),
            legacy_algorithms=tuple(dict.fromkeys(v for v in legacy if v in SCEP_LEGACY_ALGORITHMS)),
        )
        lr.done()
        labels[str(name)] = label
    if default_label and default_label not in labels:
        problems.append(Problem("scep.default_label", f"no label {default_label!r} in [scep.labels]"))
    return ScepSection(listen, max_bytes, default_label, ra_cert, labels, limits, **costs)


def _parse_est(
    table: Mapping[str, Any], problems: list[Problem], path: Callable[[str | None], Path | None]
) -> EstSection:
    r = _Reader(table, "est", problems)
    d = EstSection()
    listen = _listen(r, "listen", "")
    r.name("default_label", names.EST_LABEL)
    default_label = r.text("default_label", "") or ""
    max_request_bytes = r.integer("max_request_bytes", d.max_request_bytes, lo=1024, hi=1024 * 1024)
    handshake_timeout_s = r.number("handshake_timeout_s", d.handshake_timeout_s, lo=0.05, hi=300)
    keygen_in_flight = r.integer("keygen_in_flight", d.keygen_in_flight, lo=1, hi=64)
    auth_failure_limit = r.integer("auth_failure_limit", d.auth_failure_limit, lo=1, hi=100_000)
    auth_failure_window_s = r.number("auth_failure_window_s", d.auth_failure_window_s, lo=1, hi=86400)
    limits = _http_limits(r, EST_LIMITS)
    raw_labels = r.table.get("labels", {})
    r.seen.add("labels")
    r.done()
    labels: dict[str, EstLabelSection] = {}
    if not isinstance(raw_labels, Mapping):
        problems.append(Problem("est.labels", f"expected a table, got {type(raw_labels).__name__}"))
        raw_labels = {}
    for name, raw in raw_labels.items():
        where = f"est.labels.{name}"
        if not isinstance(raw, Mapping):
            problems.append(Problem(where, f"expected a table, got {type(raw).__name__}"))
            continue
        label_problem = names.EST_LABEL.problem(name)
        if label_problem is not None:
            where = f"est.labels.{safe_repr(str(name))}"
            problems.append(Problem(where, label_problem))
        lr = _Reader(raw, where, problems)
        lr.name("station", names.STATION)
        lr.name("issuing_ca", names.CA)
        if "password" in raw:
            problems.append(Problem(f"{where}.password", "never put the password in the config; use"
                                    " password_file"))  # fmt: skip
            lr.seen.add("password")
        label = EstLabelSection(
            station=lr.text("station", required=True) or "",
            profile=lr.text("profile"),
            issuing_ca=lr.text("issuing_ca"),
            station_certificate=lr.flag("station_certificate", False),
            username=lr.text("username", "") or "",
            password_file=path(lr.text("password_file")),
            idevid_roots=path(lr.text("idevid_roots")),
            signer_revocation=lr.text("signer_revocation", "crl") or "crl",
            crl_files=_paths(lr, "crl_files", path),
            crl_fetch=lr.flag("crl_fetch", True),
            channel_binding=lr.text("channel_binding", "optional") or "optional",
            serverkeygen=lr.flag("serverkeygen", False),
        )
        lr.done()
        _private_file(label.password_file, f"{where}.password_file", problems)
        if ":" in label.username or not all(0x20 < ord(c) < 0x7F for c in label.username):
            problems.append(Problem(f"{where}.username", "printable ASCII without ':' or spaces (RFC 7617)"))
        if label.signer_revocation not in ("crl", "none"):
            problems.append(Problem(f"{where}.signer_revocation",
                                    f"expected 'crl' or 'none', got {label.signer_revocation!r}"))  # fmt: skip
        if label.channel_binding not in ("optional", "required"):
            problems.append(Problem(f"{where}.channel_binding",
                                    f"expected 'optional' or 'required', got {label.channel_binding!r}"))  # fmt: skip
        if not (label.station_certificate or label.password_file or label.idevid_roots):
            problems.append(Problem(where, "set station_certificate, password_file or idevid_roots: no client"
                                    " could authenticate to enrol"))  # fmt: skip
        labels[str(name)] = label
    if default_label and default_label not in labels:
        problems.append(Problem("est.default_label", f"no label {default_label!r} in [est.labels]"))
    return EstSection(listen, default_label, max_request_bytes, handshake_timeout_s, keygen_in_flight,
                      auth_failure_limit, auth_failure_window_s, labels, limits)  # fmt: skip


def _paths(r: _Reader, key: str, path: Callable[[str | None], Path | None]) -> tuple[Path, ...]:
    """A list of file names (relative to the config file's directory)."""
    r.seen.add(key)
    value = r.table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        r.problems.append(Problem(f"{r.where}.{key}", "expected a list of file names"))
        return ()
    return tuple(p for v in value if (p := path(v)) is not None)


def _parse_upstream(
    table: Mapping[str, Any], problems: list[Problem], path: Callable[[str | None], Path | None]
) -> UpstreamSection:
    r = _Reader(table, "upstream", problems)
    d = UpstreamSection()
    url = r.text("url", "") or ""
    if url:
        try:
            parts = urlsplit(url)  # raises on a bracketed host that is not an IPv6 address
            port_ok = parts.port is None or 0 < parts.port < 65536
        except ValueError:
            parts, port_ok = urlsplit(""), False
        if parts.scheme not in ("http", "https") or not parts.hostname or not port_ok:
            problems.append(Problem("upstream.url", f"expected http(s)://host[:port]/path, got {url!r}"))
    mode = r.text("mode", d.mode) or d.mode
    if mode not in ("single", "batched"):
        problems.append(Problem("upstream.mode", f"expected 'single' or 'batched', got {mode!r}"))
    protection = r.text("protection", d.protection) or d.protection
    if protection not in ("signature", "mac"):
        problems.append(Problem("upstream.protection", f"expected 'signature' or 'mac', got {protection!r}"))
    if "secret" in r.table:
        problems.append(Problem("upstream.secret", "never put the secret in the config; use secret_file"))
        r.seen.add("secret")
    section = UpstreamSection(
        url=url,
        mode=mode,
        batch_max=r.integer("batch_max", d.batch_max, lo=1, hi=100),
        batch_wait_s=r.number("batch_wait_s", d.batch_wait_s, lo=0, hi=3600),
        batches_in_flight=r.integer("batches_in_flight", d.batches_in_flight, lo=1, hi=8),
        protection=protection,
        secret_file=path(r.text("secret_file")),
        kid=r.text("kid", "") or "",
        server_cert=path(r.text("server_cert")),
        ca_certs=path(r.text("ca_certs")),
        recipient=r.text("recipient", d.recipient) or d.recipient,
        implicit_confirm=r.flag("implicit_confirm", d.implicit_confirm),
        accept_sha1_mac=r.flag("accept_sha1_mac", d.accept_sha1_mac),
        connect_timeout_s=r.number("connect_timeout_s", d.connect_timeout_s, lo=0.1, hi=300),
        request_timeout_s=r.number("request_timeout_s", d.request_timeout_s, lo=0.1, hi=3600),
        backoff_base_s=r.number("backoff_base_s", d.backoff_base_s, lo=0.01, hi=3600),
        backoff_cap_s=r.number("backoff_cap_s", d.backoff_cap_s, lo=0.01, hi=7 * 86400),
        poll_s=r.number("poll_s", d.poll_s, lo=0.01, hi=3600),
        pending_retry_s=r.number("pending_retry_s", d.pending_retry_s, lo=0.1, hi=3600),
        max_queue_age_s=r.number("max_queue_age_s", d.max_queue_age_s, lo=1, hi=365 * 86400),
        max_queue_size=r.integer("max_queue_size", d.max_queue_size, lo=1, hi=100_000_000),
        hard_max_queue_age_s=r.number("hard_max_queue_age_s", d.hard_max_queue_age_s, lo=1, hi=365 * 86400),
        hard_max_queue_size=r.integer("hard_max_queue_size", d.hard_max_queue_size, lo=1, hi=100_000_000),
    )
    r.done()
    try:
        x509.Name.from_rfc4514_string(section.recipient)
    except ValueError:
        problems.append(Problem("upstream.recipient", f"not an RFC 4514 name: {section.recipient!r}"))
    if section.enabled and protection == "mac":
        if section.secret_file is None:
            problems.append(Problem("upstream.secret_file", "is required with protection = 'mac'"))
        if not section.kid:
            problems.append(
                Problem("upstream.kid", "is required with protection = 'mac' (it names the secret)")
            )
    if section.enabled and protection == "mac" and mode == "batched":
        problems.append(Problem("upstream.protection", "batched mode sends nested messages, which RFC 9483 5.2.2"
                                " requires to be signature-protected (a conformant upstream refuses a MAC-protected"
                                " one): use protection = 'signature', or mode = 'single'"))  # fmt: skip
    if section.enabled and protection == "signature" and section.server_cert is None:
        problems.append(Problem("upstream.server_cert", "is required with protection = 'signature'"))
    _private_file(section.secret_file, "upstream.secret_file", problems)
    if section.backoff_cap_s < section.backoff_base_s:
        problems.append(Problem("upstream.backoff_cap_s", "must not be below backoff_base_s"))
    if section.hard_max_queue_size < section.max_queue_size:
        problems.append(Problem("upstream.hard_max_queue_size", "must not be below max_queue_size"))
    if section.hard_max_queue_age_s < section.max_queue_age_s:
        problems.append(Problem("upstream.hard_max_queue_age_s", "must not be below max_queue_age_s"))
    return section


def config_warnings(cfg: Config) -> list[Problem]:
    """Settings that are valid but that a conformant peer will refuse in some case, with what to do (printed
    by `birthline config check`; the configuration is still accepted)."""
    warnings: list[Problem] = []
    up = cfg.upstream
    if up.enabled and up.protection == "mac" and cfg.cmp.listen and cfg.cmp.labels:
        warnings.append(Problem("upstream.protection", "with 'mac', the records of devices enrolled over CMP with"
                                " a CRMF request (ir, cr: sent upstream as cr with POP raVerified) and of key updates"
                                " (kur) are refused by the upstream: raVerified and a kur on a device's behalf need"
                                " the RA's signature (RFC 9483 5.2.3.2; a Birthline upstream answers notAuthorized,"
                                " wrongIntegrity for kur), and in RA mode such a device's ir ends in a rejection"
                                " after polling. Only CSR records (p10cr: the station protocol, CMP p10cr, birthline"
                                " issue) go through. Use protection = 'signature' with server_cert, or enrol CMP"
                                " devices with p10cr only"))  # fmt: skip
    return warnings


_INT64 = range(-(2**63), 2**63)
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _shown_key(key: str) -> str:
    """A key from the file as a problem's location: a TOML bare key as it is, any other quoted and escaped, so an
    empty key still shows where it is and control characters reach no terminal."""
    return key if _BARE_KEY.fullmatch(key) else safe_repr(key)


def _wide_integers(data: Mapping[str, Any]) -> list[Problem]:
    """Integers outside 64 bits, which TOML 1.0 says a parser must refuse (tomllib reads any length)."""
    problems: list[Problem] = []
    # A loop, not recursion: what tomllib read nested deep can be walked here without a RecursionError.
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                shown = _shown_key(key)
                stack.append((f"{where}.{shown}" if where else shown, item))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item) for i, item in enumerate(value))
        elif isinstance(value, int) and not isinstance(value, bool) and value not in _INT64:
            problems.append(
                Problem(where, f"an integer of {value.bit_length()} bits: TOML integers are 64-bit")
            )
    return sorted(problems, key=lambda p: p.where)


# A configuration is a few kilobytes; reading stops past this, so a path to a device or a FIFO that never ends
# (/dev/zero, /dev/urandom) is refused instead of read until memory runs out.
MAX_CONFIG_BYTES = 1024 * 1024


def load_config(path: Path) -> Config:
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError([Problem(str(path), f"cannot read: {exc.strerror}")]) from exc
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            [Problem(str(path), f"larger than {MAX_CONFIG_BYTES} bytes: not a configuration file")]
        )
    return load_config_bytes(raw, path.resolve())


def load_config_bytes(raw: bytes, source: Path) -> Config:
    """load_config on the file's bytes: `source` (absolute) names the file in problems and anchors relative paths.

    The contract (bench/fuzz.py's config target checks it on any bytes): a Config, or a ConfigError listing every
    problem with where it is; never another exception.
    """
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError([Problem(str(source), f"not valid TOML: {exc}")]) from exc
    except ValueError as exc:
        # tomllib lets Python's own refusal through: a decimal integer of more than 4300 digits.
        raise ConfigError([Problem(str(source), "not valid TOML: an integer too long to read")]) from exc
    except RecursionError as exc:
        # Arrays or inline tables nested about 1000 deep exhaust tomllib's recursive descent.
        raise ConfigError([Problem(str(source), "not valid TOML: arrays or tables nested too deep")]) from exc
    return parse_config(data, source=source)
