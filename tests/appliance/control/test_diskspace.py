"""disk.low: raised from the real filesystem's free space (statvfs), cleared with a margin, raised by the daemon."""

from __future__ import annotations

from pathlib import Path

from appliance.alarms import Alarms
from appliance.daemon import Daemon
from appliance.diskspace import CAUSE, DiskWatch, free_mb
from console.client import ControlClient
from hsm.softhsm import SoftHsmToken
from tests.appliance.control.conftest import control_config


def test_raised_below_the_threshold_and_cleared_above_it_with_a_margin(tmp_path: Path) -> None:
    alarms = Alarms()
    free = free_mb(tmp_path)
    watch = DiskWatch(tmp_path, alarms, low_mb=int(free) + 1000, check_s=1)
    watch.check()
    alarm = alarms.get(CAUSE)
    assert alarm is not None and alarm.severity == "warning" and alarm.details["free_mb"] == round(free)
    watch.low_mb = int(free * 0.95)  # free is above the threshold but within its tenth: still raised
    watch.check()
    assert alarms.get(CAUSE) is not None
    watch.low_mb = int(free * 0.5)
    watch.check()
    assert alarms.get(CAUSE) is None


async def test_the_daemon_raises_it_and_the_console_sees_it(
    softhsm_token: SoftHsmToken, people_journal_template: Path, short_dir: Path
) -> None:
    config = control_config(
        short_dir / "state", softhsm_token, people_journal_template, disk_low_mb=10_000_000
    )
    async with Daemon(config), ControlClient(config.control_socket) as api:
        (alarm,) = [a for a in await api.alarms() if a["cause"] == CAUSE]
        assert "MB free" in alarm["message"] and alarm["advice"]
