"""Faults of the appliance's own making, end to end and for real: the daemon's state directory on a tmpfs that
fills up, its journal made immutable on an ext4 loop mount, its SoftHSM token removed. For each: issuance is
refused with the right code, `birthline station-client enroll` gives up naming that code, the daemon logs one
line for the cause however many requests were refused (and nothing else but other causes' alarm lines), the
alarm is active; once the fault is removed, the next enrolment issues and the alarm clears. Last, the registry
watcher, whose read error is injected."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

from appliance.daemon import Daemon
from hsm.softhsm import SoftHsmToken
from stations.codes import Code
from stations.messages import Error
from stations.session import Authenticated
from tests.appliance.test_daemon import _config, _enroll, add_lan
from tests.real_faults import ext4_loop, fill, hsm_token_removed, set_immutable, small_tmpfs
from tests.stations.station_link import Link

REFUSED = 10  # ENROLLs sent over one link while the fault lasts, besides the station client's own retries


async def _station_client(
    daemon: Daemon, bundle: Path, serial: str, out: Path, timeout: float
) -> tuple[int, str]:
    """`birthline station-client enroll` in a child process, as a fixture runs it: exit status and stderr."""
    assert daemon.lan_address is not None
    host, port = daemon.lan_address
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "appliance.cli.main", "station-client", "enroll", "--host", f"{host}:{port}",
        "--credentials", str(bundle), "--serial", serial, "--keygen", "--out", str(out), "--timeout", str(timeout),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), timeout + 120)  # a deadlock guard only
    assert proc.returncode is not None
    return proc.returncode, err.decode()


async def _fault(
    daemon: Daemon,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    *,
    code: Code,
    cause: str,
    inject: Callable[[], None],
    remove: Callable[[], None],
) -> str:
    """The common scenario; returns the station client's error line."""
    assert daemon.core is not None
    alarms = daemon.core.alarms
    bundle = await add_lan(daemon, "line1-st1", tmp_path)
    out = tmp_path / "out"
    rc, err = await _station_client(daemon, bundle, "SN-BEFORE", out, 60)
    assert rc == 0, err
    inject()
    caplog.clear()
    try:
        with caplog.at_level(logging.WARNING):
            rc, err = await _station_client(daemon, bundle, "SN-FAULT", out, 4)
            link = await Link.tls(daemon.lan_address or ("", 0), bundle)
            assert isinstance(await link.handshake(), Authenticated)
            for i in range(REFUSED):
                reply = await _enroll(link, f"SN-FAULT-{i}")
                assert isinstance(reply, Error) and reply.code == code, reply
            await link.close()
        assert rc == 1
        assert f"TIMEOUT (107): gave up after 4 s; last answer {code.name} ({int(code)}): " in err, err
        alarm = alarms.get(cause)
        assert alarm is not None and alarm.severity == "critical" and alarm.code == int(code)
        assert alarm.count >= REFUSED + 1 and alarm.advice
        lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
        mine = [line for line in lines if cause in line]
        assert len(mine) == 1 and mine[0].startswith(f"ALARM {cause}: "), lines
        # Everything else the fault caused is another component's alarm, each logged once.
        causes = [line.split(":", 1)[0] for line in lines]
        assert all(c.startswith("ALARM ") for c in causes) and len(causes) == len(set(causes)), lines
    finally:
        remove()
    rc, after = await _station_client(daemon, bundle, "SN-AFTER", out, 120)
    assert rc == 0, after
    assert alarms.get(cause) is None
    return err


@pytest.fixture
async def on_tmpfs(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> AsyncIterator[Daemon]:
    with small_tmpfs(tmp_path / "state", "16m") as state:
        async with Daemon(_config(state, softhsm_token, production_journal_template)) as d:
            yield d


async def test_disk_full(on_tmpfs: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    daemon = on_tmpfs
    state = daemon.config.appliance.state_dir
    filler: list[Path] = []

    def inject() -> None:
        # The WAL is reused after a checkpoint: empty it, so that the next commit needs new space.
        daemon.journal.call(lambda: daemon.journal.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone())
        filler.append(fill(state))

    err = await _fault(
        daemon, tmp_path, caplog, code=Code.JOURNAL_UNAVAILABLE, cause="issuance.journal-unavailable",
        inject=inject, remove=lambda: filler.pop().unlink(),
    )  # fmt: skip
    assert "disk full" in err
    assert daemon.journal.integrity_check() == "ok"


@pytest.fixture
async def on_ext4(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> AsyncIterator[Daemon]:
    with ext4_loop(tmp_path / "state") as state:
        async with Daemon(_config(state, softhsm_token, production_journal_template)) as d:
            yield d


async def test_journal_immutable(on_ext4: Daemon, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    daemon = on_ext4
    journal = daemon.config.journal.path
    # Not the -shm file: SQLite writes it through mmap, and the kernel answers that with SIGBUS.
    files = (journal, journal.with_name(journal.name + "-wal"))
    err = await _fault(
        daemon, tmp_path, caplog, code=Code.JOURNAL_UNAVAILABLE, cause="issuance.journal-unavailable",
        inject=lambda: set_immutable(*files), remove=lambda: set_immutable(*files, on=False),
    )  # fmt: skip
    assert "journal unavailable while" in err
    assert daemon.journal.integrity_check() == "ok"


async def test_hsm_gone(
    softhsm_token: SoftHsmToken,
    production_journal_template: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    removed: list[object] = []

    def inject() -> None:
        cm = hsm_token_removed(softhsm_token)
        cm.__enter__()
        removed.append(cm)

    def remove() -> None:
        removed[0].__exit__(None, None, None)  # type: ignore[attr-defined]

    config = _config(tmp_path / "state", softhsm_token, production_journal_template)
    async with Daemon(config) as daemon:
        err = await _fault(
            daemon, tmp_path, caplog, code=Code.HSM_UNAVAILABLE, cause="issuance.hsm-unavailable",
            inject=inject, remove=remove,
        )  # fmt: skip
    assert "HSM" in err


async def test_registry_watcher_failing_is_one_alarm_not_a_traceback_per_poll(
    softhsm_token: SoftHsmToken,
    production_journal_template: Path,
    tmp_path: Path,
    mocker: MockerFixture,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Reading the registry fails (a journal read error: injected, since reads fail for real only on a failing
    block device) for many polls: one alarm line and one traceback, then the alarm clears on the next read."""
    config = _config(tmp_path / "state", softhsm_token, production_journal_template)
    async with Daemon(config) as daemon:
        assert daemon.core is not None
        alarms = daemon.core.alarms
        with caplog.at_level(logging.WARNING):
            failing = mocker.patch(
                "appliance.daemon.alist_stations", side_effect=sqlite3.OperationalError("disk I/O error")
            )
            async with asyncio.timeout(60):  # polls every 0.1 s; a deadlock guard only
                while (alarm := alarms.get("stations.registry")) is None or alarm.count < 5:
                    await asyncio.sleep(0.05)
            assert "disk I/O error" in alarm.message
            lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
            assert (
                len(lines) == 2 and "Traceback" in lines[0] and lines[1].startswith("ALARM stations.registry")
            )
            mocker.stop(failing)
            async with asyncio.timeout(60):
                while alarms.get("stations.registry") is not None:
                    await asyncio.sleep(0.05)
