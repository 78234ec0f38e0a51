"""The SCEP listener is bounded like every HTTP listener ([scep] max_connections_per_peer, header_timeout_s):
checked through the daemon, so that the section's limits are the ones served."""

from __future__ import annotations

import asyncio
import dataclasses
from pathlib import Path

from appliance.config import ScepLabelSection, ScepSection
from appliance.connections import HttpLimits
from appliance.daemon import Daemon
from hsm.softhsm import SoftHsmToken
from tests.appliance.scep.support import scep_config

LIMITS = HttpLimits(max_connections=8, max_connections_per_peer=2, header_timeout_s=1.0, body_timeout_s=5.0,
                    idle_timeout_s=5.0)  # fmt: skip


async def test_per_peer_cap_and_header_deadline(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    cfg = scep_config(softhsm_token, production_journal_template, tmp_path)
    section = ScepSection(
        listen="127.0.0.1:0", labels={"line1": ScepLabelSection(station="fixture-1")}, limits=LIMITS
    )
    async with Daemon(dataclasses.replace(cfg, scep=section)) as d:  # type: ignore[type-var]
        assert d.scep_server is not None
        host, port = d.scep_server.address[:2]
        held = [await asyncio.open_connection(host, port) for _ in range(2)]
        # A third connection from the same address: refused at once, 503 with Retry-After, closed.
        reader, writer = await asyncio.open_connection(host, port)
        answer = await asyncio.wait_for(reader.read(), 30)
        assert answer.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in answer, answer
        writer.close()
        # The two held connections never sent a request line: closed at header_timeout_s, without an answer.
        for r, w in held:
            assert await asyncio.wait_for(r.read(), 30) == b""
            w.close()
        # And the listener serves again.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /scep/line1?operation=GetCACaps HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 30)
        assert answer.startswith(b"HTTP/1.1 200") and b"SHA-256" in answer
        writer.close()
