"""The upstream forwarder's failures an operator must act on: the queue over its soft limit (the upstream does not
answer: a loopback port nothing listens on) and failed passes (the journal made immutable on ext4). Each raises
its alarm once, however many passes fail, and clears on the next success."""

from __future__ import annotations

import logging
import shutil
import socket
from pathlib import Path

import pytest

from appliance.alarms import Alarms
from appliance.audit import AuditLog
from appliance.cmp.forwarder import Forwarder
from appliance.issuance.journal import Journal
from hsm.token import Token
from tests.appliance.cmp.upstream_support import Local, Upstream, device_csr, settings
from tests.appliance.test_component_alarms import PASSES, lines, seen, until
from tests.real_faults import ext4_loop, set_immutable


def _dead_url() -> str:
    """A loopback port nothing listens on (connection refused), like an upstream that is down."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/.well-known/cmp/p/ra"


async def test_upstream_queue_over_its_soft_limit_alarms_once_and_clears_when_drained(
    local: Local, upstream: Upstream, caplog: pytest.LogCaptureFixture
) -> None:
    from appliance.issuance.policy import IssueRequest

    for serial in ("SN-0001", "SN-0002"):
        await local.service.issue(IssueRequest(serial, device_csr(serial)[1], "fixture-1"))
    alarms = Alarms()
    fwd = Forwarder(
        local.journal, settings(_dead_url(), max_queue_size=0, poll_s=0.01, backoff_base_s=0.01,
                                backoff_cap_s=0.02), local.ra,
        server_certs=(upstream.ra.certificate,), alarms=alarms,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        async with fwd:
            await until(lambda: fwd.stats["passes"] >= PASSES, "several passes")
            alarm = alarms.get("upstream.queue")
            assert alarm is not None and alarm.severity == "warning" and "2 record(s)" in alarm.message
            assert len(lines(caplog, "upstream.queue")) == 1
            fwd.transport.url = upstream.url  # type: ignore[attr-defined] - the link is back
            await until(lambda: alarms.get("upstream.queue") is None, "the drained queue cleared the alarm")
    assert len(upstream.issued()) == 2
    assert len(lines(caplog, "upstream.queue")) == 2


async def test_forwarder_passes_with_the_journal_immutable(
    production_journal_template: Path, hsm_token: Token, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from appliance import ca as ca_mod
    from appliance.cmp.ra import ensure_ra
    from appliance.issuance.policy import IssueRequest
    from appliance.issuance.service import IssueService
    from appliance.production.policy import WorkOrderPolicy
    from appliance.profiles import builtin_profiles

    with ext4_loop(tmp_path / "state") as state:
        path = state / "journal.sqlite"
        shutil.copy(production_journal_template, path)
        with Journal(path) as journal:
            issuing = ca_mod.load_ca(journal, "issuing")
            ra = ensure_ra(hsm_token, ca_mod.load_ca(journal, "management"), tmp_path / "ra.pem")
            service = IssueService(journal, issuing, hsm_token.get_key(issuing.key_label), dict(builtin_profiles()),
                                   policy=WorkOrderPolicy("issuing"), audit=AuditLog(journal))  # fmt: skip
            async with service:
                await service.issue(IssueRequest("SN-0001", device_csr("SN-0001")[1], "fixture-1"))
            alarms = Alarms()
            fwd = Forwarder(journal, settings(_dead_url(), poll_s=0.01), ra, alarms=alarms)
            with caplog.at_level(logging.WARNING):
                set_immutable(path, path.with_name("journal.sqlite-wal"))
                try:
                    async with fwd:
                        await until(seen(alarms, "upstream.forwarder"), "passes failed repeatedly")
                        alarm = alarms.get("upstream.forwarder")
                        assert alarm is not None and "journal unavailable" in alarm.message
                        assert len(lines(caplog, "upstream.forwarder")) == 1
                        set_immutable(path, path.with_name("journal.sqlite-wal"), on=False)
                        await until(lambda: alarms.get("upstream.forwarder") is None, "a pass completed")
                finally:
                    set_immutable(path, path.with_name("journal.sqlite-wal"), on=False)
    assert len(lines(caplog, "upstream.forwarder")) == 2
