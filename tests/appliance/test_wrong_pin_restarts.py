"""A restart loop with a wrong PIN never locks the token: `birthline run` started again and again (as systemd's
Restart= would) with a PIN file the token refuses presents that PIN to the token once. SoftHSM has no lockout,
so the C_Login attempts are counted by the PKCS#11 fault wrapper (tests/p11_faults.py) loaded into each real
daemon process. Once the PIN file is corrected the next start logs in and serves."""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hsm.softhsm import SoftHsmToken
from tests.daemon_config import lan_daemon_config
from tests.ports import free_ports

pytestmark = pytest.mark.slow

STARTS = 6


def _birthline(count: Path, *argv: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tests.p11_faults", str(count), *argv],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _logins(count: Path) -> int:
    return len(count.read_text().splitlines()) if count.exists() else 0


def _listening(port: int, proc: subprocess.Popen[str]) -> None:
    async def wait() -> None:
        async with asyncio.timeout(120):  # a deadlock guard only
            while True:
                assert proc.poll() is None, "birthline run exited"
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)
                    continue
                w.close()
                return

    asyncio.run(wait())


def test_a_restart_loop_with_a_wrong_pin_presents_it_once(
    tmp_path: Path, softhsm_token: SoftHsmToken, production_journal_template: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    shutil.copy(production_journal_template, state / "journal.sqlite")
    pin = tmp_path / "pin"
    pin.write_text("000000\n")  # not the token's PIN
    pin.chmod(0o600)
    port = free_ports(1)
    config = tmp_path / "birthline.toml"
    config.write_text(lan_daemon_config(state, softhsm_token, port, pin=pin))
    count = tmp_path / "logins"
    record = state / "hsm-pin-refused"
    for start in range(STARTS):
        proc = _birthline(count, "run", "--config", str(config))
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, err
        if start == 0:
            assert "PinIncorrect" in err, err
        else:
            assert "it is not presented again" in err, err
        assert "000000" not in err
        assert _logins(count) == 1, f"start {start + 1}: {_logins(count)} C_Login attempts with the wrong PIN"
    assert record.exists() and record.stat().st_mode & 0o077 == 0
    assert "000000" not in record.read_text()

    pin.write_text(softhsm_token.pin_file.read_text())
    proc = _birthline(count, "run", "--config", str(config))
    try:
        _listening(port, proc)
        assert _logins(count) == 2  # the corrected PIN, once
        assert not record.exists()  # a good login forgets the refused PIN
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=120)
