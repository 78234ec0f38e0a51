"""Issue 17 items 7 and 8: a second `birthline run` beside a running daemon. On the same state directory it is
refused by the daemon lock, naming the process that holds it; on another state with the same ports it says
which listener cannot bind and why. Each in a few lines, exit 2, no traceback."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.audit.log import AuditLog
from appliance.config import load_config
from appliance.daemon import Daemon
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.production import users
from appliance.production.users import Role, User
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import (
    PRODUCTION_PASSWORD,
    TEST_COST,
    daemon_state,
    make_csr,
    write_daemon_config,
)


def _run(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(config)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


async def test_a_second_daemon_is_refused_in_one_line(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    state = daemon_state(tmp_path / "state", production_journal_template)
    first = write_daemon_config(
        tmp_path / "first.toml", state, softhsm_token, lan="127.0.0.1:0", va="127.0.0.1:0"
    )
    async with Daemon(load_config(first)) as daemon:
        assert daemon.lan_address is not None and daemon.va_server is not None
        lan = "{}:{}".format(*daemon.lan_address)
        va = daemon.va_server.url.removeprefix("http://").split("/")[0]

        same_state = _run(first)
        assert same_state.returncode == 2
        err = same_state.stderr.strip().splitlines()
        assert "Traceback" not in same_state.stderr and len(err) <= 2, same_state.stderr
        assert err[-1].startswith("birthline: the daemon cannot start: the daemon `")
        assert f"(pid {os.getpid()}, since " in err[-1] and "stop that one first" in err[-1]

        other = daemon_state(tmp_path / "other", production_journal_template)
        same_ports = _run(write_daemon_config(tmp_path / "other.toml", other, softhsm_token, lan=lan, va=va))
        assert same_ports.returncode == 2
        err = same_ports.stderr.strip().splitlines()
        assert "Traceback" not in same_ports.stderr and len(err) <= 2, same_ports.stderr
        # The VA binds first; its key, its address and what to do.
        assert err[-1].startswith(f"birthline: [va] listen = '{va}' cannot be bound: the address is in use")
        assert "another Birthline daemon" in err[-1]


async def test_birthline_issue_beside_the_daemon_leaves_its_requests_in_flight_alone(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """`birthline issue` used to burn every intent it found when it started, as crash recovery, including the
    daemon's requests waiting for the HSM at that moment: the daemon then failed them ("intent vanished")."""
    state = daemon_state(tmp_path / "state", production_journal_template)
    with Journal(state / "journal.sqlite") as journal:
        audit = AuditLog(journal)
        users.add_user(journal, audit, User("alice", Role.ADMINISTRATOR), "sam", Role.SUPERVISOR,
                       PRODUCTION_PASSWORD, cost=TEST_COST)  # fmt: skip
    config = write_daemon_config(tmp_path / "c.toml", state, softhsm_token, lan="127.0.0.1:0", va="")
    async with Daemon(load_config(config)) as daemon:
        assert daemon.enroller is not None
        service = daemon.enroller.service
        release, signing = asyncio.Event(), asyncio.Event()
        real = service.key.asign_unverified

        async def slow_hsm(items: list[bytes]) -> list[bytes]:
            # The fault: an HSM slow enough that the request's intent is committed and waits here.
            signing.set()
            await release.wait()
            return await real(items)

        monkeypatch.setattr(service.key, "asign_unverified", slow_hsm)
        in_flight = asyncio.create_task(
            service.issue(IssueRequest("SN-0001", make_csr("SN-0001")[1], station="fixture-1"))
        )
        await asyncio.wait_for(signing.wait(), 60)
        monkeypatch.setattr(service.key, "asign_unverified", real)
        csr = tmp_path / "dev.csr"
        csr.write_bytes(make_csr("SN-0002")[1])
        try:
            by_hand = await asyncio.to_thread(
                subprocess.run,
                [sys.executable, "-m", "appliance.cli.main", "issue", "--station", "fixture-1", "--serial",
                 "SN-0002", "--csr", str(csr), "--out", str(tmp_path / "dev.pem"), "--user", "sam",
                 "--password-stdin", "--config", str(config)],
                input=f"{PRODUCTION_PASSWORD}\n", capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
        finally:
            release.set()  # else the daemon's shutdown would wait for the held request forever
        assert by_hand.returncode == 0, by_hand.stderr
        result = await asyncio.wait_for(in_flight, 60)
        assert result.device_serial == "SN-0001" and not result.reused
    with Journal(state / "journal.sqlite") as journal:
        states = dict(
            journal.call(lambda: journal.conn.execute("SELECT device_serial, state FROM issuance").fetchall())
        )
    assert states == {"SN-0001": "issued", "SN-0002": "issued"}
