"""The station registry (journal table ``stations``) and the management-CA credentials around it.

Every station has a 32-byte secret key (the station protocol's K). It is a secret: it is never logged, never in a
config file or on a command line, and leaves the appliance only in a credential file (mode 0600) written for
provisioning the fixture. LAN stations also get a TLS client certificate from the management CA (signed in the
HSM); the appliance's TLS server certificate comes from the same CA, and its private key is a file readable by
the daemon only (Python's ssl module cannot use a PKCS#11 key).

This module is core: it never imports the stations package.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import ipaddress
import json
import os
import secrets
import sqlite3
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance import ca as ca_mod
from appliance import names
from appliance.ca import CaRecord, identity
from appliance.ca.hierarchy import SIGNING_ONLY, key_label_for
from appliance.errors import BirthlineError, ReasonCode
from appliance.files import refuse_shared_files, secret_directory, write_private, write_public
from appliance.issuance.journal import Journal, now
from appliance.issuance.policy import AuditSink
from appliance.profiles import new_serial_number
from hsm.algorithms import default_hash, from_public_key
from hsm.token import Token

STATION_KEY_LEN = 32
KINDS = ("serial", "lan")
TLS_CERT_DAYS = 825
SERVER_KEY_FILE = "server.key"
SERVER_CERT_FILE = "server.crt"
CA_FILE = "management-ca.crt"


class RegistryError(BirthlineError):
    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.BAD_REQUEST)


@dataclass(frozen=True)
class StationRecord:
    name: str
    kind: str
    port: str | None
    baud: int | None
    key: bytes = field(repr=False)  # the station secret: keep it out of every repr and log line
    enabled: bool
    tls_cert_der: bytes | None
    tls_fingerprint: bytes | None
    created_at: float
    rotated_at: float | None

    COLUMNS = "name, kind, port, baud, key, enabled, tls_cert_der, tls_fingerprint, created_at, rotated_at"

    @classmethod
    def from_row(cls, row: tuple[object, ...]) -> StationRecord:
        name, kind, port, baud, key, enabled, cert, fp, created, rotated = row
        return cls(
            str(name), str(kind), port if isinstance(port, str) else None, baud if isinstance(baud, int) else None,
            bytes(key) if isinstance(key, bytes) else b"", bool(enabled),
            bytes(cert) if isinstance(cert, bytes) else None, bytes(fp) if isinstance(fp, bytes) else None,
            float(created) if isinstance(created, int | float) else 0.0,
            float(rotated) if isinstance(rotated, int | float) else None,
        )  # fmt: skip

    def public(self) -> dict[str, object]:
        """Everything but the secret, for `station list --json` and the dashboard."""
        return {
            "name": self.name, "kind": self.kind, "port": self.port, "baud": self.baud, "enabled": self.enabled,
            "tls_fingerprint": self.tls_fingerprint.hex() if self.tls_fingerprint else None,
            "created_at": self.created_at, "rotated_at": self.rotated_at,
        }  # fmt: skip


@dataclass(frozen=True)
class Credentials:
    """What `station add` / `rotate-key` hand to the fixture. Holds secrets: write it with write_bundle only."""

    record: StationRecord
    tls_key_pem: bytes | None = field(default=None, repr=False)
    tls_cert_pem: bytes | None = None
    ca_pem: bytes | None = None


# -- queries -------------------------------------------------------------------------------------------------------
def list_stations(journal: Journal) -> list[StationRecord]:
    def q() -> list[StationRecord]:
        rows = journal.conn.execute(f"SELECT {StationRecord.COLUMNS} FROM stations ORDER BY name").fetchall()
        return [StationRecord.from_row(r) for r in rows]

    return journal.call(q)


async def alist_stations(journal: Journal) -> list[StationRecord]:
    def q() -> list[StationRecord]:
        rows = journal.conn.execute(f"SELECT {StationRecord.COLUMNS} FROM stations ORDER BY name").fetchall()
        return [StationRecord.from_row(r) for r in rows]

    return await journal.acall(q)


def get_station(journal: Journal, name: str) -> StationRecord:
    names.STATION.check(name)

    def q() -> tuple[object, ...] | None:
        cur = journal.conn.execute(f"SELECT {StationRecord.COLUMNS} FROM stations WHERE name=?", (name,))
        row: tuple[object, ...] | None = cur.fetchone()
        return row

    row = journal.call(q)
    if row is None:
        raise RegistryError(f"no station named {name!r}")
    return StationRecord.from_row(row)


# -- management CA and TLS -----------------------------------------------------------------------------------------
def ensure_management_ca(
    journal: Journal,
    token: Token,
    name: str = "management",
    *,
    audit: AuditSink,
    actor: str,
    subject: str | None = None,
) -> CaRecord:
    """The management CA `name`, made if missing: named `subject`, or after the organisation recorded at
    commissioning (refused before it). One imported from an external root must have its certificate."""
    try:
        rec = ca_mod.load_ca(journal, name)
    except ca_mod.CaError:
        return ca_mod.create_management(
            journal,
            token,
            name,
            subject or identity.subject_for(journal, "management"),
            audit=audit,
            actor=actor,
        )
    if rec.role != "management":
        raise RegistryError(f"CA {name!r} is a {rec.role} CA, not a management CA")
    if rec.state != "active":
        raise RegistryError(
            f"management CA {name!r} awaits its certificate from the external root: `birthline ca import --name"
            f" {name} --cert CERT --chain CHAIN`"
        )
    return rec


def _serial_device_or_absent(port: str) -> None:
    """A serial port is a character device; one not plugged in yet (absent) is fine: the daemon opens it when it
    appears. Anything else (a regular file, a directory) is refused: the daemon would never open it as a port
    (stations/transports/serial.py), so registering it could only be a mistake."""
    try:
        mode = os.stat(port).st_mode
    except FileNotFoundError:
        return
    except OSError as exc:
        raise RegistryError(f"serial port {port}: {exc.strerror}") from exc
    if not stat.S_ISCHR(mode):
        raise RegistryError(
            f"serial port {port} is not a serial device (not a character device); give the adapter's"
            " /dev/serial/by-path/... name"
        )


def sign_tls_certificate(
    token: Token,
    ca: CaRecord,
    common_name: str,
    public_key: ec.EllipticCurvePublicKey,
    *,
    server: bool,
    dns_names: tuple[str, ...] = (),
    ip_addresses: tuple[str, ...] = (),
) -> x509.Certificate:
    """A TLS leaf certificate from the management CA, signed in the HSM."""
    ca_cert = ca.certificate
    key = token.get_key(key_label_for(ca.name))
    # Five minutes early, for peers whose clock is a little behind; the validity is TLS_CERT_DAYS in all.
    start = dt.datetime.now(dt.UTC).replace(microsecond=0) - dt.timedelta(minutes=5)
    eku = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(new_serial_number())
        .not_valid_before(start)
        .not_valid_after(min(start + dt.timedelta(days=TLS_CERT_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            SIGNING_ONLY,
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([eku]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys(dns_names)]
    sans += [x509.IPAddress(ip) for ip in dict.fromkeys(ipaddress.ip_address(a) for a in ip_addresses)]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(key, default_hash(from_public_key(key.public_key())))


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass(frozen=True)
class TlsServerFiles:
    key: Path
    cert: Path  # the server certificate
    ca: Path  # the management CA certificate: the trust anchor for station client certificates


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
_WILDCARDS = ("", "0.0.0.0", "::")  # noqa: S104 - compared against, never bound


def server_names(configured: tuple[str, ...], address: tuple[str, int] | None) -> tuple[str, ...]:
    """The names of the appliance's TLS server certificate, each once: the configured `[appliance] names` (or,
    with none, the built-in `birthline`), the LAN listener's host unless it is a wildcard, and the loopback
    names, for tools on the appliance itself."""
    listen = (address[0],) if address and address[0] not in _WILDCARDS else ()
    unique: dict[str, str] = {}
    for name in (*(configured or ("birthline",)), *listen, *LOOPBACK_NAMES):
        key = str(ipaddress.ip_address(name)) if _is_ip(name) else name.lower()
        unique.setdefault(key, key)
    return tuple(unique)


def certificate_names(cert: x509.Certificate) -> tuple[str, ...]:
    """A certificate's subjectAltName DNS names and IP addresses, in the form server_names() gives."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    dns = [n.lower() for n in san.get_values_for_type(x509.DNSName)]
    return (*dns, *(str(ip) for ip in san.get_values_for_type(x509.IPAddress)))


def served_names(files: TlsServerFiles) -> tuple[str, ...]:
    return certificate_names(x509.load_pem_x509_certificate(files.cert.read_bytes()))


def _tls_files(tls_dir: Path) -> TlsServerFiles:
    return TlsServerFiles(tls_dir / SERVER_KEY_FILE, tls_dir / SERVER_CERT_FILE, tls_dir / CA_FILE)


def ensure_tls_server(
    journal: Journal,
    token: Token,
    tls_dir: Path,
    ca_name: str = "management",
    *,
    names: tuple[str, ...] = (),
    audit: AuditSink,
    actor: str = "appliance",
) -> TlsServerFiles:
    """Make the appliance's TLS server key and certificate (for `names`, server_names() when empty) if missing
    or not from the current management CA. A certificate for other names is left as it is: changing the names a
    station checks is an administrator's act (`birthline tls reissue`, reissue_tls_server)."""
    ca = ensure_management_ca(journal, token, ca_name, audit=audit, actor=actor)
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = _tls_files(tls_dir)
    refuse_shared_files([files.key], "the appliance's TLS server key")
    ca_pem = _pem(ca.certificate)
    if files.key.exists() and files.cert.exists() and files.ca.exists() and files.ca.read_bytes() == ca_pem:
        return files
    return _issue_tls_server(
        journal, token, files, ca, names or server_names((), None), audit, actor, "tls.issued"
    )


def reissue_tls_server(
    journal: Journal,
    token: Token,
    tls_dir: Path,
    ca_name: str,
    names: tuple[str, ...],
    *,
    audit: AuditSink,
    actor: str,
) -> TlsServerFiles:
    """A new TLS server key and certificate for `names`, whatever is there now (audited as tls.reissued)."""
    ca = ensure_management_ca(journal, token, ca_name, audit=audit, actor=actor)
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    files = _tls_files(tls_dir)
    refuse_shared_files([files.key], "the appliance's TLS server key")
    return _issue_tls_server(journal, token, files, ca, names, audit, actor, "tls.reissued")


def _issue_tls_server(
    journal: Journal,
    token: Token,
    files: TlsServerFiles,
    ca: CaRecord,
    names: tuple[str, ...],
    audit: AuditSink,
    actor: str,
    event: str,
) -> TlsServerFiles:
    key = ec.generate_private_key(ec.SECP256R1())
    ips = tuple(n for n in names if _is_ip(n))
    dns = tuple(n for n in names if not _is_ip(n))
    cert = sign_tls_certificate(
        token, ca, "birthline appliance", key.public_key(), server=True, dns_names=dns, ip_addresses=ips
    )
    der = cert.public_bytes(serialization.Encoding.DER)

    def record(conn: sqlite3.Connection) -> None:
        audit.append(conn, actor, event, {
            "names": list(names), "cert_serial": format(cert.serial_number, "x"), "management_ca": ca.name,
            "cert_sha256": hashlib.sha256(der).hexdigest(), "not_after": cert.not_valid_after_utc.isoformat(),
        })  # fmt: skip

    # Audited before the files change: an unrecorded TLS certificate must never be served.
    journal.call(journal.transaction, record, "recording the TLS server certificate")
    write_private(files.key, _key_pem(key))
    write_public(files.cert, _pem(cert))
    write_public(files.ca, _pem(ca.certificate))
    return files


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _lan_credentials(
    token: Token, ca: CaRecord, name: str
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    return key, sign_tls_certificate(token, ca, f"station {name}", key.public_key(), server=False)


# -- changes -------------------------------------------------------------------------------------------------------
def add_station(
    journal: Journal,
    token: Token,
    name: str,
    kind: str,
    *,
    port: str | None = None,
    baud: int | None = None,
    management_ca: str = "management",
    audit: AuditSink,
    actor: str,
) -> Credentials:
    """Register a station; `actor` (a person, already authorised) is recorded in the audit log."""
    names.STATION.check(name)
    if kind not in KINDS:
        raise RegistryError(f"station kind must be one of {', '.join(KINDS)}")
    if kind == "serial" and not port:
        raise RegistryError("a serial station needs its port (e.g. /dev/serial/by-path/...)")
    if kind == "serial":
        names.SERIAL_PORT.check(port)
        assert port is not None
        _serial_device_or_absent(port)
    if kind == "serial":
        baud = 115200 if baud is None else baud
        if not 300 <= baud <= 4_000_000:
            raise RegistryError("baud must be between 300 and 4000000")
    secret = secrets.token_bytes(STATION_KEY_LEN)
    tls_key: ec.EllipticCurvePrivateKey | None = None
    cert: x509.Certificate | None = None
    ca_pem: bytes | None = None
    if kind == "lan":
        ca = ensure_management_ca(journal, token, management_ca, audit=audit, actor=actor)
        tls_key, cert = _lan_credentials(token, ca, name)
        ca_pem = _pem(ca.certificate)
    cert_der = cert.public_bytes(serialization.Encoding.DER) if cert else None
    fingerprint = hashlib.sha256(cert_der).digest() if cert_der else None

    def ins(conn: sqlite3.Connection) -> None:
        if conn.execute("SELECT 1 FROM stations WHERE name=?", (name,)).fetchone():
            raise RegistryError(f"a station named {name!r} already exists")
        if (
            kind == "serial"
            and conn.execute("SELECT name FROM stations WHERE kind='serial' AND port=?", (port,)).fetchone()
        ):
            raise RegistryError(f"port {port} already belongs to another station")
        conn.execute(
            f"INSERT INTO stations ({StationRecord.COLUMNS}) VALUES (?,?,?,?,?,1,?,?,?,NULL)",
            (name, kind, port if kind == "serial" else None, baud if kind == "serial" else None, secret,
             cert_der, fingerprint, now()),
        )  # fmt: skip
        audit.append(conn, actor, "station.added", {
            "station": name, "kind": kind, "port": port, "baud": baud,
            "tls_fingerprint": fingerprint.hex() if fingerprint else None,
        })  # fmt: skip

    journal.call(journal.transaction, ins, f"adding station {name}")
    return Credentials(
        get_station(journal, name),
        _key_pem(tls_key) if tls_key else None,
        _pem(cert) if cert else None,
        ca_pem,
    )


def set_enabled(journal: Journal, name: str, enabled: bool, *, audit: AuditSink, actor: str) -> StationRecord:
    names.STATION.check(name)

    def upd(conn: sqlite3.Connection) -> int:
        n = conn.execute("UPDATE stations SET enabled=? WHERE name=?", (int(enabled), name)).rowcount
        if n:
            audit.append(conn, actor, "station.enabled" if enabled else "station.disabled", {"station": name})
        return int(n)

    if (
        journal.call(journal.transaction, upd, f"{'enabling' if enabled else 'disabling'} station {name}")
        != 1
    ):
        raise RegistryError(f"no station named {name!r}")
    return get_station(journal, name)


def rotate_key(
    journal: Journal,
    token: Token,
    name: str,
    *,
    management_ca: str = "management",
    audit: AuditSink,
    actor: str,
) -> Credentials:
    """A new secret (and for LAN a new TLS certificate); the old ones stop working at once."""
    rec = get_station(journal, name)
    secret = secrets.token_bytes(STATION_KEY_LEN)
    tls_key: ec.EllipticCurvePrivateKey | None = None
    cert: x509.Certificate | None = None
    ca_pem: bytes | None = None
    if rec.kind == "lan":
        ca = ensure_management_ca(journal, token, management_ca, audit=audit, actor=actor)
        tls_key, cert = _lan_credentials(token, ca, name)
        ca_pem = _pem(ca.certificate)
    cert_der = cert.public_bytes(serialization.Encoding.DER) if cert else None
    fingerprint = hashlib.sha256(cert_der).digest() if cert_der else None

    def upd(conn: sqlite3.Connection) -> None:
        conn.execute(
            "UPDATE stations SET key=?, tls_cert_der=?, tls_fingerprint=?, rotated_at=? WHERE name=?",
            (secret, cert_der, fingerprint, now(), name),
        )
        audit.append(conn, actor, "station.key-rotated",
                     {"station": name, "tls_fingerprint": fingerprint.hex() if fingerprint else None})  # fmt: skip

    journal.call(journal.transaction, upd, f"rotating the key of station {name}")
    return Credentials(
        get_station(journal, name),
        _key_pem(tls_key) if tls_key else None,
        _pem(cert) if cert else None,
        ca_pem,
    )


BUNDLE_FILES = ("station.key", "tls-client.key", "tls-client.crt", "ca.crt", "station.json")


def check_bundle_dir(out: Path) -> Path:
    """Refuse an output directory that could hand the bundle to someone else (appliance.files.secret_directory),
    or that holds a link or anything but a regular file where a bundle file goes; BEFORE the registry changes,
    as a refusal after `add` or `rotate-key` would leave credentials that nobody holds."""
    secret_directory(out)
    for name in BUNDLE_FILES:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(out / name)
            if not stat.S_ISREG(st.st_mode):
                kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a regular file"
                raise RegistryError(f"{out / name} is {kind}; refusing to write the bundle through it")
    return out


def write_bundle(creds: Credentials, out: Path, *, lan_host: str | None = None) -> Path:
    """Write the fixture's credential bundle to `out`: station.json, station.key (0600) and, for LAN, the TLS
    client key (0600), its certificate and the management CA certificate (which also issued the server's).

    Every file is created new and renamed into place, never written through a link (appliance.files), and `out`
    is refused when it is a symlink or writable by others; rotating into the old bundle's directory replaces
    its files."""
    check_bundle_dir(out)
    rec = creds.record
    write_private(out / "station.key", rec.key.hex().encode() + b"\n")
    info: dict[str, object] = {"name": rec.name, "kind": rec.kind, "key_file": "station.key"}
    if rec.kind == "serial":
        info.update(port=rec.port, baud=rec.baud)
    else:
        assert creds.tls_key_pem and creds.tls_cert_pem and creds.ca_pem
        write_private(out / "tls-client.key", creds.tls_key_pem)
        write_public(out / "tls-client.crt", creds.tls_cert_pem)
        write_public(out / "ca.crt", creds.ca_pem)
        info.update(
            host=lan_host,
            tls_key_file="tls-client.key",
            tls_cert_file="tls-client.crt",
            ca_file="ca.crt",
            server_ca_file="ca.crt",
        )
    write_public(out / "station.json", (json.dumps(info, indent=2) + "\n").encode())
    return out


def set_bundle_host(out: Path, lan_host: str | None) -> None:
    """Point an existing LAN bundle's station.json at `lan_host` (the listener moved); nothing else changes."""
    check_bundle_dir(out)
    info = json.loads((out / "station.json").read_text())
    if info.get("kind") == "lan" and info.get("host") != lan_host:
        info["host"] = lan_host
        write_public(out / "station.json", (json.dumps(info, indent=2) + "\n").encode())
