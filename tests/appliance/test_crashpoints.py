"""appliance/crashpoints.py: a named point SIGKILLs the process only when BIRTHLINE_CRASH_POINT names it, and every
point the campaign lists is called somewhere in the product code."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.crashpoints import CRASH_ENV, POINTS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = "from appliance.crashpoints import crash_point\ncrash_point('after-revoke')\nprint('alive')\n"


@pytest.mark.parametrize(
    ("armed", "killed"), [("after-revoke", True), ("after-crl-sign", False), ("", False)]
)
def test_a_crash_point_kills_only_when_named(armed: str, killed: bool) -> None:
    env = {k: v for k, v in os.environ.items() if k != CRASH_ENV}
    if armed:
        env[CRASH_ENV] = armed
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, timeout=60, check=False
    )
    if killed:
        assert proc.returncode == -signal.SIGKILL and b"alive" not in proc.stdout
    else:
        assert proc.returncode == 0 and proc.stdout.strip() == b"alive", proc.stderr


def test_every_listed_point_is_called_in_the_product() -> None:
    source = "\n".join(p.read_text() for p in (ROOT / "appliance").rglob("*.py"))
    for point in POINTS:
        assert f'crash_point("{point}")' in source or f'_crash("{point}")' in source, point
