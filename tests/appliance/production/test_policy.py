"""WorkOrderPolicy through the real IssueService, SoftHSM token and SQLite journal: each rule, the quota race,
retries, burns and crash recovery, rework and scrap."""

from __future__ import annotations

import asyncio
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from pytest_mock import MockerFixture

from appliance.errors import IssuanceFailed, IssuanceRefused, ReasonCode
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.production import reconcile, store
from appliance.production.allowlist import SerialRange
from appliance.production.policy import WorkOrderPolicy
from appliance.production.users import AuthError
from hsm.errors import DeviceError
from tests.appliance.conftest import make_csr
from tests.appliance.production.conftest import Floor, ServiceMaker


def req(serial: str, station: str = "st1", csr: bytes | None = None) -> IssueRequest:
    return IssueRequest(serial, csr if csr is not None else make_csr(serial)[1], station=station)


async def refused(service: IssueService, request: IssueRequest) -> IssuanceRefused:
    with pytest.raises(IssuanceRefused) as info:
        await service.issue(request)
    return info.value


def live_rows(floor: Floor) -> int:
    return len(floor.journal.rows("state != 'burned'"))


async def test_issues_within_the_work_order_and_binds_the_unit(floor: Floor, service: IssueService) -> None:
    floor.work_order(quantity=3)
    result = await service.issue(req("SN-0001"))
    assert floor.consumed() == 1
    unit = floor.journal.call(
        lambda: floor.journal.conn.execute(
            "SELECT work_order, issuance_id, kind FROM work_order_unit"
        ).fetchall()
    )
    assert unit == [("WO-1", result.issuance_id, "new")]
    assert reconcile.quota_problems(floor.journal) == []


async def test_a_stored_certificate_goes_only_to_a_station_that_serves_its_work_order(
    floor: Floor, service: IssueService
) -> None:
    """The same device and key asked again is answered from the journal (nothing taken), but a station on
    another line, or on none, is refused: it could then confirm a device it never made."""
    floor.work_order(quantity=3)
    floor.add_station("st1b", line="L1")
    floor.add_station("other", line="L2")
    floor.add_station("loose", line=None)
    csr = make_csr("SN-0001")[1]
    first = await service.issue(req("SN-0001", csr=csr))
    again = await service.issue(req("SN-0001", station="st1b", csr=csr))  # same line: the stored certificate
    assert again.reused and again.certificate == first.certificate
    for station in ("other", "loose"):
        exc = await refused(service, req("SN-0001", station=station, csr=csr))
        assert exc.code is ReasonCode.NOT_AUTHORISED and exc.details["rule"] == "retry-line"
    assert floor.consumed() == 1


async def test_station_without_a_line_is_refused(floor: Floor, service: IssueService) -> None:
    floor.work_order()
    floor.add_station("loose", line=None)
    exc = await refused(service, req("SN-0001", station="loose"))
    assert exc.code is ReasonCode.NOT_AUTHORISED and exc.details["rule"] == "station-line"
    assert "not assigned to a production line" in exc.message
    exc = await refused(service, req("SN-0002", station="unregistered"))
    assert exc.details["rule"] == "station-line"
    assert live_rows(floor) == 0


async def test_no_active_work_order_on_the_line(floor: Floor, service: IssueService) -> None:
    floor.work_order(lines=("L2",))  # active, but on another line
    exc = await refused(service, req("SN-0001"))
    assert exc.code is ReasonCode.NOT_AUTHORISED and exc.details["rule"] == "active-work-order"
    spec = store.WorkOrderSpec("WO-D", "sensor", 5, ("L1",), ranges=(SerialRange("SN-", 0, 9999, 4),))
    store.add_work_order(floor.journal, floor.audit, floor.supervisor, spec)  # draft
    assert (await refused(service, req("SN-0001"))).details["rule"] == "active-work-order"
    store.activate_work_order(floor.journal, floor.audit, floor.supervisor, "WO-D")
    await service.issue(req("SN-0001"))
    store.close_work_order(floor.journal, floor.audit, floor.supervisor, "WO-D")
    assert (await refused(service, req("SN-0002"))).details["rule"] == "active-work-order"


async def test_serial_must_be_in_the_allowlist(floor: Floor, service: IssueService) -> None:
    floor.work_order(serials=("X-7",), ranges=(SerialRange("SN-", 10, 20, 4),), pattern=r"P-[0-9]{3}")
    for ok in ("X-7", "SN-0010", "SN-0020", "P-123"):
        await service.issue(req(ok))
    for bad in ("X-8", "SN-0009", "SN-0021", "SN-010", "P-1234", "xP-123", "SN-00010"):
        exc = await refused(service, req(bad))
        assert exc.code is ReasonCode.NOT_AUTHORISED and exc.details["rule"] == "allowlist", bad
        assert "not in the allowlist of work order(s) WO-1" in exc.message
    assert floor.consumed() == 4


async def test_validity_window(floor: Floor, make_service: ServiceMaker) -> None:
    now = time.time()
    floor.work_order(valid_from=now + 3600, valid_to=now + 7200)
    async with make_service() as svc:
        exc = await refused(svc, req("SN-0001"))
        assert exc.details["rule"] == "validity" and "not valid until" in exc.message
    async with make_service(clock=lambda: now + 7200) as svc:  # valid_to is exclusive
        exc = await refused(svc, req("SN-0001"))
        assert exc.details["rule"] == "validity" and "expired" in exc.message
    async with make_service(clock=lambda: now + 3600) as svc:
        await svc.issue(req("SN-0001"))


async def test_work_order_for_another_profile_or_ca_does_not_authorise(
    floor: Floor, service: IssueService
) -> None:
    from appliance.profiles import builtin_profiles

    matter = builtin_profiles()["matter-dac"]
    store.add_product(
        floor.journal, floor.audit, floor.admin, "dac", tenant="acme", profile=matter, ca="issuing"
    )
    floor.work_order(product="dac")
    exc = await refused(service, req("SN-0001"))  # the request uses the default profile, idevid
    assert exc.details["rule"] == "active-work-order" and "profile 'idevid'" in exc.message
    policy = WorkOrderPolicy("another-ca")
    floor.work_order("WO-2")

    def check(conn: object) -> None:
        policy.authorise(conn, req("SN-0001"), floor.profile)  # type: ignore[arg-type]

    with pytest.raises(IssuanceRefused) as info:
        floor.journal.call(floor.journal.transaction, check, "policy")
    assert info.value.details["rule"] == "active-work-order"


async def test_product_key_policy_narrows_the_profile(floor: Floor, service: IssueService) -> None:
    store.add_product(
        floor.journal, floor.audit, floor.admin, "p384", tenant="acme", profile=floor.profile, ca="issuing",
        key_algorithms=["ec-p384"],
    )  # fmt: skip
    floor.work_order(product="p384")
    exc = await refused(service, req("SN-0001"))  # make_csr makes P-256 keys
    assert exc.code is ReasonCode.KEY_POLICY
    await service.issue(req("SN-0001", csr=make_csr("SN-0001", ec.generate_private_key(ec.SECP384R1()))[1]))
    assert floor.consumed() == 1


async def test_quota_is_exact_and_refusals_leave_nothing(floor: Floor, service: IssueService) -> None:
    floor.work_order(quantity=2)
    await service.issue(req("SN-0001"))
    await service.issue(req("SN-0002"))
    exc = await refused(service, req("SN-0003"))
    assert exc.code is ReasonCode.QUOTA_EXHAUSTED and "WO-1" in exc.message
    assert floor.consumed() == 2 and live_rows(floor) == 2


async def test_quota_spills_to_the_next_work_order_for_the_same_serial(
    floor: Floor, service: IssueService
) -> None:
    floor.work_order("WO-A", quantity=1)
    floor.work_order("WO-B", quantity=1)
    await service.issue(req("SN-0001"))
    await service.issue(req("SN-0002"))
    assert (floor.consumed("WO-A"), floor.consumed("WO-B")) == (1, 1)
    assert (await refused(service, req("SN-0003"))).code is ReasonCode.QUOTA_EXHAUSTED


async def test_retry_of_an_issued_device_gets_the_stored_certificate_without_quota(
    floor: Floor, service: IssueService
) -> None:
    floor.work_order(quantity=1)
    key, csr = make_csr("SN-0001")
    first = await service.issue(req("SN-0001", csr=csr))
    again = await service.issue(req("SN-0001", csr=make_csr("SN-0001", key)[1]))
    assert again.reused and again.certificate == first.certificate
    assert floor.consumed() == 1 and live_rows(floor) == 1
    # Retries arriving together with the first request (followers in one batch) do not consume either.
    assert (await refused(service, req("SN-0002"))).code is ReasonCode.QUOTA_EXHAUSTED


async def test_quota_race_many_stations_for_the_last_units(floor: Floor, make_service: ServiceMaker) -> None:
    floor.work_order(quantity=7)
    for i in range(10):
        floor.add_station(f"race{i}")
    async with make_service(pipeline_depth=4, batch_max=4) as svc:
        await asyncio.gather(*(svc.issue(req(f"SN-{i:04d}", station=f"race{i % 10}")) for i in range(2)))
        assert floor.consumed() == 2
        results = await asyncio.gather(
            *(svc.issue(req(f"SN-{i:04d}", station=f"race{i % 10}")) for i in range(100, 150)),
            return_exceptions=True,
        )
        assert svc.stats["batches"] > 3  # the race really ran over several pipelined batches
    ok = [r for r in results if not isinstance(r, BaseException)]
    bad = [r for r in results if isinstance(r, BaseException)]
    assert len(ok) == 5
    assert all(isinstance(e, IssuanceRefused) and e.code is ReasonCode.QUOTA_EXHAUSTED for e in bad)
    assert floor.consumed() == 7 and live_rows(floor) == 7
    assert len(floor.journal.rows("state = 'issued'")) == 7
    assert reconcile.quota_problems(floor.journal) == []


async def test_an_hsm_failure_gives_the_unit_back(
    floor: Floor, service: IssueService, mocker: MockerFixture
) -> None:
    floor.work_order(quantity=1)
    mocker.patch.object(type(service.key), "asign_unverified", side_effect=DeviceError("removed"))
    with pytest.raises(IssuanceFailed):
        await service.issue(req("SN-0001"))
    assert floor.journal.rows()[0].state == "burned"
    assert floor.consumed() == 0
    mocker.stopall()
    await service.issue(req("SN-0002"))
    assert floor.consumed() == 1 and reconcile.quota_problems(floor.journal) == []


def test_crash_recovery_gives_back_the_units_of_burned_intents(floor: Floor) -> None:
    """The state a SIGKILL after the intent commit leaves: intent rows with their units. recover() (run by
    every IssueService start) burns them, and the trigger gives the units back in the same transaction."""
    floor.work_order(quantity=3)
    policy = WorkOrderPolicy("issuing")

    def intent(conn: object, serial: str, n: int) -> None:
        policy.authorise(conn, req(serial), floor.profile)  # type: ignore[arg-type]
        conn.execute(  # type: ignore[attr-defined]
            "INSERT INTO issuance (request_id, station, profile, ca, device_serial, public_key_sha256, csr_sha256,"
            " cert_serial, tbs_sha256, state, created_at) VALUES (?,?,?,?,?,?,?,?,?,'intent',?)",
            (
                f"r{n}",
                "st1",
                "idevid",
                "issuing",
                serial,
                bytes([n]) * 32,
                b"c" * 32,
                f"{n:x}",
                b"t" * 32,
                1.0,
            ),
        )

    for n, serial in enumerate(("SN-0001", "SN-0002", "SN-0003"), 1):
        floor.journal.call(floor.journal.transaction, lambda c, s=serial, n=n: intent(c, s, n), "intent")
    assert floor.consumed() == 3
    assert floor.journal.recover() == 3
    assert floor.consumed() == 0
    assert reconcile.quota_problems(floor.journal) == []
    rep = reconcile.report(floor.journal, "WO-1")
    assert (rep.issued, rep.in_progress, rep.remaining, rep.consistent) == (0, 0, 3, True)


async def test_rework_needs_a_supervisor_and_does_not_take_quota(floor: Floor, service: IssueService) -> None:
    floor.work_order(quantity=1)
    first = await service.issue(req("SN-0001"))
    exc = await refused(service, req("SN-0001"))  # a new key without rework
    assert exc.code is ReasonCode.DEVICE_ALREADY_ISSUED
    for who in (floor.operator, floor.admin, floor.auditor):
        with pytest.raises(AuthError):
            store.rework(floor.journal, floor.audit, who, "SN-0001", "secure element replaced", ca="issuing")
    store.rework(
        floor.journal, floor.audit, floor.supervisor, "SN-0001", "secure element replaced", ca="issuing"
    )
    second = await service.issue(req("SN-0001"))
    assert second.cert_serial != first.cert_serial and not second.reused
    assert floor.consumed() == 1  # the device counts once
    states = {r.cert_serial: r.state for r in floor.journal.rows()}
    assert states == {first.cert_serial: "reworked", second.cert_serial: "issued"}
    # The grant is used up: a third key needs another rework.
    assert (await refused(service, req("SN-0001"))).code is ReasonCode.DEVICE_ALREADY_ISSUED
    rep = reconcile.report(floor.journal, "WO-1")
    assert (rep.issued, rep.reworked, rep.pending_confirmation, rep.remaining) == (1, 1, 1, 0)
    entries = [e for e in floor.audit.entries() if e.event == "device.rework"]
    assert len(entries) == 1 and entries[0].actor == "sam"
    assert reconcile.quota_problems(floor.journal) == []


async def test_a_burned_rework_issuance_reopens_the_grant(
    floor: Floor, service: IssueService, mocker: MockerFixture
) -> None:
    floor.work_order(quantity=1)
    await service.issue(req("SN-0001"))
    store.rework(floor.journal, floor.audit, floor.supervisor, "SN-0001", "new key", ca="issuing")
    mocker.patch.object(type(service.key), "asign_unverified", side_effect=DeviceError("removed"))
    with pytest.raises(IssuanceFailed):
        await service.issue(req("SN-0001"))
    mocker.stopall()
    await service.issue(req("SN-0001"))
    assert floor.consumed() == 1 and reconcile.quota_problems(floor.journal) == []


async def test_scrap_needs_a_supervisor_and_the_serial_is_never_issued_again(
    floor: Floor, service: IssueService
) -> None:
    floor.work_order(quantity=2)
    key, csr = make_csr("SN-0001")
    first = await service.issue(req("SN-0001", csr=csr))
    with pytest.raises(AuthError):
        store.scrap(floor.journal, floor.audit, floor.operator, "SN-0001", "dropped", ca="issuing")
    store.scrap(floor.journal, floor.audit, floor.supervisor, "SN-0001", "dropped in the oven", ca="issuing")
    assert floor.journal.rows()[0].state == "scrapped"
    # Not even a retry with the same key gets the scrapped certificate back.
    exc = await refused(service, req("SN-0001", csr=make_csr("SN-0001", key)[1]))
    assert exc.code is ReasonCode.DEVICE_SCRAPPED and first.cert_serial in exc.message
    assert (await refused(service, req("SN-0001"))).code is ReasonCode.DEVICE_SCRAPPED
    assert floor.consumed() == 1  # a scrapped device stays counted
    rep = reconcile.report(floor.journal, "WO-1")
    assert (rep.issued, rep.scrapped, rep.remaining) == (1, 1, 1)
    scrap = floor.journal.call(
        lambda: floor.journal.conn.execute("SELECT cert_serial, authorised_by FROM scrap").fetchall()
    )
    assert scrap == [(first.cert_serial, "sam")]


async def test_identical_requests_in_flight_together_take_one_unit(
    floor: Floor, make_service: ServiceMaker
) -> None:
    floor.work_order(quantity=1)
    _key, csr = make_csr("SN-0001")
    async with make_service(batch_max=8) as svc:
        results = await asyncio.gather(*(svc.issue(req("SN-0001", csr=csr)) for _ in range(4)))
    assert len({r.certificate for r in results}) == 1 and sum(not r.reused for r in results) == 1
    assert floor.consumed() == 1 and live_rows(floor) == 1


async def test_a_new_key_for_a_revoked_device_says_it_is_revoked(floor: Floor, service: IssueService) -> None:
    """Review finding 12: the refusal said only "already has a certificate", not that it is revoked."""
    from appliance.va.revocation import Reason, revoke

    floor.work_order(quantity=2)
    first = await service.issue(req("SN-0001"))
    assert "revoked" not in (await refused(service, req("SN-0001"))).message
    revoke(
        floor.journal,
        floor.audit,
        floor.supervisor,
        cert_serial=first.cert_serial,
        reason=Reason.KEY_COMPROMISE,
    )
    exc = await refused(service, req("SN-0001"))
    assert exc.code is ReasonCode.DEVICE_ALREADY_ISSUED
    assert f"(serial {first.cert_serial}, revoked (keyCompromise)) for a different key" in exc.message
    assert "needs an authorised rework (`birthline device rework SERIAL`)" in exc.message
