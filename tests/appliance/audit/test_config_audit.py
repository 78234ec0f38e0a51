"""The [audit] section: parsed, validated with where each problem is, documented, and used by the core."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.audit.claims import CheckpointPolicy
from appliance.config import parse_config
from appliance.errors import ConfigError

DOC = Path(__file__).resolve().parents[3] / "docs" / "configuration.md"
BASE = {"hsm": {"module": "m", "token_label": "t", "pin_file": "p"}}


def test_defaults_and_values() -> None:
    assert parse_config(BASE).audit.policy == CheckpointPolicy(1000, 300.0)
    cfg = parse_config({**BASE, "audit": {"checkpoint_every_entries": 50, "checkpoint_every_s": 12.5}})
    assert cfg.audit.policy == CheckpointPolicy(50, 12.5)
    assert (cfg.audit.policy.max_unsigned_entries, cfg.audit.policy.max_unsigned_s) == (100, 25.0)


def test_every_problem_is_reported_with_where_it_is() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "audit": {"checkpoint_every_entries": 9, "checkpoint_every_s": 5, "every": 1}})
    assert {p.where for p in info.value.problems} == {
        "audit.checkpoint_every_entries",
        "audit.checkpoint_every_s",
        "audit.every",
    }
    with pytest.raises(ConfigError) as info:
        parse_config({**BASE, "audit": {"checkpoint_every_entries": True, "checkpoint_every_s": "300"}})
    assert len(info.value.problems) == 2


def test_the_keys_are_documented() -> None:
    text = DOC.read_text()
    assert "## `[audit]`" in text
    for key in ("checkpoint_every_entries", "checkpoint_every_s"):
        assert f"| `{key}` |" in text, key
