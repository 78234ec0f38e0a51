"""The upstream forwarder against a second Birthline instance acting as the upstream CA (its CMP server on
127.0.0.1, label with allow_nested and accept_ra_verified trusting this appliance's RA), over the real issuance
core on both sides (SoftHSM token, journals, work-order policy)."""

from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.cmp.forwarder import DUE_SQL, Forwarder, HttpTransport, queue_status
from appliance.cmp.model import PKIMessage
from appliance.cmp.protection import SignatureProtector
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.va.revocation import Reason, Source, revoke_in_transaction
from tests.appliance.cmp.upstream_support import (
    SPKI,
    Local,
    Upstream,
    device_csr,
    forwarder,
    netns_ok,
    settings,
)


async def issue(local: Local, serials: list[str]) -> dict[str, bytes]:
    keys = {}
    for s in serials:
        key, csr = device_csr(s)
        await local.service.issue(IssueRequest(s, csr, "fixture-1"))
        keys[s] = key.public_key().public_bytes(*SPKI)
    return keys


def outbox(journal: Journal) -> list[tuple[object, ...]]:
    return journal.call(
        lambda: journal.conn.execute(
            "SELECT kind, state, transaction_id, request_der, upstream_cert_der, attempts, last_error, cert_serial"
            " FROM outbox ORDER BY id"
        ).fetchall()
    )


async def test_issuance_writes_its_outbox_row_in_the_same_transaction(local: Local) -> None:
    await issue(local, ["SN-0001"])
    key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*SPKI)
    await local.service.issue(IssueRequest("SN-0002", b"", "fixture-1", public_key_der=key))
    rows = outbox(local.journal)
    assert [(r[0], r[1], len(bytes(r[2])), r[3]) for r in rows] == [("p10cr", "queued", 16, None),
                                                                    ("cr", "queued", 16, None)]  # fmt: skip
    issued = local.journal.rows("state='issued'")
    assert {r.cert_serial for r in issued} == {r[7] for r in rows}


async def test_batched_forwarding_to_a_second_birthline(local: Local, upstream: Upstream) -> None:
    keys = await issue(local, [f"SN-00{i:02d}" for i in range(1, 6)])
    cr_key = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(*SPKI)
    await local.service.issue(IssueRequest("SN-0010", b"", "fixture-1", public_key_der=cr_key))
    keys["SN-0010"] = cr_key
    fwd = forwarder(local, upstream)
    try:
        assert await fwd.drain(timeout_s=30)
    finally:
        await fwd.close()
    rows = outbox(local.journal)
    assert {r[1] for r in rows} == {"done"} and len(rows) == 6
    assert fwd.stats["messages"] == 2  # one nested request batch, one nested certConf batch
    for r in rows:
        cert = x509.load_der_x509_certificate(bytes(r[4]))  # type: ignore[arg-type]
        serial = cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value
        assert cert.public_key().public_bytes(*SPKI) == keys[str(serial)]
    issued = upstream.issued()
    assert len(issued) == 6 and {tid for tid, _ in issued} == {
        f"cmp:ra:{bytes(r[2]).hex()}"  # type: ignore[arg-type]
        for r in rows
    }
    assert upstream.responder.stats["confirmed"] == 6
    # The upstream gave the nested batch to its core as one batch (one group commit), not request by request.
    assert upstream.responder.service.stats["batches"] == 1, upstream.responder.service.stats

    # A revocation goes upstream as rr, for the upstream's certificate of the device.
    serial = str(rows[0][7])

    def revoke(conn: sqlite3.Connection) -> None:
        revoke_in_transaction(conn, local.audit, "alice", [(serial, "issuing", "SN-0001")],
                              Reason.KEY_COMPROMISE, Source.CLI, now=time.time())  # fmt: skip

    local.journal.call(local.journal.transaction, revoke, "test revoke")
    fwd = forwarder(local, upstream)
    try:
        assert await fwd.drain(timeout_s=30)
    finally:
        await fwd.close()
    up_serial = format(x509.load_der_x509_certificate(bytes(rows[0][4])).serial_number, "x")  # type: ignore[arg-type]
    got = upstream.journal.call(lambda: upstream.journal.conn.execute(
        "SELECT reason, source FROM revocation WHERE cert_serial=?", (up_serial,)).fetchone())  # fmt: skip
    assert tuple(got) == ("keyCompromise", "cmp")
    fwd_at = local.journal.call(lambda: local.journal.conn.execute(
        "SELECT forwarded_at FROM revocation WHERE cert_serial=?", (serial,)).fetchone()[0])  # fmt: skip
    assert fwd_at is not None


async def test_upstream_down_then_back_nothing_lost_nothing_twice(local: Local, upstream: Upstream) -> None:
    await issue(local, ["SN-0001", "SN-0002", "SN-0003"])
    dead = "http://127.0.0.1:9/.well-known/cmp/p/ra"  # discard port: connection refused
    offset = [0.0]
    fwd = Forwarder(local.journal, settings(dead), local.ra, server_certs=(upstream.ra.certificate,),
                    clock=lambda: time.time() + offset[0])  # fmt: skip
    try:
        result = await fwd.run_pass(force=True)
        assert result.retried == 3 and result.done == 0
        first = outbox(local.journal)
        assert {r[1] for r in first} == {"sent"} and all(r[3] is not None and r[5] == 1 for r in first)
        assert "unreachable" in str(first[0][6])
        assert (await fwd.run_pass(force=True)).sent_messages == 0  # backoff: nothing due yet
        assert upstream.issued() == []
    finally:
        await fwd.close()
    # back: the same bytes and transactionIDs go, once
    fwd = Forwarder(local.journal, settings(upstream.url), local.ra, server_certs=(upstream.ra.certificate,),
                    clock=lambda: time.time() + 60)  # fmt: skip
    try:
        assert await fwd.drain(timeout_s=30)
    finally:
        await fwd.close()
    after = outbox(local.journal)
    assert [(r[2], r[3]) for r in after] == [(r[2], r[3]) for r in first]
    assert {r[1] for r in after} == {"done"}
    assert len(upstream.issued()) == 3


class _Killed(Exception):
    """The forwarder process dies after the upstream got the batch, before the answer is recorded."""


class KillAfterSend:
    def __init__(self, url: str) -> None:
        self.http = HttpTransport(url, 5, 10)
        self.sent: list[bytes] = []

    async def post(self, der: bytes) -> bytes:
        self.sent.append(der)
        await self.http.post(der)
        await self.http.close()
        raise _Killed


class Recording:
    def __init__(self, url: str) -> None:
        self.http = HttpTransport(url, 5, 10)
        self.sent: list[bytes] = []

    async def post(self, der: bytes) -> bytes:
        self.sent.append(der)
        return await self.http.post(der)


async def test_restart_with_items_in_flight_resends_the_same_bytes(local: Local, upstream: Upstream) -> None:
    from appliance.cmp import parse_message

    await issue(local, ["SN-0001", "SN-0002", "SN-0003", "SN-0004"])
    killer = KillAfterSend(upstream.url)
    fwd = Forwarder(local.journal, settings(upstream.url), local.ra, server_certs=(upstream.ra.certificate,),
                    transport=killer)  # fmt: skip
    with pytest.raises(_Killed):
        await fwd.run_pass(force=True)
    assert len(upstream.issued()) == 4  # the upstream issued, we never heard
    in_flight = outbox(local.journal)
    assert {r[1] for r in in_flight} == {"sent"}
    rec = Recording(upstream.url)
    fwd = Forwarder(local.journal, settings(upstream.url), local.ra, server_certs=(upstream.ra.certificate,),
                    transport=rec)  # fmt: skip
    try:
        assert await fwd.drain(timeout_s=30)
    finally:
        await rec.http.close()
    first_inner = [i.der for i in parse_message(killer.sent[0]).body.items]  # type: ignore[union-attr]
    again_inner = [i.der for i in parse_message(rec.sent[0]).body.items]  # type: ignore[union-attr]
    assert first_inner == again_inner == [bytes(r[3]) for r in in_flight]  # type: ignore[arg-type]
    assert (
        parse_message(killer.sent[0]).header.transaction_id
        != parse_message(rec.sent[0]).header.transaction_id
    )
    assert {r[1] for r in outbox(local.journal)} == {"done"}
    assert len(upstream.issued()) == 4  # no duplicates upstream


async def test_single_mode_and_hard_limit_stops_issuance(local: Local, upstream: Upstream) -> None:
    await issue(local, ["SN-0001", "SN-0002"])
    fwd = forwarder(local, upstream, mode="single", hard_max_queue_size=2, max_queue_size=1)
    try:
        await fwd.refresh_load()
        assert fwd.admission() is not None
        local.service.admission = fwd.admission
        _key, csr = device_csr("SN-0003")
        with pytest.raises(IssuanceRefused) as info:
            await local.service.issue(IssueRequest("SN-0003", csr, "fixture-1"))
        assert info.value.code is ReasonCode.BUSY and "hard limit" in info.value.message
        assert await fwd.drain(timeout_s=30)
        assert fwd.stats["messages"] == 4  # p10cr + certConf per record
        assert fwd.admission() is None
        await local.service.issue(IssueRequest("SN-0003", csr, "fixture-1"))
    finally:
        await fwd.close()
    assert len(upstream.issued()) == 2


async def test_queue_age_limits_alarm_then_stop_issuance(local: Local, upstream: Upstream) -> None:
    """The upstream has been away for days (a clock moved forward): past max_queue_age_s an alarm, past
    hard_max_queue_age_s local issuance stops; nothing changes for a queue that is young."""
    await issue(local, ["SN-0001"])
    limits = {"max_queue_age_s": 3600.0, "hard_max_queue_age_s": 86400.0}
    for days, alarm, stopped in ((0, False, False), (0.5, True, False), (2, True, True)):
        later = time.time() + days * 86400
        fwd = Forwarder(local.journal, settings(upstream.url, **limits), local.ra,
                        server_certs=(upstream.ra.certificate,), clock=lambda later=later: later)  # fmt: skip
        await fwd.refresh_load()
        assert (fwd.admission() is not None) is stopped, (days, fwd.admission())
        status = queue_status(local.journal, settings(upstream.url, **limits), now=later)
        assert (status["alarm"], status["issuance_stopped"]) == (alarm, stopped), (days, status)
        await fwd.close()
    assert "oldest" in (fwd.admission() or "")


OPENSSL_CHILD = """
import asyncio, sys
from pathlib import Path
from appliance.cmp.forwarder import Forwarder
from appliance.cmp.protection import MacProtector
from appliance.config import UpstreamSection
from appliance.issuance.journal import Journal

async def main() -> int:
    with Journal(Path(sys.argv[1])) as journal:
        s = UpstreamSection(url="http://127.0.0.1:1700/pkix/", mode="single", protection="mac", kid="ref",
                            recipient="CN=mock", request_timeout_s=10, accept_sha1_mac=True)
        fwd = Forwarder(journal, s, MacProtector(b"mock secret", b"ref"), secret=b"mock secret")
        ok = await fwd.drain(once=True)
        await fwd.close()
        print(fwd.stats, journal.call(lambda: journal.conn.execute("SELECT last_error FROM outbox").fetchall()))
        return 0 if ok else 1

sys.exit(asyncio.run(main()))
"""


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
async def test_single_mode_to_the_openssl_mock_server_in_a_private_netns(
    local: Local, tmp_path: Path
) -> None:
    """`openssl cmp -port` listens on all interfaces: it and the forwarder run in their own network namespace."""
    import asyncio
    import os
    import sys

    from tests.appliance.cmp.support import MiniCa

    if not netns_ok():
        pytest.skip("unshare -n (a private network namespace) is not available here")
    key, csr = device_csr("SN-0042")
    await local.service.issue(IssueRequest("SN-0042", csr, "fixture-1"))
    mock_ca = MiniCa("Mock Upstream CA")
    rsp = mock_ca.issue(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0042")]), key.public_key())
    (tmp_path / "rsp.pem").write_bytes(rsp.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "child.py").write_text(OPENSSL_CHILD)
    journal_path = tmp_path / "journal.sqlite"
    script = (f"ip link set lo up; openssl cmp -config '' -port 1700 -srv_ref ref -srv_secret 'pass:mock secret' -mac hmacWithSHA256"
              f" -rsp_cert {tmp_path / 'rsp.pem'} >{tmp_path / 'mock.log'} 2>&1 & pid=$!; sleep 0.5;"
              f" {sys.executable} {tmp_path / 'child.py'} {journal_path}; rc=$?; kill $pid; wait $pid; exit $rc")  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[3])}
    # the journal is in WAL mode: the child process writes it while this process keeps it open (idle)
    proc = await asyncio.create_subprocess_exec("unshare", "-n", "sh", "-c", script, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, (out + err).decode() + (tmp_path / "mock.log").read_text()
    rows = outbox(local.journal)
    assert rows[0][1] == "done"
    assert bytes(rows[0][4]) == rsp.public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


# -- bad replies (reliability.md section 2): scripted answers built with the message layer ----------------------
class Scripted:
    """A transport that answers each request with what `answer(request)` makes of it."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.sent: list[bytes] = []

    async def post(self, der: bytes) -> bytes:
        self.sent.append(der)
        return self.answer(der)  # type: ignore[operator, no-any-return]


def _reply(der: bytes, up: SignatureProtector, *, mangle: str, key: ec.EllipticCurvePrivateKey) -> bytes:
    from appliance.cmp import (
        BodyType,
        CertRepBody,
        CertResponse,
        ErrorBody,
        FailInfo,
        PKIStatusInfo,
        build_message,
        parse_message,
        response_header,
    )
    from appliance.cmp.header import new_nonce, new_transaction_id
    from tests.appliance.cmp.support import MiniCa

    req = parse_message(der)
    header = response_header(req.header, sender=x509.DirectoryName(up.certificate.subject))
    if mangle == "tid":
        header = dataclasses.replace(header, transaction_id=new_transaction_id())
    if mangle == "nonce":
        header = dataclasses.replace(header, recip_nonce=new_nonce())
    if mangle == "unprotected-error":
        body = ErrorBody(PKIStatusInfo.rejection(FailInfo.BAD_REQUEST, "go away"))
        return build_message(header, BodyType.ERROR, body).der
    subject = x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-0001")])
    other = ec.generate_private_key(ec.SECP256R1())
    cert = MiniCa().issue(subject, (other if mangle == "key" else key).public_key())
    rsp = CertResponse(0, PKIStatusInfo.accepted(), None if mangle == "no-cert" else cert)
    return build_message(header, BodyType.CP, CertRepBody((rsp,)), protection=up).der


@pytest.mark.parametrize("mangle", ["tid", "nonce", "no-cert", "key", "unprotected-error"])
async def test_bad_replies_are_rejected_and_the_item_stays_retryable(
    local: Local, upstream: Upstream, mangle: str
) -> None:
    key, csr = device_csr("SN-0001")
    await local.service.issue(IssueRequest("SN-0001", csr, "fixture-1"))
    script = Scripted(lambda der: _reply(der, upstream.ra, mangle=mangle, key=key))
    fwd = Forwarder(local.journal, settings(upstream.url, mode="single"), local.ra,
                    server_certs=(upstream.ra.certificate,), transport=script)  # fmt: skip
    result = await fwd.run_pass(force=True)
    assert result.retried == 1 and result.done == 0 and result.failed == 0
    (row,) = outbox(local.journal)
    assert row[1] == "sent" and row[4] is None and "reply rejected" in str(row[6]), row
    # the retry goes to the real upstream with the same bytes, and succeeds
    fwd = Forwarder(local.journal, settings(upstream.url, mode="single"), local.ra,
                    server_certs=(upstream.ra.certificate,), clock=lambda: time.time() + 60)  # fmt: skip
    try:
        assert await fwd.drain(timeout_s=30)
    finally:
        await fwd.close()
    (after,) = outbox(local.journal)
    assert after[1] == "done" and after[3] == row[3] and script.sent[0] == row[3]


async def test_a_duplicate_answer_in_a_nested_reply_changes_nothing(local: Local, upstream: Upstream) -> None:
    from appliance.cmp import BodyType, NestedBody, NestedItem, build_message, parse_message, response_header

    await issue(local, ["SN-0001", "SN-0002"])
    real = Recording(upstream.url)

    async def post(der: bytes) -> bytes:
        reply = parse_message(await real.post(der))
        assert isinstance(reply.body, NestedBody)
        items = reply.body.items
        # the first inner answer twice (a duplicate), then the others
        body = NestedBody((items[0], NestedItem(items[0].der, items[0].message), *items[1:]))
        req = parse_message(der)
        header = response_header(req.header, sender=x509.DirectoryName(upstream.ra.certificate.subject))
        return build_message(header, BodyType.NESTED, body, protection=upstream.ra).der

    script = Scripted(None)
    script.post = post  # type: ignore[method-assign]
    fwd = Forwarder(local.journal, settings(upstream.url), local.ra, server_certs=(upstream.ra.certificate,),
                    transport=script)  # fmt: skip
    try:
        assert await fwd.drain(timeout_s=30)
    finally:
        await real.http.close()
    rows = outbox(local.journal)
    assert {r[1] for r in rows} == {"done"}
    certs = {bytes(r[4]) for r in rows}  # type: ignore[arg-type]
    assert len(certs) == 2 and len(upstream.issued()) == 2


@pytest.mark.parametrize("inner", ["broken signature, same signer", "another signer"])
async def test_inner_answers_are_verified_unless_the_nested_signature_covers_them(
    local: Local, upstream: Upstream, inner: str
) -> None:
    """The nested reply's signature is verified; an inner answer signed by that same certificate is covered by
    it (its exact bytes are signed) and its own signature is not verified again: even a broken one is taken, as
    the trusted upstream signed it. An inner answer by any other signer is verified on its own: here untrusted."""
    from appliance.cmp import BodyType, NestedBody, NestedItem, build_message, parse_message, response_header
    from appliance.cmp.build import with_protection
    from tests.appliance.cmp.support import MiniCa

    await issue(local, ["SN-0001", "SN-0002"])
    real = Recording(upstream.url)
    other = MiniCa("Another CA")
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_cert = other.issue(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Not the upstream")]),
                             other_key.public_key())  # fmt: skip
    impostor = SignatureProtector(other_key, other_cert)

    def replace(msg: PKIMessage) -> PKIMessage:
        if inner == "broken signature, same signer":
            assert msg.protection is not None
            return with_protection(msg, bytes(len(msg.protection)), msg.extra_certs)
        header = dataclasses.replace(msg.header, sender=x509.DirectoryName(other_cert.subject), sender_kid=None,
                                     protection_alg=None)  # fmt: skip
        return build_message(header, msg.body_type, msg.body, protection=impostor)

    async def post(der: bytes) -> bytes:
        reply = parse_message(await real.post(der))
        assert isinstance(reply.body, NestedBody)
        body = NestedBody(tuple(NestedItem(m.der, m) for m in map(replace, reply.body.messages)))
        req = parse_message(der)
        header = response_header(req.header, sender=x509.DirectoryName(upstream.ra.certificate.subject))
        return build_message(header, BodyType.NESTED, body, protection=upstream.ra).der

    script = Scripted(None)
    script.post = post  # type: ignore[method-assign]
    fwd = Forwarder(local.journal, settings(upstream.url), local.ra, server_certs=(upstream.ra.certificate,),
                    transport=script)  # fmt: skip
    try:
        result = await fwd.run_pass(force=True)
    finally:
        await real.http.close()
    rows = outbox(local.journal)
    if inner == "another signer":
        assert (result.done, result.retried) == (0, 2)
        assert {r[1] for r in rows} == {"sent"} and all("signer is not trusted" in str(r[6]) for r in rows), (
            rows
        )
    else:
        assert (result.done, result.retried) == (2, 0) and {r[1] for r in rows} == {"done"}, rows


def test_the_due_query_never_scans_the_done_rows(tmp_path: Path) -> None:
    """The outbox keeps every done row; the forwarder's query for due rows (every poll_s) must use the partial
    index of open rows, not walk the table."""
    with Journal(tmp_path / "journal.sqlite") as journal:
        plan = journal.call(
            lambda: journal.conn.execute("EXPLAIN QUERY PLAN " + DUE_SQL, (time.time(), 10)).fetchall()
        )
    details = [str(row[3]) for row in plan]
    assert any("outbox_open_by_id" in d for d in details), details
    assert not any(d == "SCAN o" for d in details), details
