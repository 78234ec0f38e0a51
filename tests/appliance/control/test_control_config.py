"""[control] and [metrics] in the configuration: defaults, and every problem reported with where it is."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import parse_config
from appliance.errors import ConfigError

BASE = {
    "hsm": {"module": "/x.so", "token_label": "t", "pin_file": "pin"},
    "appliance": {"state_dir": "/srv/bl"},
}


def test_defaults_put_the_socket_in_the_state_directory_and_serve_no_metrics() -> None:
    config = parse_config(BASE, base_dir=Path("/etc/birthline"))
    assert config.control_socket == Path("/srv/bl/control.sock")
    assert config.control.enabled and config.control.group == "" and config.metrics.address is None


def test_every_problem_is_reported_with_where_it_is() -> None:
    data = {**BASE, "control": {"group": "no-such-group-here", "max_connections": 4, "max_subscribers": 4,
                                "session_ttl_s": 1, "socket": "/run/" + "s" * 120, "colour": "blue"},
            "metrics": {"listen": "nowhere"}}  # fmt: skip
    with pytest.raises(ConfigError) as exc:
        parse_config(data, base_dir=Path("/etc/birthline"))
    where = {p.where for p in exc.value.problems}
    assert where == {"control.group", "control.max_subscribers", "control.session_ttl_s", "control.socket",
                     "control.colour", "metrics.listen"}  # fmt: skip


def test_metrics_listen_and_a_relative_socket() -> None:
    config = parse_config({**BASE, "control": {"socket": "run/ctl.sock"}, "metrics": {"listen": "192.0.2.10:9100"}},
                          base_dir=Path("/etc/birthline"))  # fmt: skip
    assert config.control_socket == Path("/etc/birthline/run/ctl.sock")
    assert config.metrics.address == ("192.0.2.10", 9100)
