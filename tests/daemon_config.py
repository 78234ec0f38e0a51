"""The configuration of a real `birthline run` started by a test: its state directory and the session's SoftHSM2
token, then whatever sections the test needs."""

from __future__ import annotations

from pathlib import Path

from hsm.softhsm import SoftHsmToken


def daemon_config(state: Path, token: SoftHsmToken, sections: str = "", *, pin: Path | None = None) -> str:
    """[appliance] and [hsm] for `state` and `token` (`pin`: another PIN file, e.g. a wrong one), then
    `sections` (TOML text)."""
    return (
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{token.module}"\ntoken_label = "{token.label}"\npin_file = "{pin or token.pin_file}"\n'
        f'softhsm_conf = "{token.conf_path}"\n'
    ) + sections


def lan_daemon_config(state: Path, token: SoftHsmToken, port: int, *, pin: Path | None = None) -> str:
    """A daemon with the LAN station listener on 127.0.0.1:`port` and the VA on a port of its choosing."""
    return daemon_config(
        state, token, f'[stations]\nlan_listen = "127.0.0.1:{port}"\ntls_dir = "{state}/tls"\n'
        '[va]\nlisten = "127.0.0.1:0"\n', pin=pin,
    )  # fmt: skip
