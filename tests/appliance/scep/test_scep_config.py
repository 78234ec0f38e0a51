"""[scep] in the configuration: defaults, a good section, and every problem reported at once with its path."""

from __future__ import annotations

import pytest

from appliance.config import parse_config
from appliance.errors import ConfigError
from tests.appliance.test_config import MINIMAL


def test_scep_is_off_by_default_and_a_good_section_parses() -> None:
    cfg = parse_config(MINIMAL)
    assert cfg.scep.address is None and not cfg.scep.labels
    cfg = parse_config({**MINIMAL, "scep": {
        "listen": "127.0.0.1:8080", "default_label": "line1", "max_connections": 20, "max_connections_per_peer": 5,
        "labels": {"line1": {"station": "fixture-1", "device_serial_from": "commonName",
                             "legacy_algorithms": ["des", "sha1", "des"], "renewal": False}},
    }})  # fmt: skip
    label = cfg.scep.labels["line1"]
    assert cfg.scep.address == ("127.0.0.1", 8080) and cfg.scep.default_label == "line1"
    assert cfg.scep.limits.max_connections == 20 and cfg.scep.limits.max_connections_per_peer == 5
    assert label.legacy_algorithms == ("des", "sha1") and label.device_serial_from == "commonName"
    assert label.renewal is False and label.profile is None


def test_every_scep_problem_is_reported_with_where_it_is() -> None:
    data = {**MINIMAL, "scep": {
        "listen": "nowhere", "default_label": "absent", "max_message_bytes": 10, "header_timeout_s": -1,
        "labels": {
            "a": {"station": "fixture-1", "legacy_algorithms": ["rc2"], "device_serial_from": "uid",
                  "challenge": "hunter2", "profile": "no-such"},
            "b": {},
            "bad label!": {"station": "x"},
        },
    }}  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config(data)
    where = {p.where for p in info.value.problems}
    assert where >= {
        "scep.listen", "scep.default_label", "scep.max_message_bytes", "scep.header_timeout_s",
        "scep.labels.a.legacy_algorithms", "scep.labels.a.device_serial_from", "scep.labels.a.challenge",
        "scep.labels.a.profile", "scep.labels.b.station",
    }, where  # fmt: skip
    assert any(p.where.startswith("scep.labels.'bad label!'") for p in info.value.problems), where
    # The challenge's value is never echoed back.
    assert "hunter2" not in str(info.value)
