"""Finding the control socket from the appliance's configuration file, without loading the appliance.

The same rule as appliance.config: `[control] socket`, else `<[appliance] state_dir>/control.sock`; relative
paths are relative to the configuration file's directory. tests/console/test_client.py checks the two agree.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/birthline/birthline.toml")
DEFAULT_STATE_DIR = "/var/lib/birthline"


def control_socket(config: Path = DEFAULT_CONFIG) -> Path:
    """The control socket named by `config` (OSError if it cannot be read, ValueError if it is not TOML)."""
    try:
        data = tomllib.loads(config.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{config}: not valid TOML: {exc}") from exc
    base = config.resolve().parent

    def path(value: object, default: str) -> Path:
        p = Path(value if isinstance(value, str) and value else default)
        return p if p.is_absolute() else base / p

    appliance = data.get("appliance", {})
    control = data.get("control", {})
    state_dir = path(appliance.get("state_dir") if isinstance(appliance, dict) else None, DEFAULT_STATE_DIR)
    socket = control.get("socket") if isinstance(control, dict) else None
    return path(socket, "") if isinstance(socket, str) and socket else state_dir / "control.sock"
