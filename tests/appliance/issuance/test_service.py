"""The issuance pipeline against a real SoftHSM token and a real SQLite journal."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import shutil
import sqlite3
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

import hsm.keys
from appliance import ca as ca_mod
from appliance.ca import CaRecord
from appliance.errors import IssuanceFailed, IssuancePending, IssuanceRefused, ReasonCode
from appliance.issuance.finish import FINISH_HERE_MAX, share_here
from appliance.issuance.journal import Journal
from appliance.issuance.policy import Grant, IssueRequest
from appliance.issuance.service import IssueService
from appliance.issuance.workers import PreparePool
from appliance.profiles import Profile, builtin_profiles
from hsm.errors import DeviceError
from hsm.token import Token
from tests.appliance.conftest import make_csr
from tests.p11_faults import corrupting, flip_one_bit


def _service(journal: Journal, issuing: CaRecord, token: Token, **kw: object) -> IssueService:
    profiles: dict[str, Profile] = dict(builtin_profiles())
    return IssueService(journal, issuing, token.get_key(issuing.key_label), profiles, **kw)  # type: ignore[arg-type]


@pytest.fixture
async def service(journal: Journal, issuing: CaRecord, hsm_token: Token) -> AsyncIterator[IssueService]:
    async with _service(journal, issuing, hsm_token) as svc:
        yield svc


async def test_issued_certificate_chains_to_issuing_ca_and_is_journaled(
    service: IssueService, journal: Journal, issuing: CaRecord
) -> None:
    key, csr = make_csr()
    result = await service.issue(IssueRequest("SN-0001", csr, station="st1", request_id="r1"))
    cert = x509.load_der_x509_certificate(result.certificate)
    cert.verify_directly_issued_by(issuing.certificate)
    assert cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert result.chain[0] == issuing.cert_der and len(result.chain) == 2
    (row,) = journal.rows()
    assert row.state == "issued"
    assert row.cert_der == result.certificate
    assert row.cert_serial == format(cert.serial_number, "x")
    assert row.tbs_sha256 == hashlib.sha256(cert.tbs_certificate_bytes).digest()
    assert row.station == "st1" and row.request_id == "r1" and row.device_serial == "SN-0001"


async def test_serial_numbers_are_positive_random_and_at_least_64_bits(service: IssueService) -> None:
    results = await asyncio.gather(
        *(service.issue(IssueRequest(f"SN-{i}", make_csr()[1])) for i in range(20))
    )
    serials = [x509.load_der_x509_certificate(r.certificate).serial_number for r in results]
    assert len(set(serials)) == 20
    assert all(s >= 2**64 for s in serials)


async def test_a_request_without_an_id_gets_a_time_ordered_one(service: IssueService) -> None:
    """The ids the service makes itself are UUIDv7s (appliance/issuance/requestids.py): the journal's request-id
    index grows at its end."""
    import uuid

    from appliance.issuance.requestids import new_request_id

    before = new_request_id()
    await service.issue(IssueRequest("SN-NOID", make_csr()[1]))
    (row,) = service.journal.rows("device_serial=?", ("SN-NOID",))
    made = uuid.UUID(hex=row.request_id)
    assert made.version == 7 and made.variant == uuid.RFC_4122 and row.request_id == made.hex
    assert before[:12] <= row.request_id[:12] <= new_request_id()[:12]  # its millisecond, in order


async def test_retry_same_device_and_key_returns_stored_certificate_byte_for_byte(
    service: IssueService, journal: Journal
) -> None:
    key, csr = make_csr()
    first = await service.issue(IssueRequest("SN-RETRY", csr))
    _, csr_again = make_csr(key=key)  # a fresh CSR signature over the same key
    second = await service.issue(IssueRequest("SN-RETRY", csr_again))
    assert second.reused and not first.reused
    assert second.certificate == first.certificate
    assert len(journal.rows()) == 1


async def test_duplicate_in_one_batch_is_signed_once(service: IssueService, journal: Journal) -> None:
    _, csr = make_csr()
    a, b = await asyncio.gather(
        service.issue(IssueRequest("SN-DUP", csr)), service.issue(IssueRequest("SN-DUP", csr))
    )
    assert a.certificate == b.certificate
    assert sorted([a.reused, b.reused]) == [False, True]
    assert len(journal.rows()) == 1


async def test_different_key_for_issued_device_is_refused(service: IssueService) -> None:
    await service.issue(IssueRequest("SN-REWORK", make_csr()[1]))
    with pytest.raises(IssuanceRefused) as exc:
        await service.issue(IssueRequest("SN-REWORK", make_csr()[1]))
    assert exc.value.code == ReasonCode.DEVICE_ALREADY_ISSUED
    assert "rework" in exc.value.message


async def test_key_already_certified_for_another_device_is_refused(service: IssueService) -> None:
    key, csr = make_csr()
    await service.issue(IssueRequest("SN-A", csr))
    with pytest.raises(IssuanceRefused) as exc:
        await service.issue(IssueRequest("SN-B", make_csr(key=key)[1]))
    assert exc.value.code == ReasonCode.KEY_ALREADY_CERTIFIED


@pytest.mark.parametrize(
    ("serial", "csr", "code"),
    [
        ("SN-X", b"\x30\x03\x02\x01\x01", ReasonCode.BAD_CSR),
        ("SN-X", b"\x00" * 9000, ReasonCode.BAD_CSR),
        ("bad\x1b[31m", None, ReasonCode.BAD_DEVICE_SERIAL),
        ("", None, ReasonCode.BAD_DEVICE_SERIAL),
    ],
)
async def test_bad_requests_are_refused_and_nothing_is_journaled(
    service: IssueService, journal: Journal, serial: str, csr: bytes | None, code: ReasonCode
) -> None:
    with pytest.raises(IssuanceRefused) as exc:
        await service.issue(IssueRequest(serial, csr if csr is not None else make_csr()[1]))
    assert exc.value.code == code
    assert journal.rows() == []


async def test_bad_pop_is_refused(service: IssueService) -> None:
    _, csr = make_csr()
    tampered = csr[:-3] + bytes([csr[-3] ^ 0x01]) + csr[-2:]
    with pytest.raises(IssuanceRefused) as exc:
        await service.issue(IssueRequest("SN-POP", tampered))
    assert exc.value.code in (ReasonCode.BAD_POP, ReasonCode.BAD_CSR)


async def test_unknown_profile_is_refused(service: IssueService) -> None:
    with pytest.raises(IssuanceRefused) as exc:
        await service.issue(IssueRequest("SN-P", make_csr()[1], profile="nope"))
    assert exc.value.code == ReasonCode.UNKNOWN_PROFILE


async def test_one_refusal_does_not_spoil_its_batch(service: IssueService, journal: Journal) -> None:
    key, csr = make_csr()
    await service.issue(IssueRequest("SN-OWNER", csr))
    good = [service.issue(IssueRequest(f"SN-G{i}", make_csr()[1])) for i in range(5)]
    bad = service.issue(IssueRequest("SN-THIEF", make_csr(key=key)[1]))
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert all(not isinstance(r, BaseException) for r in results[:5])
    assert isinstance(results[5], IssuanceRefused)
    assert {r.device_serial for r in journal.rows()} == {"SN-OWNER", *(f"SN-G{i}" for i in range(5))}


async def test_requested_csr_extensions_are_ignored(service: IssueService) -> None:
    _, csr = make_csr(extensions=True)
    result = await service.issue(IssueRequest("SN-CA?", csr))
    cert = x509.load_der_x509_certificate(result.certificate)
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False


async def test_policy_refusal_rolls_back_and_policy_sees_the_transaction(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    class OnlyEven:
        def begin(self, conn: sqlite3.Connection) -> None:
            assert conn.in_transaction

        def authorise(self, conn: sqlite3.Connection, request: IssueRequest, profile: Profile) -> None:
            assert conn.in_transaction
            if int(request.device_serial[-1]) % 2:
                raise IssuanceRefused("odd devices are not on this work order", ReasonCode.NOT_AUTHORISED)

    async with _service(journal, issuing, hsm_token, policy=OnlyEven()) as svc:
        results = await asyncio.gather(
            *(svc.issue(IssueRequest(f"SN-{i}", make_csr()[1])) for i in range(4)), return_exceptions=True
        )
    assert [isinstance(r, IssuanceRefused) for r in results] == [False, True, False, True]
    assert all(r.code == ReasonCode.NOT_AUTHORISED for r in results if isinstance(r, IssuanceRefused))
    assert sorted(r.device_serial for r in journal.rows()) == ["SN-0", "SN-2"]


async def test_a_local_only_request_for_an_upstream_product_is_refused_and_nothing_is_queued(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    """EST serverkeygen keeps its key nowhere, so it cannot wait for an upstream CA: a product in RA mode refuses
    it (UNKNOWN_PROFILE) instead of recording a request for a key that is about to be lost."""

    class Upstream:
        def begin(self, conn: sqlite3.Connection) -> None:
            return None

        def authorise(self, conn: sqlite3.Connection, request: IssueRequest, profile: Profile) -> Grant:
            return Grant("upstream", "WO-RA")

    async with _service(journal, issuing, hsm_token, policy=Upstream(), upstream_retry_s=2.0) as svc:
        with pytest.raises(IssuanceRefused) as refused:
            await svc.issue(IssueRequest("SN-1", make_csr("SN-1")[1], local_only=True))
        assert refused.value.code is ReasonCode.UNKNOWN_PROFILE and "WO-RA" in refused.value.message
        queued = journal.call(lambda: journal.conn.execute(
            "SELECT (SELECT COUNT(*) FROM ra_request), (SELECT COUNT(*) FROM outbox)").fetchone())  # fmt: skip
        assert tuple(queued) == (0, 0)
        with pytest.raises(IssuancePending):  # the same request from a front end that can wait is forwarded
            await svc.issue(IssueRequest("SN-1", make_csr("SN-1")[1]))


async def test_clock_behind_last_issuance_refuses(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    async with _service(journal, issuing, hsm_token) as svc:
        await svc.issue(IssueRequest("SN-T1", make_csr()[1]))
    behind = time.time() - 3600
    async with _service(journal, issuing, hsm_token, clock=lambda: behind) as svc:
        with pytest.raises(IssuanceRefused) as exc:
            await svc.issue(IssueRequest("SN-T2", make_csr()[1]))
    assert exc.value.code == ReasonCode.CLOCK_NOT_TRUSTED


async def test_confirm_marks_delivery_and_checks_the_hash(service: IssueService, journal: Journal) -> None:
    result = await service.issue(IssueRequest("SN-C", make_csr()[1]))
    with pytest.raises(IssuanceRefused):
        await service.confirm(result.cert_serial, b"\x00" * 32)
    assert journal.rows()[0].state == "issued"
    await service.confirm(result.cert_serial, hashlib.sha256(result.certificate).digest())
    assert journal.rows()[0].state == "confirmed"


async def test_hsm_device_error_burns_intents_and_fails_closed(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    async with _service(journal, issuing, hsm_token) as svc:
        # The HSM device disappearing cannot be produced with SoftHSM; inject it at the key boundary (both
        # signing calls: the pipeline's and the health probe's).
        broken = mocker.patch.object(type(svc.key), "asign_many", side_effect=DeviceError("device removed"))
        broken_raw = mocker.patch.object(
            type(svc.key), "asign_unverified", side_effect=DeviceError("device removed")
        )
        with pytest.raises(IssuanceFailed) as exc:
            await svc.issue(IssueRequest("SN-H1", make_csr()[1]))
        assert exc.value.code == ReasonCode.HSM_UNAVAILABLE
        # Still broken: the next request is refused by the health probe, before any intent is written.
        with pytest.raises(IssuanceFailed):
            await svc.issue(IssueRequest("SN-H2", make_csr()[1]))
        rows = journal.rows()
        assert [(r.device_serial, r.state) for r in rows] == [("SN-H1", "burned")]
        mocker.stop(broken)
        mocker.stop(broken_raw)
        ok = await svc.issue(IssueRequest("SN-H1", make_csr()[1]))
    assert not ok.reused
    states = [(r.device_serial, r.state) for r in journal.rows()]
    assert states == [("SN-H1", "burned"), ("SN-H1", "issued")]
    serials = [r.cert_serial for r in journal.rows()]
    assert len(set(serials)) == 2


@pytest.mark.parametrize(
    ("workers", "count", "in_worker", "busy"),
    [
        (0, 1, False, False),
        (1, 1, False, False),
        (1, FINISH_HERE_MAX, False, False),
        (1, FINISH_HERE_MAX + 1, True, False),
        (1, FINISH_HERE_MAX + 6, True, True),
        (2, FINISH_HERE_MAX + 6, True, True),
    ],
)
async def test_unverifiable_signature_is_never_released(
    workers: int,
    count: int,
    in_worker: bool,
    busy: bool,
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    """Whichever process verifies a batch's signatures (a prepare worker for a batch larger than FINISH_HERE_MAX,
    else a thread of this process, or both at once when every worker is busy), a signature that does not verify
    is never released."""
    if busy:
        # "Every worker busy" depends on timing; the split it leads to is what is tested here.
        mocker.patch.object(PreparePool, "saturated", new_callable=mocker.PropertyMock, return_value=True)
    async with _service(journal, issuing, hsm_token, prepare_workers=workers, batch_max=16) as svc:
        # SoftHSM never returns a bad signature: one bit of every C_Sign output flipped. The service's own
        # verify (in the prepare worker, or on a thread without workers) must catch it.
        mocker.patch("hsm.keys.c_sign", side_effect=corrupting(hsm.keys.c_sign))
        to_workers = mocker.spy(PreparePool, "finish")
        outcomes = await asyncio.gather(
            *(svc.issue(IssueRequest(f"SN-V{i}", make_csr()[1])) for i in range(count)),
            return_exceptions=True,
        )
        assert svc.stats["batches"] == 1  # one batch of `count`: its size chose who verifies
    assert [o.code if isinstance(o, IssuanceFailed) else o for o in outcomes] == [
        ReasonCode.SIGNATURE_INVALID
    ] * count
    assert [(r.state, r.cert_der) for r in journal.rows()] == [("burned", None)] * count
    assert to_workers.call_count == (1 if in_worker else 0)
    if in_worker:  # the worker itself refused every signature (None each), not a fallback after it
        sent = count - (share_here(count, workers) if busy else 0)
        assert 0 < sent < count if busy else sent == count
        assert to_workers.spy_return == [None] * sent


async def test_a_bad_signature_in_the_share_checked_here_is_never_released(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    """With every worker busy, the tail of a batch is checked on a thread here: a bad signature there alone (the
    worker's part all good) still fails the whole batch and releases nothing."""
    count = 10
    assert share_here(count, 1) > 0  # the last request falls in the share checked here
    mocker.patch.object(PreparePool, "saturated", new_callable=mocker.PropertyMock, return_value=True)
    async with _service(journal, issuing, hsm_token, prepare_workers=1, batch_max=16) as svc:
        real, calls = hsm.keys.c_sign, itertools.count(1)

        def last_bad(*args: object, **kwargs: object) -> bytes:
            signature = real(*args, **kwargs)  # type: ignore[arg-type]
            return flip_one_bit(signature) if next(calls) == count else signature

        mocker.patch("hsm.keys.c_sign", side_effect=last_bad)
        to_workers = mocker.spy(PreparePool, "finish")
        outcomes = await asyncio.gather(
            *(svc.issue(IssueRequest(f"SN-T{i}", make_csr()[1])) for i in range(count)),
            return_exceptions=True,
        )
        assert svc.stats["batches"] == 1
    assert (
        to_workers.spy_return is not None and None not in to_workers.spy_return
    )  # the worker's part verified
    assert [o.code if isinstance(o, IssuanceFailed) else o for o in outcomes] == [
        ReasonCode.SIGNATURE_INVALID
    ] * count
    assert [(r.state, r.cert_der) for r in journal.rows()] == [("burned", None)] * count


async def test_journal_failure_while_storing_withholds_the_certificate(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    async with _service(journal, issuing, hsm_token) as svc:
        real = journal.transaction

        def failing(fn, doing):  # type: ignore[no-untyped-def]
            if doing == "storing certificates":
                raise IssuanceFailed(
                    "journal unavailable while storing: disk full", ReasonCode.JOURNAL_UNAVAILABLE
                )
            return real(fn, doing)

        mocker.patch.object(journal, "transaction", side_effect=failing)
        with pytest.raises(IssuanceFailed) as exc:
            await svc.issue(IssueRequest("SN-J", make_csr()[1]))
        assert exc.value.code == ReasonCode.JOURNAL_UNAVAILABLE
    rows = journal.rows()
    assert [(r.state, r.cert_der) for r in rows] == [("burned", None)]


async def test_disk_full_fails_closed_and_resumes(
    tmp_path: Path, ca_journal_template: Path, hsm_token: Token
) -> None:
    """SQLite's page cap gives the same SQLITE_FULL a full disk does, without mounting a filesystem."""
    path = tmp_path / "j.sqlite"
    shutil.copy(ca_journal_template, path)
    with Journal(path) as journal:
        issuing = ca_mod.load_ca(journal, "issuing")
        pages = journal.call(lambda: journal.conn.execute("PRAGMA page_count").fetchone()[0])
        async with _service(journal, issuing, hsm_token) as svc:
            journal.call(lambda: journal.conn.execute(f"PRAGMA max_page_count={pages + 2}"))
            outcomes = []
            for i in range(40):
                try:
                    await svc.issue(IssueRequest(f"SN-F{i}", make_csr()[1]))
                    outcomes.append("ok")
                except IssuanceFailed as exc:
                    assert exc.code == ReasonCode.JOURNAL_UNAVAILABLE
                    assert "full" in exc.message
                    outcomes.append("full")
            assert "full" in outcomes
            journal.call(lambda: journal.conn.execute("PRAGMA max_page_count=1073741823"))
            await svc.issue(IssueRequest("SN-AFTER", make_csr()[1]))
        assert journal.integrity_check() == "ok"
        issued = [r for r in journal.rows() if r.state == "issued"]
        assert all(r.cert_der for r in issued)
        assert outcomes.count("ok") + 1 == len(issued)


def test_issued_chain_passes_openssl_strict_verify(
    tmp_path: Path, journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    async def go() -> bytes:
        async with _service(journal, issuing, hsm_token) as svc:
            return (await svc.issue(IssueRequest("SN-OSSL", make_csr()[1]))).certificate_pem

    pem = asyncio.run(go())
    leaf = tmp_path / "leaf.pem"
    leaf.write_bytes(pem)
    root, inter = tmp_path / "root.pem", tmp_path / "inter.pem"
    chain = issuing.chain
    root.write_bytes(chain[-1].public_bytes(serialization.Encoding.PEM))
    inter.write_bytes(chain[0].public_bytes(serialization.Encoding.PEM))
    out = subprocess.run(
        ["openssl", "verify", "-x509_strict", "-CAfile", root, "-untrusted", inter, leaf],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip().endswith(": OK")


async def test_shutdown_with_requests_in_flight_answers_everyone(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    svc = _service(journal, issuing, hsm_token)
    await svc.__aenter__()
    tasks = [asyncio.create_task(svc.issue(IssueRequest(f"SN-S{i}", make_csr()[1]))) for i in range(10)]
    await asyncio.sleep(0)
    await svc.__aexit__(None, None, None)
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for r in done:
        assert not isinstance(r, BaseException) or isinstance(r, IssuanceFailed)
    issued = {r.device_serial for r in journal.rows() if r.state == "issued"}
    assert issued == {r.device_serial for r in done if not isinstance(r, BaseException)}
    assert all(r.state == "issued" for r in journal.rows())


async def test_prepare_in_worker_processes_keeps_codes_and_results(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    """The worker-process path: refusals cross the process boundary with their reason codes intact."""
    async with _service(journal, issuing, hsm_token, prepare_workers=2, pipeline_depth=2, batch_max=8) as svc:
        _, csr = make_csr()
        good = [svc.issue(IssueRequest(f"SN-W{i}", make_csr()[1])) for i in range(20)]
        results = await asyncio.gather(
            *good,
            svc.issue(IssueRequest("SN-W-BAD", b"\x30\x03\x02\x01\x01")),
            svc.issue(IssueRequest("bad\x00serial", csr)),
            svc.issue(IssueRequest("SN-W-OK", csr)),
            svc.issue(IssueRequest("SN-W-OK", csr)),
            return_exceptions=True,
        )
    for r in results[:20]:
        assert not isinstance(r, BaseException)
        x509.load_der_x509_certificate(r.certificate).verify_directly_issued_by(issuing.certificate)
    assert isinstance(results[20], IssuanceRefused) and results[20].code == ReasonCode.BAD_CSR
    assert isinstance(results[21], IssuanceRefused) and results[21].code == ReasonCode.BAD_DEVICE_SERIAL
    a, b = results[22], results[23]
    assert not isinstance(a, BaseException) and not isinstance(b, BaseException)
    assert a.certificate == b.certificate and sorted([a.reused, b.reused]) == [False, True]
    assert len([r for r in journal.rows() if r.state == "issued"]) == 21


async def test_pipelined_batches_never_sign_a_device_twice(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    """With several batches in flight, the same device and key arriving in different batches is signed once."""
    async with _service(journal, issuing, hsm_token, pipeline_depth=4, batch_max=2) as svc:
        _, csr = make_csr()
        results = await asyncio.gather(*(svc.issue(IssueRequest("SN-PIPE", csr)) for _ in range(12)))
    assert len({r.certificate for r in results}) == 1
    assert sum(not r.reused for r in results) == 1
    assert len(journal.rows()) == 1


async def test_audit_log_unwritable_stops_issuance_and_says_why(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    """A real SQLite fault (a trigger refusing audit inserts): nothing is journaled, nothing is signed, the
    refusal says the audit log is unavailable; once the log can be written again, issuance resumes."""
    from appliance.audit.log import AuditLog

    audit = AuditLog(journal)
    sign = mocker.spy(type(hsm_token.get_key(issuing.key_label)), "asign_unverified")
    journal.call(lambda: journal.conn.execute(
        "CREATE TRIGGER audit_full BEFORE INSERT ON audit BEGIN SELECT RAISE(ABORT, 'audit disk full'); END"))  # fmt: skip
    async with _service(journal, issuing, hsm_token, audit=audit) as svc:
        with pytest.raises(IssuanceFailed) as exc:
            await svc.issue(IssueRequest("SN-AUD", make_csr()[1]))
        assert exc.value.code == ReasonCode.AUDIT_UNAVAILABLE
        assert "audit" in exc.value.message
        assert journal.rows() == [] and sign.call_count == 0
        journal.call(lambda: journal.conn.execute("DROP TRIGGER audit_full"))
        result = await svc.issue(IssueRequest("SN-AUD", make_csr()[1]))
    assert not result.reused and sign.call_count == 1
    events = [e.event for e in audit.entries()]
    assert events == ["issuance.intent", "issuance.issued"]


async def test_a_batch_stopped_midway_tells_its_callers_and_closes_their_activity(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    """A batch task cancelled while its request waits at the HSM (what the service's task group does to every
    batch when one of its tasks fails): the caller gets BUSY instead of waiting for ever, the request no longer
    counts as open issuance (the OCSP responder yields to open issuance), and the service issues on."""
    from tests.appliance.va.test_ocsp_load import GUARD_S, hold, until

    async with _service(journal, issuing, hsm_token) as svc:
        async with hold(hsm_token.thread) as gate:
            pending = asyncio.ensure_future(svc.issue(IssueRequest("SN-STOP", make_csr()[1])))
            await until(
                lambda: any(r.state == "intent" for r in journal.rows())
            )  # past its intent, at the HSM
            (batch,) = [t for t in asyncio.all_tasks() if t.get_name().startswith("issuance-batch-")]
            batch.cancel()
            with pytest.raises(IssuanceFailed) as stopped:
                await asyncio.wait_for(pending, GUARD_S)
        gate.result(GUARD_S)
        assert stopped.value.code == ReasonCode.BUSY and svc.activity.open == 0
        later = await svc.issue(IssueRequest("SN-AFTER", make_csr()[1]))
    assert later.device_serial == "SN-AFTER"
    # The stopped request's signature, if the HSM made it, was never released; its intent waits for the next start.
    assert {r.device_serial: r.state for r in journal.rows()} == {"SN-STOP": "intent", "SN-AFTER": "issued"}
