"""OCSP under load never starves issuance: the responder signs behind certificates on the PKCS#11 thread, with a
bounded number of signatures queued, and each network client has a budget of fresh signatures; over it, a nonce
request gets the pre-produced answer without its nonce (RFC 5019 2.2.1) and openssl still verifies it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509 import ocsp

from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.production.policy import WorkOrderPolicy
from appliance.profiles import builtin_profiles
from appliance.va import ocsp_batches
from appliance.va.http import VaServer, make_app
from appliance.va.ocsp import OcspResponder
from appliance.va.ocsp_batches import SIGN_BATCHES_IN_FLIGHT
from appliance.va.service import ValidationAuthority, VaSettings
from hsm.worker import Pkcs11Thread, Priority
from tests.appliance.conftest import make_csr
from tests.appliance.va.conftest import Va
from tests.appliance.va.test_openssl import Files, ocsp_query

S = ocsp.OCSPResponseStatus
C = ocsp.OCSPCertStatus
GUARD_S = 60  # deadlock guard only
A, B = "192.0.2.10", "192.0.2.20"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + GUARD_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached (deadlock guard)"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def hold(thread: Pkcs11Thread) -> AsyncIterator[Future[None]]:
    """The PKCS#11 thread busy with a call of the test's own until the block ends: what is sent to the HSM
    meanwhile queues behind it. Yields that call's future, to be waited for after the block."""
    held, release = threading.Event(), threading.Event()

    def busy() -> None:
        held.set()
        release.wait(GUARD_S)

    gate = thread.submit(busy)
    await asyncio.to_thread(held.wait, GUARD_S)
    try:
        yield gate
    finally:
        release.set()


def nonce_of(der: bytes) -> bytes | None:
    resp = ocsp.load_der_ocsp_response(der)
    try:
        return resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
    except x509.ExtensionNotFound:
        return None


async def test_each_client_has_a_budget_of_fresh_signatures(va: Va) -> None:
    clock = Clock()
    responder = OcspResponder(
        va.journal, va.token, va.audit, client_rate=1.0, client_burst=3, limit_clock=clock
    )
    await asyncio.to_thread(responder.load)
    plain = va.request("SN-0001")
    cached = (await responder.aanswer(plain, A)).der  # a miss: one token, and the answer is cached
    for i in range(2):  # two nonce answers, signed fresh: the burst is spent
        nonce = bytes([i]) * 16
        assert nonce_of((await responder.aanswer(va.request("SN-0001", nonce=nonce), A)).der) == nonce
    assert responder.signed == 3
    # over budget: the pre-produced answer, without the nonce (no signature) ...
    over = await responder.aanswer(va.request("SN-0001", nonce=b"n" * 16), A)
    assert over.der == cached and nonce_of(over.der) is None and responder.nonce_dropped == 1
    # ... or tryLater when nothing is cached for that certificate
    assert (await responder.aanswer(va.request("SN-0002", nonce=b"n" * 16), A)).status == S.TRY_LATER
    assert (await responder.aanswer(va.request("SN-0003"), A)).status == S.TRY_LATER  # a miss costs too
    assert (await responder.aanswer(plain, A)).der == cached  # cache hits are free
    assert responder.signed == 3 and responder.throttled == 3
    # another client is unaffected, and the budget comes back at its rate
    assert nonce_of((await responder.aanswer(va.request("SN-0002", nonce=b"b" * 16), B)).der) == b"b" * 16
    clock.now += 1.0
    assert nonce_of((await responder.aanswer(va.request("SN-0002", nonce=b"c" * 16), A)).der) == b"c" * 16
    # in-process callers (the CLI, this process) are not limited
    for i in range(5):
        assert nonce_of(responder.respond(va.request("SN-0004", nonce=bytes([i]) * 8))) == bytes([i]) * 8


async def test_all_clients_together_have_a_budget(va: Va) -> None:
    clock = Clock()
    responder = OcspResponder(
        va.journal, va.token, va.audit, client_rate=100, client_burst=100, total_rate=2, limit_clock=clock
    )
    await asyncio.to_thread(responder.load)
    answers = [
        await responder.aanswer(va.request("SN-0001", nonce=b"x" * 16), f"10.0.0.{i}") for i in range(4)
    ]
    assert [a.status for a in answers] == [S.SUCCESSFUL, S.SUCCESSFUL, S.TRY_LATER, S.TRY_LATER]


async def test_at_most_max_inflight_signatures_wait_for_the_hsm(va: Va) -> None:
    responder = OcspResponder(va.journal, va.token, va.audit, max_inflight_signs=2)
    await asyncio.to_thread(responder.load)
    thread = va.token.thread
    async with hold(thread) as gate:
        tasks = [
            asyncio.ensure_future(responder.aanswer(va.request("SN-0001", nonce=bytes([i]) * 16)))
            for i in range(6)
        ]
        # Two signatures under way, at the held HSM thread in one or two sign_many calls (SIGN_BATCHES_IN_FLIGHT:
        # how the two requests fall into batches depends on when each finished its journal lookup) ...
        await until(lambda: responder._signing_now == 2 and thread.pending() >= 1)
        await until(lambda: responder._pending == 6)  # ... four more wait their turn in the responder
        assert responder._signing_now == 2 and 1 <= thread.pending() <= SIGN_BATCHES_IN_FLIGHT
    answers = await asyncio.gather(*tasks)
    gate.result(GUARD_S)
    assert [nonce_of(a.der) for a in answers] == [bytes([i]) * 16 for i in range(6)]
    assert responder.peak_signing == 2


async def test_a_certificate_is_signed_before_queued_ocsp_answers(
    va: Va, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The HSM thread held; OCSP nonce answers queue for it, then a device's certificate does. On release the
    certificate's signature is made first: the OCSP answers never sit between issuance and the HSM."""
    # One OCSP batch at the HSM at a time, so that the count of calls queued there says when the certificate's
    # joined them (with two, a second OCSP batch could arrive in its place; the order tested is the same).
    monkeypatch.setattr(ocsp_batches, "SIGN_BATCHES_IN_FLIGHT", 1)
    responder = OcspResponder(va.journal, va.token, va.audit, max_inflight_signs=4)
    await asyncio.to_thread(responder.load)
    issuing_key = va.token.get_key(va.issuing.key_label)
    service = IssueService(
        va.journal, va.issuing, issuing_key, dict(builtin_profiles()),
        policy=WorkOrderPolicy("issuing"), audit=va.audit,
    )  # fmt: skip
    thread = va.token.thread
    validation_before = thread.served[Priority.VALIDATION]
    seen_when_certificate_signed: list[int] = []
    async with service:
        async with hold(thread) as gate:
            answers = [
                asyncio.ensure_future(responder.aanswer(va.request("SN-0001", nonce=bytes([i]) * 16)))
                for i in range(4)
            ]
            # OCSP signatures queued at the HSM (in one or more sign_many batches)
            await until(lambda: responder._signing_now == 4 and thread.pending() >= 1)
            queued = thread.pending()
            issued = asyncio.ensure_future(
                service.issue(IssueRequest("SN-0050", make_csr("SN-0050")[1], station="fixture-1"))
            )
            await until(lambda: thread.pending() == queued + 1)
            # right behind the certificate in the signing lane: runs after it, before any OCSP answer
            probe = thread.submit(
                lambda: seen_when_certificate_signed.append(thread.served[Priority.VALIDATION])
            )
        result = await issued
        await asyncio.gather(*answers)
    gate.result(GUARD_S)
    probe.result(GUARD_S)
    assert seen_when_certificate_signed == [validation_before]
    assert validation_before + 1 <= thread.served[Priority.VALIDATION] <= validation_before + 4
    assert responder.signed == 4
    x509.load_der_x509_certificate(result.certificate).verify_directly_issued_by(va.issuing.certificate)


async def test_hsm_busy_with_certificates_gets_try_later_and_no_alarm(
    va: Va, caplog: pytest.LogCaptureFixture
) -> None:
    responder = OcspResponder(va.journal, va.token, va.audit, sign_wait_s=0.0)
    await asyncio.to_thread(responder.load)
    thread = va.token.thread
    async with hold(thread) as gate:
        answer = await responder.aanswer(va.request("SN-0001", nonce=b"z" * 16))
    gate.result(GUARD_S)
    assert answer.status == S.TRY_LATER and responder.busy == 1 and responder.errors == 0
    assert not [r for r in caplog.records if r.levelno >= 30]  # busy is no fault: nothing logged above INFO


@pytest.fixture
async def tight(va: Va, tmp_path: Path) -> AsyncIterator[tuple[ValidationAuthority, str, Files]]:
    root = tmp_path / "root.pem"
    root.write_bytes(va.root.certificate.public_bytes(serialization.Encoding.PEM))
    issuing = tmp_path / "issuing.pem"
    issuing.write_bytes(va.issuing.certificate.public_bytes(serialization.Encoding.PEM))
    settings = VaSettings(poll_s=0.05, sign_rate_per_client=0.001, sign_burst_per_client=1)
    authority = ValidationAuthority(va.journal, va.token, va.audit, settings)
    async with authority, VaServer(make_app(authority), "127.0.0.1", 0) as srv:
        yield authority, srv.url, Files(root, issuing, tmp_path)


async def test_openssl_verifies_the_answer_without_its_nonce(
    va: Va, tight: tuple[ValidationAuthority, str, Files]
) -> None:
    authority, url, files = tight
    good = files.cert("good", va.cert("SN-0001"))
    rc, out = await ocsp_query(url, files, good, "-no_nonce")  # the one fresh signature 127.0.0.1 may cause
    assert rc == 0 and f"{good}: good" in out, out
    for _ in range(3):
        rc, out = await ocsp_query(url, files, good, "-nonce")
        assert rc == 0 and "Response verify OK" in out and f"{good}: good" in out, out
        assert "WARNING: no nonce in response" in out, out
    assert authority.responder.signed == 1 and authority.responder.nonce_dropped == 3
    other = files.cert("other", va.cert("SN-0003"))
    rc, out = await ocsp_query(url, files, other, "-nonce")  # nothing cached for it: try later
    assert rc != 0 and "Responder Error: trylater (3)" in out, out


async def test_a_client_faster_than_its_request_rate_is_held_back_then_tarpitted(va: Va) -> None:
    clock = Clock()
    responder = OcspResponder(
        va.journal, va.token, va.audit, request_rate=100, request_burst=1, pace_max_delay_s=0.05,
        limit_clock=clock,
    )  # fmt: skip
    assert await responder.admit(A)  # within the rate: at once
    assert await responder.admit(A) and responder.paced == 1  # 10 ms early: held until within it
    for _ in range(10):  # 20 ms, 30 ms ... early: beyond the 50 ms it may be held, held 50 ms and refused
        await responder.admit(A)
    assert responder.tarpitted >= 6 and responder.paced <= 5
    assert await responder.admit(B) and responder.paced + responder.tarpitted == 11  # B has its own rate


@pytest.fixture
async def paced(va: Va) -> AsyncIterator[tuple[ValidationAuthority, str]]:
    settings = VaSettings(request_rate_per_client=0.001, request_burst_per_client=2, pace_max_delay_s=0.01)
    authority = ValidationAuthority(va.journal, va.token, va.audit, settings)
    async with authority, VaServer(make_app(authority), "127.0.0.1", 0) as srv:
        yield authority, srv.url


async def test_the_http_listener_paces_every_ocsp_request(
    va: Va, paced: tuple[ValidationAuthority, str]
) -> None:
    import aiohttp

    authority, url = paced
    body = va.request("SN-0001")
    statuses = []
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(
                url + "/ocsp", data=body, headers={"Content-Type": "application/ocsp-request"}
            ) as r:
                statuses.append(ocsp.load_der_ocsp_response(await r.read()).response_status)
        async with s.post(
            url + "/ocsp", data=b"garbage", headers={"Content-Type": "application/ocsp-request"}
        ) as r:
            statuses.append(ocsp.load_der_ocsp_response(await r.read()).response_status)
        # a forwarded-for header names someone else: not believed, the TCP peer is charged
        async with s.get(url + "/ocsp/MAA=", headers={"X-Forwarded-For": "198.51.100.7"}) as r:
            statuses.append(ocsp.load_der_ocsp_response(await r.read()).response_status)
    # two within the burst; then even a malformed body or GET is held and refused before any work is done
    assert statuses == [S.SUCCESSFUL, S.SUCCESSFUL, S.TRY_LATER, S.TRY_LATER]
    assert authority.responder.tarpitted == 2 and authority.responder.refused == {}


async def test_crl_fetches_are_paced_like_ocsp_requests(paced: tuple[ValidationAuthority, str]) -> None:
    """A CRL GET costs little, but a flood of them from one address cost half of issuance: each is paced to
    the client's request rate (the same budget as its OCSP requests); far over it, held and answered 503."""
    import aiohttp

    authority, url = paced
    statuses = []
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.get(url + "/crl/issuing.crl") as r:
                statuses.append((r.status, r.headers.get("Retry-After"), len(await r.read()) > 0))
        async with s.post(
            url + "/ocsp", data=b"garbage", headers={"Content-Type": "application/ocsp-request"}
        ) as r:  # one budget for both
            assert ocsp.load_der_ocsp_response(await r.read()).response_status == S.TRY_LATER
    assert statuses == [(200, None, True), (200, None, True), (503, "1", True), (503, "1", True)]
    assert authority.responder.tarpitted == 3


def test_config_keys_reach_the_responder(tmp_path: Path) -> None:
    from appliance.config import parse_config
    from appliance.errors import ConfigError

    base = {"hsm": {"module": "m", "token_label": "t", "pin_file": "p"}}
    keys = {
        "max_inflight_signs": 2, "sign_wait_s": 0.5, "sign_rate_per_client": 5, "sign_burst_per_client": 7,
        "sign_rate_total": 50, "request_rate_per_client": 30, "request_burst_per_client": 60,
        "pace_max_delay_s": 2, "clients_max": 100,
    }  # fmt: skip
    settings = parse_config({**base, "va": keys}, base_dir=tmp_path).va.settings
    assert {k: getattr(settings, k) for k in keys} == keys
    defaults = parse_config(base, base_dir=tmp_path).va.settings
    assert (defaults.sign_rate_per_client, defaults.request_rate_per_client, defaults.max_inflight_signs) == (
        50, 200, 4,
    )  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "va": {"max_inflight_signs": 0, "sign_rate_per_client": -1, "clients_max": 1}})
    assert {p.where for p in info.value.problems} == {
        "va.max_inflight_signs", "va.sign_rate_per_client", "va.clients_max",
    }  # fmt: skip
    documented = (Path(__file__).parents[3] / "docs" / "configuration.md").read_text()
    for key in keys:
        assert f"| `{key}` |" in documented, key


async def test_the_requests_of_a_signing_batch_share_one_journal_lookup_and_keep_their_own_status(
    va: Va, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Nonce requests that queue while a batch is at the HSM are looked up in one call to the journal thread (one
    per request cost the event loop more than the lookups), and each answer still states its own certificate's
    status and carries its own nonce."""
    from appliance.va import revocation as rv

    monkeypatch.setattr(ocsp_batches, "SIGN_BATCHES_IN_FLIGHT", 1)
    rv.revoke(va.journal, va.audit, va.supervisor, device_serial="SN-0002", reason="keyCompromise")
    responder = OcspResponder(va.journal, va.token, va.audit, max_inflight_signs=16, sign_wait_s=GUARD_S)
    await asyncio.to_thread(responder.load)
    calls: list[str] = []
    acall = va.journal.acall

    async def counted(fn: Callable[..., object], *args: object) -> object:
        calls.append(getattr(fn, "__qualname__", repr(fn)))
        return await acall(fn, *args)

    monkeypatch.setattr(va.journal, "acall", counted)  # instrumentation: the real call, counted
    wanted: list[tuple[str | x509.Certificate, ocsp.OCSPCertStatus]] = [
        ("SN-0001", C.GOOD), ("SN-0002", C.REVOKED), (va.rogue_cert(0x7E57), C.UNKNOWN),
    ] * 3  # fmt: skip
    thread = va.token.thread
    async with hold(thread) as gate:
        first = asyncio.ensure_future(responder.aanswer(va.request("SN-0003", nonce=b"\xff" * 16)))
        await until(lambda: thread.pending() == 1)  # its batch of one is at the held HSM
        rest = [
            asyncio.ensure_future(responder.aanswer(va.request(cert, nonce=bytes([i]) * 16)))
            for i, (cert, _) in enumerate(wanted)
        ]
        await until(lambda: len(responder._to_sign) == len(wanted))
    answers = await asyncio.gather(first, *rest)
    gate.result(GUARD_S)
    assert responder.signed == 1 + len(wanted)
    assert len(calls) == 2, calls  # the first batch's lookup, then one for the nine queued behind it
    for i, ((_, status), answer) in enumerate(zip(wanted, answers[1:], strict=True)):
        parsed = ocsp.load_der_ocsp_response(answer.der)
        assert parsed.certificate_status == status and nonce_of(answer.der) == bytes([i]) * 16


async def test_a_signing_batch_takes_at_most_its_share_so_the_next_is_signed_while_it_is_verified(
    va: Va,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    """A batch that took every queued request would leave nothing for the next one to sign while it is
    verified (the HSM idled half the time: bench/ocsp.py). With 8 signatures allowed in flight and two batches,
    each takes at most 4, and two sign_many calls wait at the HSM at once."""
    from hsm.keys import _HsmKey

    responder = OcspResponder(va.journal, va.token, va.audit, max_inflight_signs=8, sign_wait_s=GUARD_S)
    await asyncio.to_thread(responder.load)
    cap = 8 // SIGN_BATCHES_IN_FLIGHT
    sizes: list[int] = []
    real = _HsmKey.asign_many

    async def recorded(self: _HsmKey, items: list[bytes]) -> list[bytes]:
        sizes.append(len(items))
        return await real(self, items)

    mocker.patch.object(_HsmKey, "asign_many", recorded)  # instrumentation: the real call, its size recorded
    thread = va.token.thread
    async with hold(thread) as gate:
        tasks = [
            asyncio.ensure_future(responder.aanswer(va.request("SN-0001", nonce=bytes([i]) * 16)))
            for i in range(8)
        ]
        await until(lambda: thread.pending() == SIGN_BATCHES_IN_FLIGHT)
    answers = await asyncio.gather(*tasks)
    gate.result(GUARD_S)
    assert [nonce_of(a.der) for a in answers] == [bytes([i]) * 16 for i in range(8)]
    assert sum(sizes) == 8 and max(sizes) <= cap, sizes


async def test_a_request_given_up_while_queued_is_neither_looked_up_nor_signed(va: Va) -> None:
    """A nonce request whose task is cancelled (its client gone) while it waits for a batch leaves the queue:
    the batch is made of the others."""
    responder = OcspResponder(va.journal, va.token, va.audit, max_inflight_signs=8, sign_wait_s=GUARD_S)
    await asyncio.to_thread(responder.load)
    thread = va.token.thread
    async with hold(thread) as gate:
        first = asyncio.ensure_future(responder.aanswer(va.request("SN-0001", nonce=b"\x01" * 16)))
        await until(lambda: thread.pending() == 1)
        second = asyncio.ensure_future(responder.aanswer(va.request("SN-0001", nonce=b"\x02" * 16)))
        await until(lambda: thread.pending() == SIGN_BATCHES_IN_FLIGHT)  # both batches at the held HSM
        rest = [
            asyncio.ensure_future(responder.aanswer(va.request("SN-0001", nonce=bytes([i]) * 16)))
            for i in range(3, 7)
        ]
        await until(lambda: len(responder._to_sign) == len(rest))
        for task in rest[:3]:
            task.cancel()
        await asyncio.gather(*rest[:3], return_exceptions=True)
    answers = await asyncio.gather(first, second, rest[3])
    gate.result(GUARD_S)
    assert [nonce_of(a.der) for a in answers] == [b"\x01" * 16, b"\x02" * 16, b"\x06" * 16]
    assert responder.signed == 3  # the three cancelled requests cost no signature
