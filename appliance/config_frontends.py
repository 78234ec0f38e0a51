"""Reading the [control], [cmp], [scep], [est] and [upstream] tables: the sections with labels, files that hold
secrets and listeners of their own. Called by appliance/config.py's parse_config, which reads the other tables.
"""

from __future__ import annotations

import grp
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509

from appliance import names
from appliance.config_reader import (
    Reader,
    check_private_file,
    read_admission_keys,
    read_http_limits,
    read_listen,
    read_paths,
)
from appliance.config_sections import (
    CMP_LIMITS,
    EST_LIMITS,
    SCEP_DEVICE_SERIAL_FROM,
    SCEP_LEGACY_ALGORITHMS,
    SCEP_LIMITS,
    CmpLabelSection,
    CmpSection,
    ControlSection,
    EstLabelSection,
    EstSection,
    ScepLabelSection,
    ScepSection,
    UpstreamSection,
)
from appliance.errors import Problem
from appliance.text import safe_repr

_SOCKET_NAME_MAX = 100


def parse_control(
    table: Mapping[str, Any],
    problems: list[Problem],
    path: Callable[[str | None], Path | None],
    state_dir: Path,
) -> ControlSection:
    r = Reader(table, "control", problems)
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


def parse_cmp(
    table: Mapping[str, Any], problems: list[Problem], path: Callable[[str | None], Path | None]
) -> CmpSection:
    r = Reader(table, "cmp", problems)
    listen = read_listen(r, "listen", "")
    max_bytes = r.integer("max_message_bytes", 256 * 1024, lo=1024, hi=4 * 1024 * 1024)
    confirm_wait = r.number("confirm_wait_s", 300.0, lo=1, hi=86400)
    max_pending = r.integer("max_pending", 10_000, lo=1, hi=1_000_000)
    r.name("default_label", names.CMP_LABEL)
    default_label = r.text("default_label", "") or ""
    ra_cert = path(r.text("ra_cert"))
    limits = read_http_limits(r, CMP_LIMITS)
    crl_timeout = r.number("crl_timeout_s", 5.0, lo=0.1, hi=120)
    crl_max_bytes = r.integer("crl_max_bytes", 1024 * 1024, lo=1024, hi=64 * 1024 * 1024)
    crl_retry = r.number("crl_retry_s", 60.0, lo=1, hi=86400)
    crl_refresh = r.number("crl_refresh_s", 3600.0, lo=10, hi=7 * 86400)
    costs = CmpSection(
        max_mac_iterations=r.integer("max_mac_iterations", 10_000, lo=100, hi=100_000),
        **read_admission_keys(r),
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
        lr = Reader(raw, where, problems)
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
            crl_files=read_paths(lr, "crl_files", path),
            crl_fetch=lr.flag("crl_fetch", True),
        )
        lr.done()
        check_private_file(label.secret_file, f"{where}.secret_file", problems)
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


def parse_scep(
    table: Mapping[str, Any], problems: list[Problem], path: Callable[[str | None], Path | None]
) -> ScepSection:
    r = Reader(table, "scep", problems)
    d = ScepSection()
    listen = read_listen(r, "listen", "")
    max_bytes = r.integer("max_message_bytes", d.max_message_bytes, lo=4096, hi=1024 * 1024)
    r.name("default_label", names.SCEP_LABEL)
    default_label = r.text("default_label", "") or ""
    ra_cert = path(r.text("ra_cert"))
    limits = read_http_limits(r, SCEP_LIMITS)
    costs = read_admission_keys(r)
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
        lr = Reader(raw, where, problems)
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


def parse_est(
    table: Mapping[str, Any], problems: list[Problem], path: Callable[[str | None], Path | None]
) -> EstSection:
    r = Reader(table, "est", problems)
    d = EstSection()
    listen = read_listen(r, "listen", "")
    r.name("default_label", names.EST_LABEL)
    default_label = r.text("default_label", "") or ""
    max_request_bytes = r.integer("max_request_bytes", d.max_request_bytes, lo=1024, hi=1024 * 1024)
    handshake_timeout_s = r.number("handshake_timeout_s", d.handshake_timeout_s, lo=0.05, hi=300)
    keygen_in_flight = r.integer("keygen_in_flight", d.keygen_in_flight, lo=1, hi=64)
    auth_failure_limit = r.integer("auth_failure_limit", d.auth_failure_limit, lo=1, hi=100_000)
    auth_failure_window_s = r.number("auth_failure_window_s", d.auth_failure_window_s, lo=1, hi=86400)
    limits = read_http_limits(r, EST_LIMITS)
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
        lr = Reader(raw, where, problems)
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
            crl_files=read_paths(lr, "crl_files", path),
            crl_fetch=lr.flag("crl_fetch", True),
            channel_binding=lr.text("channel_binding", "optional") or "optional",
            serverkeygen=lr.flag("serverkeygen", False),
        )
        lr.done()
        check_private_file(label.password_file, f"{where}.password_file", problems)
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


def parse_upstream(
    table: Mapping[str, Any], problems: list[Problem], path: Callable[[str | None], Path | None]
) -> UpstreamSection:
    r = Reader(table, "upstream", problems)
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
    check_private_file(section.secret_file, "upstream.secret_file", problems)
    if section.backoff_cap_s < section.backoff_base_s:
        problems.append(Problem("upstream.backoff_cap_s", "must not be below backoff_base_s"))
    if section.hard_max_queue_size < section.max_queue_size:
        problems.append(Problem("upstream.hard_max_queue_size", "must not be below max_queue_size"))
    if section.hard_max_queue_age_s < section.max_queue_age_s:
        problems.append(Problem("upstream.hard_max_queue_age_s", "must not be below max_queue_age_s"))
    return section
