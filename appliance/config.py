"""Appliance configuration: TOML into frozen dataclasses, every problem reported at once with where it is.

Secrets are never in this file: the HSM PIN comes from a file or a systemd credential named here.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from appliance import names
from appliance.config_frontends import (
    parse_cmp,
    parse_control,
    parse_est,
    parse_scep,
    parse_upstream,
)
from appliance.config_reader import (
    Reader,
    check_per_peer,
    is_port,
    read_host_names,
    read_http_limits,
    read_listen,
    read_table,
    shared_listener_problems,
    shown_key,
)
from appliance.config_sections import (
    VA_LIMITS,
    ApplianceSection,
    AuditSection,
    CmpLabelSection,
    CmpSection,
    Config,
    ControlSection,
    EstLabelSection,
    EstSection,
    IssuanceSection,
    JournalSection,
    MetricsSection,
    ScepLabelSection,
    ScepSection,
    StationsSection,
    UpstreamSection,
    VaSection,
)
from appliance.errors import ConfigError, Problem
from appliance.profiles import Profile, builtin_profiles, parse_profiles
from appliance.va.service import VaSettings
from hsm.config import HsmConfig

# The sections are defined in config_sections.py; the rest of the appliance imports them from here.
__all__ = [
    "DEFAULT_CONFIG_PATH",
    "MAX_CONFIG_BYTES",
    "ApplianceSection",
    "AuditSection",
    "CmpLabelSection",
    "CmpSection",
    "Config",
    "ControlSection",
    "EstLabelSection",
    "EstSection",
    "IssuanceSection",
    "JournalSection",
    "MetricsSection",
    "ScepLabelSection",
    "ScepSection",
    "StationsSection",
    "UpstreamSection",
    "VaSection",
    "config_warnings",
    "load_config",
    "load_config_bytes",
    "parse_config",
]

DEFAULT_CONFIG_PATH = Path("/etc/birthline/birthline.toml")


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
        problems.append(Problem(shown_key(key), "unknown section"))

    r = Reader(read_table(data, "appliance", problems), "appliance", problems)
    state_dir = path(r.text("state_dir", "/var/lib/birthline")) or Path("/var/lib/birthline")
    host_names = read_host_names(r, "names")
    r.done()

    r = Reader(read_table(data, "hsm", problems), "hsm", problems)
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

    r = Reader(read_table(data, "journal", problems), "journal", problems)
    journal_path = r.text("path", "journal.sqlite")
    batch_max = r.integer("batch_max", 256, lo=1, hi=4096)
    prewarm = r.flag("prewarm", True)
    r.done()
    jp = Path(journal_path or "journal.sqlite")
    journal = JournalSection(
        path=jp if jp.is_absolute() else state_dir / jp, batch_max=batch_max, prewarm=prewarm
    )

    r = Reader(read_table(data, "issuance", problems), "issuance", problems)
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

    r = Reader(read_table(data, "stations", problems), "stations", problems)
    r.name("management_ca", names.CA)
    lan_listen = r.text("lan_listen", "127.0.0.1:7450")
    if isinstance(lan_listen, str) and lan_listen:
        host, sep, port = lan_listen.rpartition(":")
        if not sep or not host or not is_port(port):
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
    check_per_peer(stations.max_connections, stations.max_connections_per_peer, "stations", problems)
    r.done()

    r = Reader(read_table(data, "va", problems), "va", problems)
    va_listen = r.text("listen", "127.0.0.1:7451")
    if isinstance(va_listen, str) and va_listen:
        host, sep, port = va_listen.rpartition(":")
        if not sep or not host or not is_port(port):
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
        limits=read_http_limits(r, VA_LIMITS),
        ocsp_listen=read_listen(r, "ocsp_listen", ""),
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

    cmp = parse_cmp(read_table(data, "cmp", problems), problems, path)
    est = parse_est(read_table(data, "est", problems), problems, path)
    upstream = parse_upstream(read_table(data, "upstream", problems), problems, path)

    r = Reader(read_table(data, "audit", problems), "audit", problems)
    # Lower bounds: the promise of twice the interval must leave room for the checkpointer's 1 s poll and the
    # signing round trip on a loaded machine, or verify would report a healthy appliance's log as overdue.
    audit = AuditSection(
        checkpoint_every_entries=r.integer("checkpoint_every_entries", 1000, lo=10, hi=10_000_000),
        checkpoint_every_s=r.number("checkpoint_every_s", 300.0, lo=10, hi=86400),
    )
    r.done()

    control = parse_control(read_table(data, "control", problems), problems, path, state_dir)
    r = Reader(read_table(data, "metrics", problems), "metrics", problems)
    metrics = MetricsSection(listen=read_listen(r, "listen", ""))
    r.done()

    # Only the 802.1AR built-in is served unconfigured: the Matter built-in carries a test vendor ID and must be
    # configured (base = "matter-dac") with the manufacturer's own before any device gets one.
    profiles: dict[str, Profile] = {"idevid": builtin_profiles()["idevid"]}
    configured, profile_problems = parse_profiles(read_table(data, "profiles", problems), "profiles")
    profiles.update(configured)
    problems.extend(profile_problems)
    for name, label in cmp.labels.items():
        if label.profile is not None and label.profile not in profiles:
            problems.append(Problem(f"cmp.labels.{name}.profile", f"no profile named {label.profile!r}"))
    scep = parse_scep(read_table(data, "scep", problems), problems, path)
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
        shared_listener_problems(
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


def _wide_integers(data: Mapping[str, Any]) -> list[Problem]:
    """Integers outside 64 bits, which TOML 1.0 says a parser must refuse (tomllib reads any length)."""
    problems: list[Problem] = []
    # A loop, not recursion: what tomllib read nested deep can be walked here without a RecursionError.
    stack: list[tuple[str, Any]] = [("", data)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, Mapping):
            for key, item in value.items():
                shown = shown_key(key)
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
