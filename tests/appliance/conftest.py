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
