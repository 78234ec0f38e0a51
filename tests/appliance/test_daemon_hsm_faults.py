"""PKCS#11 faults under the whole daemon (appliance.daemon.Daemon on the real SoftHSM token, stations over LAN
TLS, `birthline station-client` in a child process), injected by the fault wrapper (tests/p11_faults.py): a
corrupted signature and a device that reports CKR_DEVICE_REMOVED are refused with their codes and one alarm line,
and issuance resumes once they are gone (the scenario of test_silent_faults._fault); a lost session is recovered
without a refusal."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.daemon import Daemon
from hsm.softhsm import SoftHsmToken
from stations.codes import Code
from tests.appliance.test_daemon import _config, add_lan
from tests.appliance.test_silent_faults import _fault, _station_client
from tests.p11_faults import installed


@pytest.mark.parametrize(
    ("fault", "code", "cause"),
    [
        ("corrupt", Code.SIGNATURE_INVALID, "issuance.signature-invalid"),
        ("removed", Code.HSM_UNAVAILABLE, "issuance.hsm-unavailable"),
    ],
)
async def test_hsm_fault_under_the_daemon_is_refused_alarmed_and_cleared(
    softhsm_token: SoftHsmToken,
    production_journal_template: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    code: Code,
    cause: str,
) -> None:
    config = _config(tmp_path / "state", softhsm_token, production_journal_template)
    with installed() as faults:
        async with Daemon(config) as daemon:
            await _fault(
                daemon, tmp_path, caplog, code=code, cause=cause,
                inject=lambda: setattr(faults, fault, True), remove=lambda: setattr(faults, fault, False),
            )  # fmt: skip
            rows = daemon.journal.rows()
    burned = [r for r in rows if r.state == "burned"]
    assert burned and all(r.cert_der is None for r in burned)
    assert {r.device_serial for r in rows if r.state in ("issued", "confirmed")} == {"SN-BEFORE", "SN-AFTER"}


async def test_a_lost_session_under_the_daemon_is_recovered(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    config = _config(tmp_path / "state", softhsm_token, production_journal_template)
    with installed() as faults:
        async with Daemon(config) as daemon:
            assert daemon.core is not None
            bundle = await add_lan(daemon, "line1-st1", tmp_path)
            logins = faults.logins
            faults.session_lost = 1
            rc, err = await _station_client(daemon, bundle, "SN-LOST", tmp_path / "out", 60)
            assert rc == 0, err
            assert faults.session_lost == 0, "the fault was not hit"
            assert faults.logins == logins + 1
            assert daemon.core.alarms.active() == []
            assert {(r.device_serial, r.state) for r in daemon.journal.rows()} <= {
                ("SN-LOST", "issued"),
                ("SN-LOST", "confirmed"),
            }
