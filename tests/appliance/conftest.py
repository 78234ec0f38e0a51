"""Fixtures for the appliance core: a CA hierarchy made once per session in the session's SoftHSM token,
and a fresh journal per test that starts from a copy of it."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import ca as ca_mod
from appliance.ca import CaRecord
from appliance.issuance.journal import Journal
from appliance.production.users import ScryptCost
from hsm.softhsm import SoftHsmToken
from hsm.token import Token


@pytest.fixture(scope="session")
def ca_journal_template(hsm_token: Token, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "journal.sqlite"
    with Journal(path) as journal:
        ca_mod.create_root(journal, hsm_token, "root", "O=Birthline Test,CN=Test Root CA")
        ca_mod.create_issuing(journal, hsm_token, "issuing", "O=Birthline Test,CN=Test Birth CA", "root")
        ca_mod.create_management(journal, hsm_token, "management", "O=Birthline Test,CN=Test Management CA")
    return path


@pytest.fixture
def journal(ca_journal_template: Path, tmp_path: Path) -> Iterator[Journal]:
    path = tmp_path / "journal.sqlite"
    shutil.copy(ca_journal_template, path)
    with Journal(path) as j:
        yield j


@pytest.fixture
def issuing(journal: Journal) -> CaRecord:
    return ca_mod.load_ca(journal, "issuing")


CsrMaker = Callable[..., tuple[ec.EllipticCurvePrivateKey, bytes]]


def make_csr(
    serial: str = "SN1", key: ec.EllipticCurvePrivateKey | None = None, *, extensions: bool = False
) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"device {serial}")])
    )
    if extensions:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.DER)


@pytest.fixture
def csr_maker() -> CsrMaker:
    return make_csr


PRODUCTION_PASSWORD = "correct horse battery"
# Passed explicitly where tests make accounts in bulk: the appliance itself always hashes at the OWASP cost
# (users.OWASP_SCRYPT, about 0.5-1 s and 128 MiB each here), and CLI tests log in at that cost.
TEST_COST = ScryptCost(2**10, 8, 1)


@pytest.fixture(scope="session")
def production_journal_template(ca_journal_template: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA template plus a floor: tenant, product, line L1 with station fixture-1, and work order WO-1
    (active, 50 units) for SN-CRASH, SN-0000..SN-0099 and serials matching SN-[A-Z0-9-]+."""
    import time as _time

    from appliance.audit.log import AuditLog
    from appliance.production import store, users
    from appliance.production.allowlist import SerialRange
    from appliance.production.model import WorkOrderSpec
    from appliance.profiles import builtin_profiles

    path = tmp_path_factory.mktemp("floor") / "journal.sqlite"
    shutil.copy(ca_journal_template, path)
    with Journal(path) as journal:
        audit = AuditLog(journal)
        admin = users.bootstrap(journal, audit, "alice", PRODUCTION_PASSWORD, cost=TEST_COST)
        store.add_tenant(journal, audit, admin, "acme", "Acme Devices")
        store.add_product(journal, audit, admin, "sensor", tenant="acme", profile=builtin_profiles()["idevid"],
                          ca="issuing")  # fmt: skip
        store.add_line(journal, audit, admin, "L1")
        journal.call(journal.transaction, lambda conn: conn.execute(
            "INSERT INTO stations (name, kind, key, created_at) VALUES ('fixture-1', 'lan', ?, ?)",
            (bytes(32), _time.time())), "test station")  # fmt: skip
        store.assign_station(journal, audit, admin, "fixture-1", "L1")
        spec = WorkOrderSpec("WO-1", "sensor", 50, ("L1",), serials=("SN-CRASH",),
                             ranges=(SerialRange("SN-", 0, 99, 4),), pattern="SN-[A-Z0-9-]+")  # fmt: skip
        store.add_work_order(journal, audit, admin, spec, activate=True)
    return path


def put_on_line(journal: Journal, station: str, line: str = "L1") -> None:
    """Assign a registered station to a line of the production template, as its supervisor would."""
    from appliance.audit.log import AuditLog
    from appliance.production import store
    from appliance.production.users import Role, User

    store.assign_station(journal, AuditLog(journal), User("alice", Role.ADMINISTRATOR), station, line)


def daemon_state(root: Path, template: Path) -> Path:
    """A state directory (0700, as the daemon demands) holding a copy of the journal `template`."""
    root.mkdir(mode=0o700)
    shutil.copy(template, root / "journal.sqlite")
    return root


def write_daemon_config(
    path: Path, state: Path, token: SoftHsmToken, *, lan: str, va: str, extra: str = ""
) -> Path:
    """A `birthline run` configuration on `state` and the SoftHSM `token`: LAN and VA listeners at the given
    addresses ("" for none), no control socket, then `extra` TOML."""
    cfg = token.hsm_config()
    path.write_text(
        f'[appliance]\nstate_dir = "{state}"\n'
        f'[hsm]\nmodule = "{cfg.module}"\ntoken_label = "{cfg.token_label}"\npin_file = "{cfg.pin_file}"\n'
        f'softhsm_conf = "{cfg.softhsm_conf}"\n'
        f'[stations]\nlan_listen = "{lan}"\ntls_dir = "{state / "tls"}"\n[va]\nlisten = "{va}"\n'
        f"[control]\nenabled = false\n{extra}"
    )
    return path
