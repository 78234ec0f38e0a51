"""How to reach one token; immutable so it can be a registry key and shared between threads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HsmConfig:
    module: str
    token_label: str
    pin_file: str | None = None
    # A systemd credential name, read from $CREDENTIALS_DIRECTORY/<name> (LoadCredential=/SetCredential=).
    pin_credential: str | None = None
    # Dev/test/demo only: exported as SOFTHSM2_CONF before the module is loaded.
    softhsm_conf: str | None = None
    call_timeout_s: float = 10.0
    # Where a PIN the token refused is remembered (a salted HMAC of it, never the PIN), so that no later
    # process presents the same wrong PIN again: a restart loop must not count down the token's lockout.
    # None: remembered for the life of the process only.
    refused_pin_record: str | None = None
