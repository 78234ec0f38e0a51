"""appliance/crashpoints.py: a named point SIGKILLs the process only when BIRTHLINE_CRASH_POINT names it, leaving
"<point> <pid>" in the BIRTHLINE_CRASH_MARKER file first (the campaign's only evidence of a planned death), and
every point the campaign lists is called somewhere in the product code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.crashpoints import CRASH_ENV, MARKER_ENV, POINTS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (
    "import os\nfrom appliance.crashpoints import crash_point\nprint(os.getpid(), flush=True)\n"
    "crash_point('after-revoke')\nprint('alive')\n"
)


@pytest.mark.parametrize(
    ("armed", "killed"), [("after-revoke", True), ("after-crl-sign", False), ("", False)]
)
def test_a_crash_point_kills_only_when_named(armed: str, killed: bool, tmp_path: Path) -> None:
    marker = tmp_path / "marker"
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    env[MARKER_ENV] = str(marker)
    if armed:
        env[CRASH_ENV] = armed
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, timeout=60, check=False
    )
    pid = proc.stdout.split()[0].decode()
    if killed:
        assert proc.returncode == -signal.SIGKILL and b"alive" not in proc.stdout
        assert marker.read_text() == f"after-revoke {pid}\n"
    else:
        assert proc.returncode == 0 and proc.stdout.split()[1:] == [b"alive"], proc.stderr
        assert not marker.exists()


def test_every_listed_point_is_called_in_the_product() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "appliance").rglob("*.py"))
    for point in POINTS:
        assert f'crash_point("{point}")' in source or f'_crash("{point}")' in source, point
