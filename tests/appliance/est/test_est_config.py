"""[est] is read into EstSection; every problem is reported with where it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.errors import ConfigError

BASE = {"hsm": {"module": "m", "token_label": "t", "pin_file": "p"}}


def test_est_config_reports_every_problem(tmp_path: Path) -> None:
    wide = tmp_path / "wide.secret"
    wide.write_bytes(b"s")
    wide.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "est": {"listen": "nowhere", "default_label": "zz", "max_request_bytes": 10,
                                      "labels": {
            "a": {"station": "s1", "password": "inline"},
            "b": {"station": "s2", "password_file": str(wide), "channel_binding": "maybe"},
            "c": {"profile": "nope", "station_certificate": True, "username": "has:colon"},
            "bad label!": {"station": "s3", "station_certificate": True},
        }}})  # fmt: skip
    where = {p.where for p in info.value.problems}
    assert {"est.listen", "est.default_label", "est.max_request_bytes", "est.labels.a.password", "est.labels.a",
            "est.labels.b.password_file", "est.labels.b.channel_binding", "est.labels.c.station",
            "est.labels.c.profile", "est.labels.c.username"} <= where, where  # fmt: skip
    assert any(w.startswith("est.labels.'bad label!'") for w in where), where


def test_est_config_is_read(tmp_path: Path) -> None:
    good = tmp_path / "good.secret"
    good.write_bytes(b"s")
    good.chmod(0o600)
    cfg = parse_config({**BASE, "est": {"listen": "127.0.0.1:7454", "default_label": "line1", "labels": {
        "line1": {"station": "s1", "password_file": str(good), "username": "fixture"}}}})  # fmt: skip
    assert cfg.est.address == ("127.0.0.1", 7454) and cfg.est.default_label == "line1"
    label = cfg.est.labels["line1"]
    assert label.password_file == good and label.username == "fixture" and not label.station_certificate
    assert parse_config(BASE).est.address is None  # no [est]: no EST listener
