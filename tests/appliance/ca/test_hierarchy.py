"""The CA hierarchy, keys in the session's SoftHSM token; the external root is the real openssl CLI."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from appliance import ca as ca_mod
from appliance.ca import CaError, identity
from appliance.ca.identity import IdentityError
from appliance.issuance.journal import Journal
from hsm.algorithms import KeyAlgorithm
from hsm.token import Token


def _name() -> str:
    return f"ca-{uuid.uuid4().hex[:8]}"


def _check_ca_profile(cert: x509.Certificate, path_len: int | None) -> None:
    bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca and bc.value.path_length == path_len
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign and not ku.value.digital_signature
    ski = cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(cert.public_key())  # type: ignore[arg-type]
    cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier)


def test_root_and_issuing_on_the_appliance(journal: Journal, hsm_token: Token) -> None:
    root = ca_mod.load_ca(journal, "root")
    issuing = ca_mod.load_ca(journal, "issuing")
    _check_ca_profile(root.certificate, 1)
    _check_ca_profile(issuing.certificate, 0)
    issuing.certificate.verify_directly_issued_by(root.certificate)
    root.certificate.verify_directly_issued_by(root.certificate)
    aki = issuing.certificate.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert (
        aki.key_identifier == x509.SubjectKeyIdentifier.from_public_key(root.certificate.public_key()).digest
    )  # type: ignore[arg-type]
    assert [c.subject for c in issuing.chain] == [issuing.certificate.subject, root.certificate.subject]
    # The key is in the HSM under the recorded label and is the certificate's.
    key = hsm_token.get_key(issuing.key_label)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert key.public_key().public_bytes(*spki) == issuing.certificate.public_key().public_bytes(*spki)
    assert issuing.certificate.not_valid_after_utc.year == 9999


@pytest.mark.parametrize("alg", [KeyAlgorithm.EC_P384, KeyAlgorithm.RSA_2048])
def test_other_algorithms(journal: Journal, hsm_token: Token, alg: KeyAlgorithm) -> None:
    r, i = _name(), _name()
    root = ca_mod.create_root(journal, hsm_token, r, f"CN={r}", alg)
    issuing = ca_mod.create_issuing(journal, hsm_token, i, f"CN={i}", r, alg)
    issuing.certificate.verify_directly_issued_by(root.certificate)


def test_management_ca_is_a_separate_root_that_cannot_sign_cas(journal: Journal, hsm_token: Token) -> None:
    name = _name()
    mgmt = ca_mod.create_management(journal, hsm_token, name, f"CN={name}")
    _check_ca_profile(mgmt.certificate, 0)
    assert mgmt.role == "management" and mgmt.certificate.issuer == mgmt.certificate.subject
    with pytest.raises(CaError, match="cannot sign an issuing CA"):
        ca_mod.create_issuing(journal, hsm_token, _name(), "CN=x", name)


def test_duplicate_name_refused(journal: Journal, hsm_token: Token) -> None:
    with pytest.raises(CaError, match="already exists"):
        ca_mod.create_root(journal, hsm_token, "root", "CN=again")


def test_issuing_ca_with_pathlen_zero_cannot_sign_another_ca(journal: Journal, hsm_token: Token) -> None:
    with pytest.raises(CaError, match="pathLen 0"):
        ca_mod.create_issuing(journal, hsm_token, _name(), "CN=x", "issuing")


def _openssl(*args: str | Path) -> None:
    out = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr


@pytest.fixture
def external_root(tmp_path: Path) -> tuple[Path, Path]:
    """An offline root made by the openssl CLI, as an air-gapped root ceremony would."""
    key, cert = tmp_path / "root.key", tmp_path / "root.pem"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _openssl(
        "req", "-x509", "-new", "-key", key, "-subj", "/O=Acme/CN=Acme Offline Root", "-days", "3650", "-out", cert,
        "-addext", "basicConstraints=critical,CA:TRUE,pathlen:1",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return key, cert


def _sign_as_ca(tmp_path: Path, csr: Path, root_key: Path, root_cert: Path) -> Path:
    ext = tmp_path / "ext.cnf"
    ext.write_text(
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n"
        "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    )
    out = tmp_path / "issuing.pem"
    _openssl(
        "x509", "-req", "-in", csr, "-CA", root_cert, "-CAkey", root_key, "-CAcreateserial",
        "-days", "3000", "-sha256", "-extfile", ext, "-out", out,
    )  # fmt: skip
    return out


def test_external_root_signs_the_csr_and_import_activates(
    journal: Journal, hsm_token: Token, tmp_path: Path, external_root: tuple[Path, Path]
) -> None:
    name = _name()
    rec, pem = ca_mod.create_csr_for_external_root(journal, hsm_token, name, "/O=Acme/CN=Acme Birth CA 7")
    assert rec.state == "awaiting-certificate"
    csr = x509.load_pem_x509_csr(pem)
    assert csr.is_signature_valid  # signed in the HSM
    with pytest.raises(CaError, match="no certificate yet"):
        _ = rec.certificate
    csr_file = tmp_path / "issuing.csr"
    csr_file.write_bytes(pem)
    signed = _sign_as_ca(tmp_path, csr_file, *external_root)
    active = ca_mod.import_ca_certificate(
        journal, hsm_token, name, signed.read_bytes(), external_root[1].read_bytes()
    )
    assert active.state == "active"
    assert active.chain[-1].subject.rfc4514_string() == "CN=Acme Offline Root,O=Acme"
    with pytest.raises(CaError, match="only a CA awaiting"):
        ca_mod.import_ca_certificate(
            journal, hsm_token, name, signed.read_bytes(), external_root[1].read_bytes()
        )


def test_import_refuses_a_certificate_for_another_key(
    journal: Journal, hsm_token: Token, tmp_path: Path, external_root: tuple[Path, Path]
) -> None:
    name = _name()
    ca_mod.create_csr_for_external_root(journal, hsm_token, name, "/CN=mine")
    other_key = tmp_path / "other.key"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", other_key)
    other_csr = tmp_path / "other.csr"
    _openssl("req", "-new", "-key", other_key, "-subj", "/CN=mine", "-out", other_csr)
    signed = _sign_as_ca(tmp_path, other_csr, *external_root)
    with pytest.raises(CaError, match="public key is not the HSM key"):
        ca_mod.import_ca_certificate(
            journal, hsm_token, name, signed.read_bytes(), external_root[1].read_bytes()
        )
    assert ca_mod.load_ca(journal, name).state == "awaiting-certificate"


def test_import_refuses_a_chain_that_does_not_verify(
    journal: Journal, hsm_token: Token, tmp_path: Path, external_root: tuple[Path, Path]
) -> None:
    name = _name()
    _, pem = ca_mod.create_csr_for_external_root(journal, hsm_token, name, "/CN=mine2")
    csr_file = tmp_path / "c.csr"
    csr_file.write_bytes(pem)
    signed = _sign_as_ca(tmp_path, csr_file, *external_root)
    impostor_dir = tmp_path / "impostor"
    impostor_dir.mkdir()
    key, cert = impostor_dir / "k", impostor_dir / "c"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _openssl(
        "req", "-x509", "-new", "-key", key, "-subj", "/O=Acme/CN=Acme Offline Root", "-days", "10", "-out", cert,
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    with pytest.raises(CaError, match="is not signed by"):
        ca_mod.import_ca_certificate(journal, hsm_token, name, signed.read_bytes(), cert.read_bytes())


def test_import_refuses_a_non_ca_certificate(
    journal: Journal, hsm_token: Token, tmp_path: Path, external_root: tuple[Path, Path]
) -> None:
    name = _name()
    _, pem = ca_mod.create_csr_for_external_root(journal, hsm_token, name, "/CN=leafy")
    csr_file = tmp_path / "c.csr"
    csr_file.write_bytes(pem)
    out = tmp_path / "leaf.pem"
    _openssl(
        "x509", "-req", "-in", csr_file, "-CA", external_root[1], "-CAkey", external_root[0], "-CAcreateserial",
        "-days", "30", "-out", out,
    )  # fmt: skip
    with pytest.raises(CaError, match=r"not a CA certificate|no basicConstraints"):
        ca_mod.import_ca_certificate(
            journal, hsm_token, name, out.read_bytes(), external_root[1].read_bytes()
        )


def test_list_shows_the_hierarchy(journal: Journal) -> None:
    names = [(r.name, r.role, r.parent) for r in ca_mod.list_cas(journal)]
    assert ("root", "root", None) in names and ("issuing", "issuing", "root") in names


@pytest.fixture
def demo_root(tmp_path: Path) -> tuple[Path, Path]:
    """A root carrying the demo's name, as `birthline demo` makes one."""
    key, cert = tmp_path / "demo-root.key", tmp_path / "demo-root.pem"
    _openssl("ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key)
    _openssl(
        "req", "-x509", "-new", "-key", key, "-subj", "/O=Birthline Demo/CN=Birthline Demo Root", "-days", "30",
        "-out", cert, "-addext", "basicConstraints=critical,CA:TRUE,pathlen:1",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return key, cert


def test_import_refuses_a_clean_name_under_the_demos_root(
    journal: Journal, hsm_token: Token, tmp_path: Path, demo_root: tuple[Path, Path]
) -> None:
    """Review finding 6: only the imported certificate's own name was checked, not the chain above it."""
    name = _name()
    _, pem = ca_mod.create_csr_for_external_root(journal, hsm_token, name, "/O=Acme/CN=Acme Birth CA 9")
    csr_file = tmp_path / "issuing.csr"
    csr_file.write_bytes(pem)
    signed = _sign_as_ca(tmp_path, csr_file, *demo_root)
    with pytest.raises(IdentityError) as info:
        ca_mod.import_ca_certificate(journal, hsm_token, name, signed.read_bytes(), demo_root[1].read_bytes())
    assert "--chain certificate 1: have your organisation's own root sign it" in str(info.value)
    assert "--subject" not in str(info.value)
    assert ca_mod.load_ca(journal, name).state == "awaiting-certificate"


@pytest.mark.parametrize(
    "spelling", ["Birthline-Demo", "Birthline_Demo", "BirthlineDemo", "birthline.demo", "Birthline D\u0435mo",
                 "\uff22irthline Demo", "Birthline D\u00e9mo"],
)  # fmt: skip
def test_the_demos_name_is_refused_however_spelt(journal: Journal, hsm_token: Token, spelling: str) -> None:
    """Review finding 6: separators, case, a Cyrillic е or a full-width letter passed."""
    assert identity.is_demo_name(spelling)
    with pytest.raises(IdentityError, match="is the demo's name"):
        identity.check_organisation(spelling)
    with pytest.raises(IdentityError, match=r"names are the demo's; give your organisation's \(--subject"):
        ca_mod.create_root(journal, hsm_token, _name(), f"/O=Acme/CN={spelling} Root")
    with pytest.raises(IdentityError, match=r"\(--subject\)$"):
        ca_mod.create_csr_for_external_root(journal, hsm_token, _name(), f"/O={spelling}/CN=Acme Birth CA")
    assert not identity.is_demo_name("Acme Devices") and not identity.is_demo_name("Birthline Dome")


def test_requesting_an_existing_ca_name_says_what_to_do(journal: Journal, hsm_token: Token) -> None:
    """Review finding 7: `ca request --name management` after `init` said only that the name exists."""
    name = _name()
    ca_mod.create_management(journal, hsm_token, name, f"CN={name}")
    with pytest.raises(CaError) as info:
        ca_mod.create_csr_for_external_root(
            journal, hsm_token, name, "/O=Acme/CN=Acme Mgmt", role="management"
        )
    text = str(info.value)
    assert (
        f"a CA named {name!r} already exists (management, active): request this one under a new name" in text
    )
    assert "set [stations] management_ca to it and run `birthline init` again" in text


def test_a_missing_ca_says_how_to_make_it(journal: Journal) -> None:
    """Review finding 12: `birthline run` before `ca init-issuing` said only "no CA named 'issuing'"."""
    with pytest.raises(CaError) as info:
        ca_mod.load_ca(journal, "no-such-ca")
    assert info.value.message.startswith("no CA named 'no-such-ca': make it (`birthline ca init-root`, then")
    assert "`birthline ca init-issuing` for the issuing CA" in info.value.message
