"""`birthline dashboard` as a command: its own process that never loads the appliance core, the HSM layer,
the stations or cryptography; a usable refusal for a wrong argument; a screenshot without a terminal."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from pathlib import Path

from tests.appliance.control.conftest import Floor

ALLOWED_APPLIANCE = {"appliance", "appliance.cli", "appliance.cli.launch"}  # the entry point's own packages


def dashboard(*args: str | Path, importtime: bool = False) -> subprocess.CompletedProcess[str]:
    flags = ["-X", "importtime"] if importtime else []
    return subprocess.run([sys.executable, *flags, "-m", "appliance.cli.launch", "dashboard", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)  # fmt: skip


def test_a_wrong_argument_is_one_line_and_exit_2(tmp_path: Path) -> None:
    missing = dashboard("--config", tmp_path / "nope.toml")
    assert missing.returncode == 2 and "--config" in missing.stderr and "Traceback" not in missing.stderr
    (tmp_path / "bad.toml").write_text("[control\n")
    bad = dashboard("--config", tmp_path / "bad.toml")
    assert bad.returncode == 2 and "not valid TOML" in bad.stderr
    size = dashboard("--socket", tmp_path / "x.sock", "--screenshot", tmp_path / "x.svg", "--size", "huge")
    assert size.returncode == 2 and "--size" in size.stderr
    full = subprocess.run([sys.executable, "-m", "appliance.cli.main", "dashboard", "--help"], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert full.returncode == 0 and "--screenshot" in full.stdout  # the whole CLI knows the command too


def test_a_screenshot_without_a_daemon_gives_up_with_a_clear_error(tmp_path: Path) -> None:
    out = dashboard(
        "--socket", tmp_path / "nonexistent.sock", "--screenshot", tmp_path / "x.svg", "--wait", "1"
    )
    assert out.returncode == 1, out.stdout[-500:] + out.stderr[-500:]
    assert "did not answer within 1 s" in out.stdout + out.stderr and not (tmp_path / "x.svg").exists()


async def test_a_screenshot_of_the_live_line_without_loading_the_core(floor: Floor, tmp_path: Path) -> None:
    shot = tmp_path / "line.svg"
    out = await asyncio.to_thread(
        dashboard, "--socket", floor.socket, "--screenshot", shot, "--size", "100x30", "--after", "0.5",
        "--show", "log", importtime=True,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    svg = shot.read_text().replace("&#160;", " ")  # the SVG's text spaces
    assert svg.startswith("<svg") and ">fixture-1<" in svg and "connected to the daemon" in svg
    loaded = set(re.findall(r"import time:\s+\d+ \|\s+\d+ \|\s+(\S+)", out.stderr))
    assert "textual.app" in loaded and "console.dashboard.app" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("hsm", "stations", "cryptography", "pkcs11", "serial",
                                                       "pyasn1", "prometheus_client")}  # fmt: skip
    core = {m for m in loaded if m.split(".")[0] == "appliance"} - ALLOWED_APPLIANCE
    assert not heavy and not core, (heavy, core)
