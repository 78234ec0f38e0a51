"""Issue 10, item 1 as it was reported: over the station protocol, one station's ENROLL with a CSR of version 1
must be refused BAD_CSR, and every later ENROLL from every station must still issue (before the fix: INTERNAL
"BrokenProcessPool" for all of them until a restart). The real daemon: TLS on 127.0.0.1, SoftHSM token,
journal, the default prepare worker process."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from appliance.daemon import Daemon
from hsm.softhsm import SoftHsmToken
from stations.codes import Code
from stations.messages import Cert, Error
from stations.session import Authenticated
from tests.appliance.conftest import make_csr
from tests.appliance.test_daemon import _addr, _config, _enroll, add_lan
from tests.stations.station_link import Link


@pytest.fixture
async def appliance(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> AsyncIterator[Daemon]:
    async with Daemon(_config(tmp_path / "state", softhsm_token, production_journal_template)) as d:
        yield d


def _version_1(csr: bytes) -> bytes:
    at = csr.index(b"\x02\x01\x00")
    return csr[: at + 2] + b"\x01" + csr[at + 3 :]


async def test_a_version_1_csr_is_refused_and_every_station_still_enrols(
    appliance: Daemon, tmp_path: Path
) -> None:
    daemon = appliance
    assert daemon.config.issuance.prepare_workers > 0
    links = []
    for name in ("st-bad", "st-other"):
        link = await Link.tls(_addr(daemon), await add_lan(daemon, name, tmp_path))
        assert isinstance(await link.handshake(), Authenticated)
        links.append(link)
    bad, other = links
    refused = await _enroll(bad, "SN-V1", csr=_version_1(make_csr("SN-V1")[1]))
    assert isinstance(refused, Error) and refused.code == Code.BAD_CSR, refused
    for link, serial in ((other, "SN-AFTER-1"), (bad, "SN-AFTER-2"), (other, "SN-AFTER-3")):
        assert isinstance(await _enroll(link, serial), Cert)
    for link in links:
        await link.close()
