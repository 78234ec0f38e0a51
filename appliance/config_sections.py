"""The configuration's sections: frozen dataclasses, one per TOML table, with their embedded defaults (the HTTP
listeners' bounds among them). appliance/config.py reads a file into them and checks every value; here a
section only splits a listen address it already holds (checked) into host and port.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from appliance.connections import HttpLimits
from appliance.profiles import Profile
from appliance.va.service import VaSettings
from hsm.config import HsmConfig

if TYPE_CHECKING:
    # Imported where used: the audit package brings the HSM session layer, which a read-only command never needs.
    from appliance.audit.claims import CheckpointPolicy


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


def split_listen(value: str) -> tuple[str, int] | None:
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
        return split_listen(self.listen)

    @property
    def ocsp_address(self) -> tuple[str, int] | None:
        return split_listen(self.ocsp_listen)


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
        return split_listen(self.listen)


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
        return split_listen(self.listen)


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
        return split_listen(self.listen)


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
        return split_listen(self.listen)


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
