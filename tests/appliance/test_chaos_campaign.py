"""bench/chaos.py in small: a real daemon (through the signature-logging launcher) killed at a named crash point and
at random while every client works, then the final round; no violation. Then the checks are shown to bite: a
signature the journal cannot account for, a certificate a client holds that the journal does not, and a
revocation acknowledged but absent are each reported."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import shutil
import traceback
from pathlib import Path

import pytest
from cryptography import x509

from bench.chaos import Campaign

pytestmark = [
    pytest.mark.slow,  # subprocess daemons and an upstream peer
    pytest.mark.skipif(
        not (shutil.which("openssl") and shutil.which("socat")), reason="openssl/socat missing"
    ),
]


def test_a_small_campaign_keeps_every_promise_and_its_checks_bite(tmp_path: Path) -> None:
    # In a process of its own: the campaign makes its own SoftHSM token, and SoftHSM reads SOFTHSM2_CONF only
    # when the library is first loaded, which an earlier test in this process may have done with its own.
    ctx = multiprocessing.get_context("spawn")
    outcome = ctx.Queue()
    child = ctx.Process(target=_campaign, args=(tmp_path, outcome))
    child.start()
    try:
        failure = outcome.get(timeout=1800)
    finally:
        child.join(60)
        if child.is_alive():
            child.kill()
    assert failure is None, failure


def _campaign(tmp_path: Path, outcome: multiprocessing.Queue[str | None]) -> None:
    try:
        _small_campaign(tmp_path)
    except BaseException:  # noqa: BLE001 - any failure, assertion or not, goes back to the test's process
        outcome.put(traceback.format_exc())
    else:
        outcome.put(None)


def _small_campaign(tmp_path: Path) -> None:
    c = Campaign(tmp_path, random.Random(3))

    async def scenario() -> None:
        c.setup()
        info = await c.start_peer()
        try:
            c.write_config(info)
            await c.round("after-sign")
            await c.round(None)
            await c.final_round()
            assert c.tally.violations == [], c.tally.violations
            assert c.tally.reached["after-sign"] == 1, "the daemon never reached the named crash point"
            assert c.last_kinds["certificate"] >= 3 and c.last_kinds["cmp protection"] > 0, c.last_kinds
            assert c.burned_signed >= 1, "the kill after signing left no burned-but-signed serial"

            # 1. an issuing-CA signature over a TBS the journal never recorded
            issuing = next(label for label, role in c.key_roles.items() if role == "issuing")
            with c.siglog.open("a") as f:
                f.write(json.dumps({"key": issuing, "mech": "ECDSA", "data": "00", "sig": "00", "kind": "cert",
                                    "msg": "ab" * 32}) + "\n")  # fmt: skip
            # 2. a certificate a client holds that is not the journal's
            dev = next(d for d in c.devices.values() if d.cert is not None)
            other = next(d for d in c.devices.values() if d.cert is not None and d is not dev)
            dev.cert = other.cert
            # 3. a revocation acknowledged to a client but not recorded
            c.revoke_acked.add("1234abcd")
            before = len(c.tally.violations)
            c.check()
            found = c.tally.violations[before:]
            assert any(v.startswith("signature: the issuing CA signed a certificate") for v in found), found
            assert any(v.startswith(f"received: {dev.serial}") for v in found), found
            assert any("1234abcd" in v for v in found), found
            assert x509.load_der_x509_certificate(other.cert or b"")
        finally:
            await c.stop_peer()
            if c.pty is not None:
                c.pty.stop()

    asyncio.run(scenario())
