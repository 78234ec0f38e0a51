"""The prepare worker processes (issue 10, item 1): nothing a device sends, and no death of a worker, stops
issuance. Real IssueService with prepare_workers > 0, real SoftHSM token, real journal."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.alarms import Alarms
from appliance.ca import CaRecord
from appliance.errors import IssuanceRefused, ReasonCode
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.issuance.workers import ALARM_DEATHS, ALARM_UNAVAILABLE, POISON_MESSAGE, PreparePool
from appliance.profiles import Profile, builtin_profiles
from hsm.token import Token
from tests.appliance.conftest import make_csr


def _service(journal: Journal, issuing: CaRecord, token: Token, **kw: object) -> IssueService:
    profiles: dict[str, Profile] = dict(builtin_profiles())
    kw.setdefault("prepare_workers", 1)
    return IssueService(journal, issuing, token.get_key(issuing.key_label), profiles, **kw)  # type: ignore[arg-type]


def with_version(csr: bytes, version: int) -> bytes:
    """The CSR with its CertificationRequestInfo version INTEGER (0 for v1) set to `version` (one octet)."""
    at = csr.index(b"\x02\x01\x00")
    return csr[: at + 2] + bytes([version]) + csr[at + 3 :]


async def _issues(svc: IssueService, issuing: CaRecord, serial: str) -> None:
    result = await svc.issue(IssueRequest(serial, make_csr()[1]))
    x509.load_der_x509_certificate(result.certificate).verify_directly_issued_by(issuing.certificate)


async def test_csr_version_1_is_bad_csr_and_the_next_request_still_issues(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    """The defect found: cryptography's InvalidVersion (not a ValueError) escaped the worker, could not be
    unpickled in the parent, and broke the pool for every later request."""
    async with _service(journal, issuing, hsm_token) as svc:
        for version in (1, 2, 0x7F):
            try:
                await svc.issue(IssueRequest(f"SN-V{version}", with_version(make_csr()[1], version)))
            except IssuanceRefused as exc:
                assert exc.code == ReasonCode.BAD_CSR, exc
            else:
                raise AssertionError(f"a CSR of version {version} was accepted")
            await _issues(svc, issuing, f"SN-AFTER-V{version}")
        # Many at once, mixed with good ones in the same batches.
        results = await asyncio.gather(
            *(svc.issue(IssueRequest(f"SN-M{i}", with_version(make_csr()[1], 1) if i % 3 == 0 else make_csr()[1]))
              for i in range(24)),
            return_exceptions=True,
        )  # fmt: skip
    for i, r in enumerate(results):
        if i % 3 == 0:
            assert isinstance(r, IssuanceRefused) and r.code == ReasonCode.BAD_CSR, r
        else:
            assert not isinstance(r, BaseException), r


async def test_a_bug_in_preparation_refuses_that_request_internal_and_is_logged_once(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Our own bug (injected: no input reaches one now) costs the request it hit an INTERNAL refusal, not the
    batch; the log names where it happened once, without the input, however many requests hit it."""
    from appliance.issuance import prepare

    real = prepare.validate_device_serial

    def buggy(profile: Profile, serial: str) -> None:
        if serial.startswith("SN-BUG"):
            raise KeyError("SN-BUG secret input")
        real(profile, serial)

    mocker.patch.object(prepare, "validate_device_serial", side_effect=buggy)
    async with _service(journal, issuing, hsm_token, prepare_workers=0) as svc:
        results = await asyncio.gather(
            *(svc.issue(IssueRequest(f"SN-BUG{i}" if i % 2 else f"SN-OK{i}", make_csr()[1])) for i in range(8)),
            return_exceptions=True,
        )  # fmt: skip
        await _issues(svc, issuing, "SN-AFTER-BUG")
    for i, r in enumerate(results):
        if i % 2:
            assert isinstance(r, IssuanceRefused) and r.code == ReasonCode.INTERNAL, r
            assert "secret" not in r.message
        else:
            assert not isinstance(r, BaseException), r
    lines = [r.getMessage() for r in caplog.records if "fault in CSR checking" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "KeyError at" in lines[0] and "buggy" in lines[0] and "secret" not in lines[0]


def _patch_worker(mocker: pytest.MockFixture) -> None:  # type: ignore[name-defined]
    from appliance.issuance import prepare
    from tests.appliance.issuance import worker_faults

    mocker.patch.object(prepare, "prepare_in_worker", worker_faults.prepare_or_die)


@pytest.mark.parametrize("how", ["EXIT", "KILL", "SEGV"])
async def test_a_request_that_kills_its_worker_is_refused_alone_and_its_batch_issues(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
    how: str,
) -> None:
    """A poison request (it kills the worker process every time: os._exit, SIGKILL, SIGSEGV) is isolated and
    refused BAD_CSR with a clear reason; the other requests of its batch issue; the next batches issue; and a
    worker that keeps dying raises an alarm."""
    _patch_worker(mocker)
    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, prepare_workers=2, batch_max=16, alarms=alarms) as svc:
        for round_ in range(2):
            serials = [f"SN-R{round_}-{i}" for i in range(10)]
            results = await asyncio.gather(
                *(svc.issue(IssueRequest(s, make_csr()[1])) for s in serials[:5]),
                svc.issue(IssueRequest(f"DIE-{how}-{round_}", make_csr()[1])),
                *(svc.issue(IssueRequest(s, make_csr()[1])) for s in serials[5:]),
                return_exceptions=True,
            )
            poison = results.pop(5)
            assert isinstance(poison, IssuanceRefused) and poison.code == ReasonCode.BAD_CSR, poison
            assert poison.message == POISON_MESSAGE
            for r in results:
                assert not isinstance(r, BaseException), r
            await _issues(svc, issuing, f"SN-NEXT-{round_}")
        # Two poison requests: each killed the shared pool once and its quarantine worker once.
        alarm = alarms.get(ALARM_DEATHS)
        assert alarm is not None and alarm.severity == "warning" and alarm.count >= 1
    rows = journal.rows()
    assert not [r for r in rows if r.device_serial.startswith("DIE-")]
    assert len([r for r in rows if r.state == "issued"]) == 22


async def test_workers_killed_from_outside_are_replaced_and_nothing_is_lost(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    """The OOM killer's way, with no mock at all: SIGKILL every worker process, idle or busy, and the requests
    of that moment and after still issue."""
    async with _service(journal, issuing, hsm_token, prepare_workers=2, batch_max=8) as svc:
        await _issues(svc, issuing, "SN-BEFORE")
        for round_ in range(3):
            workers = svc.prepare_pids
            assert workers
            pending = [asyncio.create_task(svc.issue(IssueRequest(f"SN-K{round_}-{i}", make_csr()[1])))
                       for i in range(12)]  # fmt: skip
            if round_ == 1:
                await asyncio.sleep(0)  # let the first batch reach the workers before they die
            for pid in workers:
                os.kill(pid, signal.SIGKILL)
            for r in await asyncio.gather(*pending, return_exceptions=True):
                assert not isinstance(r, BaseException), r
        await _issues(svc, issuing, "SN-AFTER")
    assert len([r for r in journal.rows() if r.state == "issued"]) == 38


async def test_workers_that_cannot_start_refuse_busy_with_a_critical_alarm_until_they_can(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    """When a fresh worker cannot even start, nothing is blamed on the request (BUSY, not BAD_CSR), a critical
    alarm says why, and issuance resumes by itself once workers start again."""
    from appliance.issuance import prepare
    from tests.appliance.issuance import worker_faults

    alarms = Alarms()
    async with _service(journal, issuing, hsm_token, prepare_workers=1, alarms=alarms) as svc:
        await _issues(svc, issuing, "SN-UP")
        broken = mocker.patch.object(prepare, "init_worker", worker_faults.init_and_die)
        for pid in svc.prepare_pids:
            os.kill(pid, signal.SIGKILL)
        with pytest.raises(IssuanceRefused) as exc:
            await svc.issue(IssueRequest("SN-DOWN", make_csr()[1]))
        assert exc.value.code == ReasonCode.BUSY
        alarm = alarms.get(ALARM_UNAVAILABLE)
        assert alarm is not None and alarm.severity == "critical"
        mocker.stop(broken)
        deadline = time.monotonic() + 120  # a deadlock guard only: the backoff is a few seconds
        while True:
            try:
                await _issues(svc, issuing, "SN-DOWN")
                break
            except IssuanceRefused as again:
                assert again.code == ReasonCode.BUSY and time.monotonic() < deadline
                await asyncio.sleep(0.5)
        assert alarms.get(ALARM_UNAVAILABLE) is None


def _pem_with_blank_line(der: bytes) -> bytes:
    """PEM that validate_csr accepts (blank lines are whitespace) and cryptography's PEM loader does not."""
    b64 = base64.b64encode(der)
    lines = [b64[i : i + 64] for i in range(0, len(b64), 64)]
    return (
        b"-----BEGIN CERTIFICATE REQUEST-----\n"
        + lines[0]
        + b"\n\n"
        + b"\n".join(lines[1:])
        + (b"\n-----END CERTIFICATE REQUEST-----\n")
    )


@pytest.mark.parametrize("narrow_product", [False, True])
async def test_what_is_validated_is_what_later_stages_read(
    production_journal_template: Path, tmp_path: Path, hsm_token: Token, narrow_product: bool
) -> None:
    """Later stages (the work-order policy, the upstream outbox) read the DER that CSR intake validated, never
    the raw input again under other rules. A PEM CSR that intake accepts and cryptography's PEM loader does not
    (a blank line) went to the upstream outbox as PEM text, and with a product narrower than its profile made
    the policy raise inside the intent transaction, failing every request of the batch INTERNAL."""
    from appliance import ca as ca_mod
    from appliance.audit.log import AuditLog
    from appliance.production.policy import WorkOrderPolicy

    shutil.copy(production_journal_template, tmp_path / "journal.sqlite")
    with Journal(tmp_path / "journal.sqlite") as journal:
        if narrow_product:  # as `product add --key-algorithms ec-p256` would have stored it
            journal.call(lambda: journal.conn.execute("UPDATE product SET key_algorithms='ec-p256'"))
        issuing = ca_mod.load_ca(journal, "issuing")
        policy = WorkOrderPolicy("issuing")
        async with _service(journal, issuing, hsm_token, policy=policy, audit=AuditLog(journal)) as svc:
            _, der = make_csr()
            results = await asyncio.gather(
                svc.issue(IssueRequest("SN-0001", _pem_with_blank_line(der), station="fixture-1")),
                *(
                    svc.issue(IssueRequest(f"SN-001{i}", make_csr()[1], station="fixture-1"))
                    for i in range(5)
                ),
                return_exceptions=True,
            )
        for r in results:
            assert not isinstance(r, BaseException), r
        rows = journal.call(lambda: journal.conn.execute("SELECT csr_der FROM outbox ORDER BY id").fetchall())
    assert rows[0][0] == der  # the upstream gets the DER, not the PEM text


async def test_worker_deaths_raise_an_alarm_that_clears_after_a_quiet_window(issuing: CaRecord) -> None:
    """DEATHS_FOR_ALARM deaths within DEATH_WINDOW_S raise the warning alarm; a run after a window without a
    death clears it. Real SIGKILLs, a fake clock for the window."""
    import dataclasses

    from appliance.issuance.prepare import Job, PrepareContext, Prepared
    from appliance.issuance.workers import DEATH_WINDOW_S, DEATHS_FOR_ALARM, PreparePool

    now = [1_000.0]
    alarms = Alarms(clock=lambda: now[0])
    ctx = PrepareContext(dict(builtin_profiles()), issuing.cert_der or b"", issuing.key_algorithm, 8192)
    pool = PreparePool(ctx, 1, alarms=alarms, clock=lambda: now[0])
    await pool.start()
    job = Job("SN-1", make_csr()[1], "idevid", int(time.time()))
    try:
        for i in range(DEATHS_FOR_ALARM):
            assert alarms.get(ALARM_DEATHS) is None
            for pid in pool.pids:
                os.kill(pid, signal.SIGKILL)
            (result,) = await pool.run([dataclasses.replace(job, device_serial=f"SN-{i}")])
            assert isinstance(result, Prepared)
            now[0] += 1
        assert pool.stats["deaths"] == DEATHS_FOR_ALARM
        alarm = alarms.get(ALARM_DEATHS)
        assert alarm is not None and alarm.severity == "warning"
        now[0] += DEATH_WINDOW_S / 2
        await pool.run([job])
        assert alarms.get(ALARM_DEATHS) is not None
        now[0] += DEATH_WINDOW_S
        await pool.run([job])
        assert alarms.get(ALARM_DEATHS) is None
    finally:
        pool.shutdown()


async def test_workers_ignore_sigint_the_parent_stops_them(
    journal: Journal, issuing: CaRecord, hsm_token: Token
) -> None:
    """Ctrl-C reaches the whole process group: the workers ignore it (no KeyboardInterrupt traceback from each),
    the parent decides and stops them."""
    async with _service(journal, issuing, hsm_token, prepare_workers=2, batch_max=8) as svc:
        await _issues(svc, issuing, "SN-INT-BEFORE")
        workers = svc.prepare_pids
        assert workers

        def ignoring_sigint(pid: int) -> bool:
            # A worker still starting (the pool spawns them on demand) has not run its initializer yet: a
            # signal then would test Python's start-up, not the worker. The kernel says when it ignores SIGINT.
            status = Path(f"/proc/{pid}/status").read_text()
            ignored = int(
                next(line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), 16
            )
            return bool(ignored & (1 << (signal.SIGINT - 1)))

        deadline = time.monotonic() + 120  # a hang guard, not a timing assertion
        while not all(ignoring_sigint(pid) for pid in workers):
            assert time.monotonic() < deadline, "the workers never ran their initializer"
            await asyncio.sleep(0.05)
        for pid in workers:
            os.kill(pid, signal.SIGINT)
        for i in range(4):  # requests through the workers after the signal: each a round trip to them
            await _issues(svc, issuing, f"SN-INT-{i}")
        assert svc.prepare_pids == workers and svc.prepare_stats["deaths"] == 0
        for pid in workers:
            assert Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] in "RSD", pid


async def test_a_worker_dying_while_verifying_signatures_costs_no_certificate(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    """The worker verifying a batch's HSM signatures dies (os._exit): the daemon verifies that batch itself, every
    certificate of it is issued (each verifies with the CA key), the pool is replaced and later batches issue."""
    from appliance.issuance import prepare
    from appliance.issuance.finish import FINISH_HERE_MAX
    from tests.appliance.issuance import worker_faults

    mocker.patch.object(prepare, "finish_in_worker", worker_faults.finish_or_die)
    # A batch larger than FINISH_HERE_MAX: a smaller one is verified in the daemon, never in a worker.
    batch = ["FINISH-DIE", *(f"SN-F{i}" for i in range(FINISH_HERE_MAX))]
    async with _service(journal, issuing, hsm_token, prepare_workers=1, batch_max=16) as svc:
        first = await asyncio.gather(*(svc.issue(IssueRequest(s, make_csr()[1])) for s in batch))
        # Again larger than FINISH_HERE_MAX: the replaced pool verifies it.
        later_batch = [f"SN-LATER{i}" for i in range(FINISH_HERE_MAX + 1)]
        to_workers = mocker.spy(PreparePool, "finish")
        later = await asyncio.gather(*(svc.issue(IssueRequest(s, make_csr()[1])) for s in later_batch))
        assert svc.prepare_stats["replaced"] >= 1
        assert to_workers.call_count == 1 and to_workers.spy_return == [r.certificate for r in later]
    ca_key = issuing.certificate.public_key()
    for result in [*first, *later]:
        cert = x509.load_der_x509_certificate(result.certificate)
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr, call-arg]
    assert {r.device_serial: r.state for r in journal.rows()} == dict.fromkeys(
        [*batch, *later_batch], "issued"
    )


def test_what_crosses_the_worker_pipe_keeps_every_field() -> None:
    """Job, Prepared and Tbs pickle as plain values (their own __reduce__, which names the fields by hand for
    speed): every field, each set to a value other than its default, survives the round trip, so a field added
    later without adding it there fails here rather than silently resetting in the parent."""
    import dataclasses
    import pickle

    from appliance.issuance.prepare import Job, Prepared
    from appliance.issuance.tbs import Tbs

    tbs = Tbs(b"\x30\x03\x02\x01\x01", b"\x30\x0a\x06\x08\x2a\x86\x48\xce\x3d\x04\x03\x02")
    samples = [
        Job("SN-1", b"\x30csr", "idevid", 1_700_000_000, b"\x30spki"),
        Prepared("idevid", b"k" * 32, b"c" * 32, "7f01", tbs, b"\x30der", "template differs"),
        tbs,
    ]
    for value in samples:
        fields = dataclasses.fields(value)
        assert len(value.__reduce__()[1]) == len(fields), type(value).__name__
        for f in fields:
            if f.default is not dataclasses.MISSING:
                assert getattr(value, f.name) != f.default, (
                    f"{type(value).__name__}.{f.name} left at its default"
                )
        back = pickle.loads(pickle.dumps(value))  # noqa: S301 - our own bytes, as the pipe carries them
        assert back == value and type(back) is type(value)
        assert [getattr(back, f.name) for f in fields] == [getattr(value, f.name) for f in fields]
    assert pickle.loads(pickle.dumps(tbs)).sha256 == tbs.sha256  # noqa: S301 - our own bytes


async def test_a_verification_call_that_raises_costs_no_certificate_and_no_worker(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    """A call that raised is not a death: the daemon verifies that batch itself, and the pool, its workers and
    the other batches' calls in it go on (it is not replaced, nothing in it is cancelled)."""
    from appliance.issuance import prepare
    from appliance.issuance.finish import FINISH_HERE_MAX
    from tests.appliance.issuance import worker_faults

    mocker.patch.object(prepare, "finish_in_worker", worker_faults.finish_raises)
    async with _service(journal, issuing, hsm_token, prepare_workers=2, batch_max=16) as svc:
        workers = svc.prepare_pids
        serials = [f"SN-R{i}" for i in range(3 * (FINISH_HERE_MAX + 1))]
        results = await asyncio.gather(*(svc.issue(IssueRequest(s, make_csr()[1])) for s in serials))
        assert svc.prepare_pids == workers
        assert svc.prepare_stats["replaced"] == 0 and svc.prepare_stats["deaths"] == 0
    ca_key = issuing.certificate.public_key()
    for result in results:
        cert = x509.load_der_x509_certificate(result.certificate)
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr, call-arg]
    assert {r.device_serial: r.state for r in journal.rows()} == dict.fromkeys(serials, "issued")


async def test_with_every_worker_busy_a_share_of_a_batch_is_finished_here_and_each_device_gets_its_own(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    """At full speed every worker is busy when a batch is to be finished: the workers take the head of the batch
    and a thread of this process the rest, at once. Every certificate still carries its own device's key and
    serial, in the order of the requests, and verifies with the CA key."""
    from appliance.issuance.finish import share_here

    # "Every worker busy" depends on timing; the split it leads to is what is tested here.
    mocker.patch.object(PreparePool, "saturated", new_callable=mocker.PropertyMock, return_value=True)
    to_workers = mocker.spy(PreparePool, "finish")
    devices = [(f"SN-S{i}", *make_csr()) for i in range(12)]
    async with _service(journal, issuing, hsm_token, prepare_workers=1, batch_max=16) as svc:
        results = await asyncio.gather(*(svc.issue(IssueRequest(sn, csr)) for sn, _, csr in devices))
        assert svc.stats["batches"] == 1
    here = share_here(len(devices), 1)
    assert 0 < here < len(devices)
    assert to_workers.call_count == 1 and len(to_workers.call_args.args[1]) == len(devices) - here
    assert to_workers.spy_return == [r.certificate for r in results[: len(devices) - here]]
    ca_key = issuing.certificate.public_key()
    for (serial, key, _), result in zip(devices, results, strict=True):
        cert = x509.load_der_x509_certificate(result.certificate)
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr, call-arg]
        assert cert.public_key() == key.public_key() and result.device_serial == serial
        assert serial in cert.subject.rfc4514_string()
    assert {r.device_serial: r.state for r in journal.rows()} == {sn: "issued" for sn, _, _ in devices}


def test_the_share_finished_here_leaves_the_workers_most_of_a_batch() -> None:
    from appliance.issuance.finish import share_here

    assert [share_here(n, 1) for n in (2, 5, 10, 256)] == [0, 2, 4, 102]
    assert [share_here(n, 2) for n in (5, 10, 256)] == [1, 2, 64]
    assert all(share_here(n, w) < n for n in range(1, 300) for w in (1, 2, 4))


async def test_with_every_worker_busy_a_verification_call_that_raises_costs_no_certificate(
    journal: Journal,
    issuing: CaRecord,
    hsm_token: Token,
    mocker: pytest.MockFixture,  # type: ignore[name-defined]
) -> None:
    """The workers' part of a split batch fails (a call that raised): the daemon checks that part itself, and
    every certificate of the batch is issued and verifies with the CA key."""
    from appliance.issuance import prepare
    from tests.appliance.issuance import worker_faults

    mocker.patch.object(prepare, "finish_in_worker", worker_faults.finish_raises)
    mocker.patch.object(PreparePool, "saturated", new_callable=mocker.PropertyMock, return_value=True)
    here = mocker.spy(prepare.Preparer, "finish")
    serials = [f"SN-B{i}" for i in range(10)]
    async with _service(journal, issuing, hsm_token, prepare_workers=1, batch_max=16) as svc:
        results = await asyncio.gather(*(svc.issue(IssueRequest(s, make_csr()[1])) for s in serials))
        assert svc.stats["batches"] == 1
    # Two calls here: the share, then the workers' part; nothing finished twice.
    assert sorted(len(c.args[1]) for c in here.call_args_list) == [4, 6]
    ca_key = issuing.certificate.public_key()
    for result in results:
        cert = x509.load_der_x509_certificate(result.certificate)
        ca_key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(hashes.SHA256()))  # type: ignore[union-attr, call-arg]
    assert {r.device_serial: r.state for r in journal.rows()} == dict.fromkeys(serials, "issued")
