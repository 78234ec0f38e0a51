"""The daemon loads the CMP, EST and SCEP stacks only when it serves them (or forwards upstream, which speaks CMP).

Their ASN.1 code (pyasn1 and its RFC modules) is ~21 MB of the daemon's resident memory; the default appliance
serves none of them (docs/performance.md "Memory"). A real `birthline run` reports every module it imports
(`python -X importtime`, which its prepare workers inherit: theirs are counted too) until it listens; the same
daemon with `[cmp] listen` set shows the check can fail.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import daemon_state, write_daemon_config

_IMPORT = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s*(\S+)\s*$")
_ASN1 = ("pyasn1", "pyasn1_alt_modules", "appliance.cmp", "appliance.est", "appliance.scep")


def _config(tmp: Path, token: SoftHsmToken, template: Path, extra: str) -> Path:
    state = daemon_state(tmp / "state", template)
    return write_daemon_config(
        tmp / "birthline.toml", state, token, lan="127.0.0.1:0", va="127.0.0.1:0", extra=extra
    )


def _imports_until_listening(config: Path) -> set[str]:
    """Every module a real `birthline run` imported by the time its LAN listener is up."""
    proc = subprocess.Popen(
        [sys.executable, "-X", "importtime", "-m", "appliance.cli.main", "run", "--config", str(config)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={k: v for k, v in os.environ.items() if k != "PYTHONPROFILEIMPORTTIME"},
    )  # fmt: skip
    lines: list[str] = []
    listening = threading.Event()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "listening for LAN stations" in line:
                listening.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        while not listening.is_set() and proc.poll() is None and time.monotonic() < deadline:
            listening.wait(0.2)
        assert listening.is_set(), "".join(lines[-20:])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        reader.join(timeout=10)
    return {m.group(1) for line in lines if (m := _IMPORT.match(line))}


def _asn1(modules: set[str]) -> set[str]:
    return {m for m in modules if m.split(".")[0] in _ASN1[:2] or m.startswith(_ASN1[2:])}


def test_the_default_daemon_never_imports_the_asn1_protocol_stacks(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    modules = _imports_until_listening(_config(tmp_path, softhsm_token, production_journal_template, ""))
    assert "appliance.issuance.service" in modules and "appliance.va.service" in modules  # the trace is whole
    assert _asn1(modules) == set()


def test_a_daemon_serving_cmp_imports_them(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path, softhsm_token, production_journal_template, '[cmp]\nlisten = "127.0.0.1:0"\n')
    found = _asn1(_imports_until_listening(config))
    assert {"pyasn1_alt_modules.rfc4210", "appliance.cmp.server"} <= found
    assert not any(m.startswith(("appliance.est", "appliance.scep")) for m in found)
