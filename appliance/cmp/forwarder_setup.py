"""The upstream forwarder as the daemon and `birthline upstream sync` compose it from the configuration: the
upstream's certificates, the MAC secret or the RA key in the HSM (appliance.cmp.forwarder does the forwarding)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509

from appliance.cmp.build import Protector
from appliance.cmp.forwarder import Forwarder
from appliance.cmp.protection import MacProtector
from appliance.config import UpstreamSection
from appliance.errors import ConfigError, Problem

if TYPE_CHECKING:
    from appliance.runtime import Core


def load_server_certs(settings: UpstreamSection) -> tuple[x509.Certificate, ...]:
    return _load_pem(settings.server_cert, "upstream.server_cert")


def load_ca_certs(settings: UpstreamSection) -> tuple[x509.Certificate, ...]:
    return _load_pem(settings.ca_certs, "upstream.ca_certs")


def _load_pem(path: Path | None, where: str) -> tuple[x509.Certificate, ...]:
    if path is None:
        return ()
    try:
        return tuple(x509.load_pem_x509_certificates(path.read_bytes()))
    except (OSError, ValueError) as exc:
        raise ConfigError([Problem(where, f"cannot load {path}: {exc}")]) from None


def mac_protector(settings: UpstreamSection) -> tuple[MacProtector, bytes]:
    from appliance.cmp.server import read_secret_file

    assert settings.secret_file is not None
    secret = read_secret_file(settings.secret_file)
    return MacProtector(secret, settings.kid.encode()), secret


def make_forwarder(core: Core) -> Forwarder:
    """The forwarder as the daemon and `upstream sync` build it (RA key in the HSM, or the MAC secret)."""
    from appliance import stations_registry as reg
    from appliance.cmp.ra import ensure_ra

    cfg = core.config.upstream
    if not cfg.enabled:
        raise ConfigError([Problem("upstream.url", "is not set: there is no upstream to forward to")])
    secret: bytes | None = None
    protector: Protector
    if cfg.protection == "mac":
        protector, secret = mac_protector(cfg)
    else:
        management = reg.ensure_management_ca(core.journal, core.token, core.config.stations.management_ca,
                                              audit=core.audit, actor="appliance")  # fmt: skip
        ra_cert = core.config.cmp.ra_cert or core.config.stations.tls_dir / "cmp-ra.pem"
        protector = ensure_ra(core.token, management, ra_cert)
    return Forwarder(core.journal, cfg, protector, server_certs=load_server_certs(cfg), secret=secret,
                     lock_path=core.config.appliance.state_dir / "upstream.lock", audit=core.audit,
                     ca_certs=load_ca_certs(cfg), alarms=core.alarms)  # fmt: skip


__all__ = ["load_ca_certs", "load_server_certs", "mac_protector", "make_forwarder"]
