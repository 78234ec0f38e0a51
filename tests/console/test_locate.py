"""console.locate finds the control socket by the same rule as appliance.config, without importing it."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import load_config
from console.locate import control_socket

HSM = '[hsm]\nmodule = "/x.so"\ntoken_label = "t"\npin_file = "pin"\n'


@pytest.mark.parametrize(
    "extra",
    [
        "",
        '[appliance]\nstate_dir = "/var/lib/other"\n',
        '[appliance]\nstate_dir = "rel/state"\n',
        '[appliance]\nstate_dir = "/srv/bl"\n[control]\nsocket = "/run/birthline/ctl.sock"\n',
        '[control]\nsocket = "sock/ctl.sock"\n',
    ],
)
def test_locate_agrees_with_the_configuration(tmp_path: Path, extra: str) -> None:
    cfg = tmp_path / "etc" / "birthline.toml"
    cfg.parent.mkdir()
    cfg.write_text(HSM + extra)
    assert control_socket(cfg) == load_config(cfg).control_socket


def test_locate_says_what_is_wrong(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[control\n")
    with pytest.raises(ValueError, match="not valid TOML"):
        control_socket(bad)
    with pytest.raises(OSError):
        control_socket(tmp_path / "missing.toml")
