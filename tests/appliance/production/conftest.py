"""Fixtures for production control: the real audit log, people with each role, and a ready line with a work
order, over the session's SoftHSM token and a fresh journal per test."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from appliance.audit.log import AuditLog
from appliance.ca import CaRecord
from appliance.issuance.journal import Journal
from appliance.issuance.service import IssueService
from appliance.production import store, users
from appliance.production.allowlist import SerialRange
from appliance.production.model import WorkOrderSpec
from appliance.production.policy import WorkOrderPolicy
from appliance.production.users import Role, User
from appliance.profiles import Profile, builtin_profiles
from hsm.token import Token
from tests.appliance.conftest import TEST_COST

PASSWORD = "correct horse battery"


@dataclass
class Floor:
    """A tenant, a product, line L1 with station st1, and people of every role."""

    journal: Journal
    audit: AuditLog
    admin: User
    supervisor: User
    operator: User
    auditor: User
    profile: Profile

    def work_order(self, wo_id: str = "WO-1", quantity: int = 10, **kw: Any) -> str:
        spec = WorkOrderSpec(
            wo_id, kw.pop("product", "sensor"), quantity, kw.pop("lines", ("L1",)),
            serials=kw.pop("serials", ()), ranges=kw.pop("ranges", (SerialRange("SN-", 0, 9999, 4),)), **kw,
        )  # fmt: skip
        store.add_work_order(self.journal, self.audit, self.supervisor, spec, activate=True)
        return wo_id

    def add_station(self, name: str, line: str | None = "L1") -> None:
        def txn(conn: Any) -> None:
            conn.execute(
                "INSERT INTO stations (name, kind, key, created_at) VALUES (?, 'lan', ?, ?)",
                (name, bytes(32), time.time()),
            )

        self.journal.call(self.journal.transaction, txn, "test station")
        if line is not None:
            store.assign_station(self.journal, self.audit, self.supervisor, name, line)

    def consumed(self, wo_id: str = "WO-1") -> int:
        return int(self.journal.call(lambda: self.journal.conn.execute(
            "SELECT consumed FROM work_order WHERE id=?", (wo_id,)).fetchone()[0]))  # fmt: skip


@pytest.fixture
def floor(journal: Journal) -> Floor:
    audit = AuditLog(journal)
    admin = users.bootstrap(journal, audit, "alice", PASSWORD, cost=TEST_COST)
    people = {}
    for name, role in (("sam", Role.SUPERVISOR), ("olga", Role.OPERATOR), ("aud", Role.AUDITOR)):
        users.add_user(journal, audit, admin, name, role, PASSWORD, cost=TEST_COST)
        people[role] = User(name, role)
    profile = builtin_profiles()["idevid"]
    store.add_tenant(journal, audit, admin, "acme", "Acme Devices")
    store.add_product(journal, audit, admin, "sensor", tenant="acme", profile=profile, ca="issuing")
    store.add_line(journal, audit, admin, "L1")
    store.add_line(journal, audit, admin, "L2")
    f = Floor(
        journal, audit, admin, people[Role.SUPERVISOR], people[Role.OPERATOR], people[Role.AUDITOR], profile
    )
    f.add_station("st1", "L1")
    return f


ServiceMaker = Callable[..., IssueService]


@pytest.fixture
def make_service(journal: Journal, issuing: CaRecord, hsm_token: Token) -> ServiceMaker:
    def make(clock: Callable[[], float] = time.time, **kw: Any) -> IssueService:
        profiles: dict[str, Profile] = dict(builtin_profiles())
        return IssueService(
            journal, issuing, hsm_token.get_key(issuing.key_label), profiles,
            policy=WorkOrderPolicy("issuing", clock=clock), clock=clock, **kw,
        )  # fmt: skip

    return make


@pytest.fixture
async def service(make_service: ServiceMaker) -> AsyncIterator[IssueService]:
    async with make_service() as svc:
        yield svc
