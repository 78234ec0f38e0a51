"""SCEP labels (`/scep/<label>`): whom a label acts as and what it accepts, from `[scep.labels.<name>]`
(docs/configuration.md#scep)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

from appliance.admission import AdmissionLimits
from appliance.config import ScepSection
from appliance.scep.algorithms import LEGACY_RISKS, AlgorithmPolicy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScepLabel:
    name: str
    station: str
    """The registered station whose line and work orders authorise this label's requests."""
    profile: str | None = None
    device_serial_from: str = "serialNumber"
    """The subject attribute of a CSR that names its device (serialNumber, or commonName for clients that can set
    nothing else): required with a work-order challenge, checked against a device challenge's device."""
    renewal: bool = True
    policy: AlgorithmPolicy = field(default_factory=AlgorithmPolicy)


def labels_from_config(section: ScepSection) -> dict[str, ScepLabel]:
    labels = {}
    for name, cfg in section.labels.items():
        policy = AlgorithmPolicy.allowing(cfg.legacy_algorithms)
        labels[name] = ScepLabel(name, cfg.station, cfg.profile, cfg.device_serial_from, cfg.renewal, policy)
    warn_legacy(labels)
    return labels


def admission_from_config(section: ScepSection) -> AdmissionLimits:
    """What peers that have not authenticated may make the SCEP server do ([scep]'s cost keys)."""
    return AdmissionLimits(
        check_rate_per_client=section.check_rate_per_client, check_burst_per_client=section.check_burst_per_client,
        check_rate_total=section.check_rate_total, check_burst_total=section.check_burst_total,
        pace_max_delay_s=section.pace_max_delay_s, checks_in_flight=section.checks_in_flight,
        clients_max=section.clients_max, known_client_s=section.known_client_s,
    )  # fmt: skip


def warn_legacy(labels: Mapping[str, ScepLabel]) -> None:
    """Say at start, in the log, what each legacy algorithm a label accepts exposes (once per label)."""
    for label in labels.values():
        for name in sorted(label.policy.legacy):
            log.warning(
                "SCEP label %s accepts %s (legacy_algorithms): %s", label.name, name, LEGACY_RISKS[name]
            )
