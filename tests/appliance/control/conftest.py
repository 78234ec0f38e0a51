"""A real daemon (SoftHSM, journal, TLS listener) with its control socket, and the people of the floor."""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance import stations_registry as reg
from appliance.audit.log import AuditLog
from appliance.config import (
    ApplianceSection,
    Config,
    ControlSection,
    IssuanceSection,
    JournalSection,
    MetricsSection,
    StationsSection,
    VaSection,
)
from appliance.daemon import Daemon
from appliance.production import users
from appliance.production.users import Role, User
from appliance.profiles import builtin_profiles
from console.client import ControlClient
from hsm.softhsm import SoftHsmToken
from tests.appliance.conftest import PRODUCTION_PASSWORD, put_on_line

PEOPLE = {"olga": Role.OPERATOR, "sam": Role.SUPERVISOR, "audrey": Role.AUDITOR}  # alice: administrator


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A state directory others can reach (/tmp/x, mode 0755): the socket tests run clients as other users."""
    d = Path(tempfile.mkdtemp(prefix="bl-ctl-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def control_config(state: Path, token: SoftHsmToken, template: Path, **control: object) -> Config:
    state.mkdir(parents=True, exist_ok=True)
    state.chmod(0o700)  # the appliance refuses a state directory others can reach
    shutil.copy(template, state / "journal.sqlite")
    return Config(
        appliance=ApplianceSection(state),
        hsm=token.hsm_config(),
        journal=JournalSection(state / "journal.sqlite"),
        issuance=IssuanceSection(),
        stations=StationsSection(
            lan_listen="127.0.0.1:0",
            tls_dir=state / "tls",
            handshake_timeout_s=2.0,
            idle_timeout_s=10.0,
            frame_timeout_s=0.2,
            registry_poll_s=0.1,
        ),
        va=VaSection(listen=""),
        profiles={"idevid": builtin_profiles()["idevid"]},
        control=dataclasses.replace(ControlSection(), **control),  # type: ignore[arg-type]
        metrics=MetricsSection(listen="127.0.0.1:0"),
    )


@dataclass
class Floor:
    daemon: Daemon
    socket: Path
    tmp: Path

    @property
    def audit(self) -> AuditLog:
        assert self.daemon.core is not None
        return self.daemon.core.audit

    async def station(self, name: str) -> Path:
        """Register a LAN station on line L1 and write its bundle."""
        d = self.daemon
        assert d.core is not None
        creds = reg.add_station(d.journal, d.core.token, name, "lan", audit=d.core.audit, actor="alice")
        put_on_line(d.journal, name)
        reg.write_bundle(creds, self.tmp / name)
        await d.refresh()
        return self.tmp / name

    def client(self) -> ControlClient:
        return ControlClient(self.socket)


def add_people(journal_path: Path) -> None:
    from appliance.issuance.journal import Journal

    with Journal(journal_path) as journal:
        audit = AuditLog(journal)
        alice = User("alice", Role.ADMINISTRATOR)
        for name, role in PEOPLE.items():
            users.add_user(journal, audit, alice, name, role, PRODUCTION_PASSWORD)


@pytest.fixture(scope="session")
def people_journal_template(
    production_journal_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("people") / "journal.sqlite"
    shutil.copy(production_journal_template, path)
    add_people(path)
    return path


@pytest.fixture
async def floor(
    softhsm_token: SoftHsmToken, people_journal_template: Path, tmp_path: Path
) -> AsyncIterator[Floor]:
    config = control_config(tmp_path / "state", softhsm_token, people_journal_template)
    async with Daemon(config) as d:
        yield Floor(d, config.control_socket, tmp_path)
