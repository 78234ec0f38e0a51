"""bench/chaos.py in small: a real daemon (through the signature-logging launcher) killed at a named crash point and
at random while every client works (stations, an RA-mode station, openssl cmp, the own CMP client on the local
and the RA label, EST, SCEP), then the final round; no violation, and every front end finished its devices. Then
the checks are shown to bite: a signature the journal cannot account for, a certificate a client holds that the
journal does not, a revocation acknowledged but absent, an RA device holding another's certificate, an RA
record duplicated in the outbox (it would go upstream twice), a certificate TBS signed twice, a truncated audit
log (tail and its checkpoints cut to an earlier, self-consistent state), and a daemon that dies while starting
without the armed crash point's marker are each reported."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import random
import shutil
import sqlite3
import traceback
from pathlib import Path

import pytest
from cryptography import x509

from bench.chaos import OWN_CMP, RA_STATION, Campaign

pytestmark = [
    pytest.mark.slow,  # subprocess daemons and an upstream peer
    pytest.mark.skipif(
        not (shutil.which("openssl") and shutil.which("socat") and shutil.which("scepclient")),
        reason="openssl/socat/scepclient (Debian package scep) missing",
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
            assert (
                c.last_kinds["certificate"] >= 3 and c.last_kinds["cmp protection (forwarder request)"] > 0
            ), c.last_kinds
            assert c.burned_signed >= 1, "the kill after signing left no burned-but-signed serial"
            # Every front end started devices, and the final round finished them all (else a violation above).
            for client in ("lan-0", "ser-0", "cmp", OWN_CMP, "est", "scep", RA_STATION):
                devices = [c.devices[s] for s in c.owned(client)]
                assert devices and all(d.cert is not None for d in devices), client
            assert c.ra_devices and set(c.last_ra) <= {"issued", "confirmed"}, c.last_ra
            assert c.last_forwarded["ra"] == sum(c.last_ra.values()) > 0, (c.last_forwarded, c.last_ra)
            assert c.last_kinds["scep answer"] > 0, c.last_kinds

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
            # 4. an RA device holding another RA device's certificate
            ra_held = [c.devices[s] for s in sorted(c.ra_devices) if c.devices[s].cert is not None]
            ra_dev = ra_held[0]
            ra_dev.cert = next((d.cert for d in ra_held[1:]), other.cert)
            # 5. an RA record duplicated in the outbox (the daemon is stopped: the journal is ours to write)
            journal = sqlite3.connect(c.journal_path)
            with journal:
                ra_id = journal.execute("SELECT MIN(ra_request_id) FROM outbox").fetchone()[0]
                journal.execute(
                    "INSERT INTO outbox (kind, ra_request_id, cert_serial, transaction_id, csr_der, public_key_der,"
                    " subject_der, next_attempt_at, created_at) SELECT kind, ra_request_id, cert_serial,"
                    " randomblob(16), csr_der, public_key_der, subject_der, next_attempt_at, created_at FROM outbox"
                    " WHERE ra_request_id=?", (ra_id,))  # fmt: skip
            journal.close()
            before = len(c.tally.violations)
            c.check()
            found = c.tally.violations[before:]
            assert any(v.startswith("signature: the issuing CA signed a certificate") for v in found), found
            assert any(v.startswith(f"received: {dev.serial}") for v in found), found
            assert any("1234abcd" in v for v in found), found
            assert any(v.startswith(f"received: {ra_dev.serial}'s certificate (RA mode)") for v in found), (
                found
            )
            assert f"outbox: 2 rows for ra_request {ra_id}" in found, found
            assert x509.load_der_x509_certificate(other.cert or b"")

            # 6. a certificate TBS the issuing CA signed twice (the second signature thrown away)
            cert_sig = next(s for s in c.signatures() if s["key"] == issuing and s["kind"] == "cert")
            with c.siglog.open("a") as f:
                f.write(json.dumps(cert_sig) + "\n")
            # 7. the audit log cut back to its second-to-last checkpoint claim: a log that verifies on its own
            journal = sqlite3.connect(c.journal_path)
            with journal:
                keep = journal.execute(
                    "SELECT seq FROM audit WHERE event='audit.checkpoint' ORDER BY seq DESC LIMIT 1 OFFSET 1"
                ).fetchone()[0]
                journal.execute("DROP TRIGGER audit_no_delete")
                journal.execute("DELETE FROM audit WHERE seq > ?", (keep,))
                journal.execute("DELETE FROM audit_checkpoint WHERE seq > ?", (keep,))
            journal.close()
            before = len(c.tally.violations)
            c.check()
            found = c.tally.violations[before:]
            assert f"signature: the issuing CA signed certificate TBS {cert_sig['msg']} 2 times" in found, (
                found
            )
            assert any(v.startswith("signature: ") and " certificate signatures for " in v for v in found), (
                found
            )
            assert any(v.startswith("audit: ") and "truncated" in v for v in found), found  # expected head
            assert any("for a claim the chain no longer holds" in v for v in found), found

            # 8. a daemon that dies while starting, not at the armed point (here: a configuration it rejects)
            c.config.write_text("[appliance\n")
            before = len(c.tally.violations)
            await c.round("after-intent")
            found = c.tally.violations[before:]
            assert len(found) == 1 and found[0].startswith("daemon: died while starting"), found
            assert "marker none" in found[0] and "daemon.log ends:" in found[0], found
            assert c.tally.reached["after-intent"] == 0, c.tally.reached
        finally:
            await c.stop_peer()
            if c.pty is not None:
                c.pty.stop()

    asyncio.run(scenario())
