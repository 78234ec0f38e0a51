"""Fixtures for revocation and validation: the production floor with a supervisor, an operator and six devices
SN-0000..SN-0005 issued for real (IssueService, work-order policy, WO-1) once per session; a fresh copy per test."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from appliance import ca as ca_mod
from appliance.audit.log import AuditLog
from appliance.ca import CaRecord
from appliance.issuance.journal import Journal
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueService
from appliance.production import users
from appliance.production.policy import WorkOrderPolicy
from appliance.production.users import Role, User
from appliance.profiles import Profile, builtin_profiles
from hsm.token import Token
from tests.appliance.conftest import PRODUCTION_PASSWORD, TEST_COST, make_csr

DEVICES = tuple(f"SN-{i:04d}" for i in range(6))


@pytest.fixture(scope="session")
def va_template(
    production_journal_template: Path, hsm_token: Token, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    path = tmp_path_factory.mktemp("va") / "journal.sqlite"
    shutil.copy(production_journal_template, path)
    with Journal(path) as journal:
        audit = AuditLog(journal)
        admin = User("alice", Role.ADMINISTRATOR)
        users.add_user(journal, audit, admin, "sam", Role.SUPERVISOR, PRODUCTION_PASSWORD, cost=TEST_COST)
        users.add_user(journal, audit, admin, "olga", Role.OPERATOR, PRODUCTION_PASSWORD, cost=TEST_COST)
        issuing = ca_mod.load_ca(journal, "issuing")
        profiles: dict[str, Profile] = dict(builtin_profiles())

        async def issue() -> None:
            service = IssueService(
                journal, issuing, hsm_token.get_key(issuing.key_label), profiles,
                policy=WorkOrderPolicy("issuing"), audit=audit,
            )  # fmt: skip
            async with service:
                for device in DEVICES:
                    await service.issue(IssueRequest(device, make_csr(device)[1], station="fixture-1"))

        asyncio.run(issue())
    return path


@dataclass
class Va:
    journal: Journal
    audit: AuditLog
    token: Token
    issuing: CaRecord
    root: CaRecord
    supervisor: User
    operator: User
    admin: User

    def cert(self, device: str) -> x509.Certificate:
        (row,) = self.journal.rows("device_serial=? AND cert_der IS NOT NULL", (device,))
        assert row.cert_der is not None
        return x509.load_der_x509_certificate(row.cert_der)

    def serial(self, device: str) -> str:
        return format(self.cert(device).serial_number, "x")

    def request(
        self,
        device_or_cert: str | x509.Certificate,
        alg: hashes.HashAlgorithm | None = None,
        nonce: bytes | None = None,
    ) -> bytes:
        cert = self.cert(device_or_cert) if isinstance(device_or_cert, str) else device_or_cert
        builder = ocsp.OCSPRequestBuilder().add_certificate(
            cert,
            self.issuing.certificate,
            alg or hashes.SHA1(),  # noqa: S303
        )
        if nonce is not None:
            builder = builder.add_extension(x509.OCSPNonce(nonce), critical=False)
        return builder.build().public_bytes(serialization.Encoding.DER)

    def rogue_cert(self, serial: int) -> x509.Certificate:
        """A certificate signed by the issuing CA key behind the journal's back: 'never issued'."""
        device = self.cert(DEVICES[0])
        builder = (
            x509.CertificateBuilder()
            .subject_name(device.subject)
            .issuer_name(self.issuing.certificate.subject)
            .public_key(device.public_key())
            .serial_number(serial)
            .not_valid_before(device.not_valid_before_utc)
            .not_valid_after(device.not_valid_after_utc)
        )
        return builder.sign(self.token.get_key(self.issuing.key_label), hashes.SHA256())


@pytest.fixture
def va_journal(va_template: Path, tmp_path: Path) -> Iterator[Journal]:
    path = tmp_path / "journal.sqlite"
    shutil.copy(va_template, path)
    with Journal(path) as j:
        yield j


@pytest.fixture
def va(va_journal: Journal, hsm_token: Token) -> Va:
    return Va(
        va_journal, AuditLog(va_journal), hsm_token, ca_mod.load_ca(va_journal, "issuing"),
        ca_mod.load_ca(va_journal, "root"), User("sam", Role.SUPERVISOR), User("olga", Role.OPERATOR),
        User("alice", Role.ADMINISTRATOR),
    )  # fmt: skip


def audit_events(journal: Journal, event: str) -> list[tuple[str, str]]:
    rows = journal.call(
        lambda: journal.conn.execute(
            "SELECT actor, data FROM audit WHERE event=? ORDER BY seq", (event,)
        ).fetchall()
    )
    return [(str(a), str(d)) for a, d in rows]
