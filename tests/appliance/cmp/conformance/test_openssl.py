"""The real `openssl cmp` (OpenSSL 3.0) client, unmodified, against the server for every operation it has: ir,
cr, p10cr, kur, rr and genm caCerts, with certConf and with implicitConfirm, MAC- and signature-protected.
kur and rr need a signature (RFC 9483 4.1.3, 4.2): under MAC they are refused, and openssl says why."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.appliance.cmp.conformance.peer import PEM, SECRET, Peer

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


async def _openssl(peer: Peer, label: str, *args: str | Path) -> tuple[int, str]:
    cmd = ["openssl", "cmp", "-config", "", "-server", f"127.0.0.1:{peer.port}", "-path",
           f".well-known/cmp/p/{label}", "-msg_timeout", "10", "-total_timeout", "30", *map(str, args)]  # fmt: skip
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return int(proc.returncode or 0), out.decode() + err.decode()


def _write(peer: Peer, name: str, obj: ec.EllipticCurvePrivateKey | x509.Certificate) -> Path:
    path = peer.tmp / name
    if isinstance(obj, x509.Certificate):
        path.write_bytes(obj.public_bytes(PEM))
    else:
        path.write_bytes(
            obj.private_bytes(PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return path


@pytest.mark.parametrize("protection", ["mac", "signature"])
async def test_every_openssl_cmp_operation(peer: Peer, protection: str) -> None:
    ra_pem = _write(peer, "ra.pem", peer.ra_cert)
    if protection == "mac":
        label, auth = "mac", ["-ref", "mac", "-secret", f"pass:{SECRET.decode()}", "-mac", "hmacWithSHA256",
                              "-recipient", "/CN=Birthline"]  # fmt: skip
    else:
        assert peer.station.tls_cert_pem is not None and peer.station.tls_key_pem is not None
        (peer.tmp / "st.pem").write_bytes(peer.station.tls_cert_pem)
        (peer.tmp / "st.key").write_bytes(peer.station.tls_key_pem)
        label, auth = "signed", ["-cert", str(peer.tmp / "st.pem"), "-key", str(peer.tmp / "st.key"),
                                 "-srvcert", str(ra_pem)]  # fmt: skip
    base = 800 if protection == "mac" else 850

    def dev(n: int) -> list[str | Path]:
        key = _write(peer, f"dev{n}.key", ec.generate_private_key(ec.SECP256R1()))
        return [
            "-newkey",
            key,
            "-subject",
            f"/serialNumber=SN-0{base + n}",
            "-certout",
            peer.tmp / f"dev{n}.pem",
        ]

    rc, said = await _openssl(peer, label, "-cmd", "ir", *auth, *dev(1))  # with certConf
    assert rc == 0 and "sending CERTCONF" in said, said
    rc, said = await _openssl(peer, label, "-cmd", "cr", *auth, *dev(2), "-implicit_confirm")
    assert rc == 0 and "sending CERTCONF" not in said, said
    csr_key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(x509.NameOID.SERIAL_NUMBER, f"SN-0{base + 3}")])).sign(csr_key, hashes.SHA256())  # fmt: skip
    (peer.tmp / "dev3.csr").write_bytes(csr.public_bytes(PEM))
    rc, said = await _openssl(peer, label, "-cmd", "p10cr", *auth, "-csr", peer.tmp / "dev3.csr",
                              "-certout", peer.tmp / "dev3.pem")  # fmt: skip
    assert rc == 0 and "sending CERTCONF" in said, said
    rc, said = await _openssl(peer, label, "-cmd", "genm", *auth, "-infotype", "caCerts")
    assert rc == 0, said
    for n in (1, 2, 3):
        assert (
            peer.state(x509.load_pem_x509_certificate((peer.tmp / f"dev{n}.pem").read_bytes()))[0]
            == "confirmed"
        )

    # kur of dev1 and rr of dev2, each signed with the device's own certificate
    dev1 = [*_device(peer, 1), "-oldcert", peer.tmp / "dev1.pem"]
    new = _write(peer, "dev1-new.key", ec.generate_private_key(ec.SECP256R1()))
    if protection == "mac":
        # the same operations MAC-protected: refused with the reason (a key update and a revocation are signed)
        rc, said = await _openssl(peer, label, "-cmd", "kur", *auth, "-oldcert", peer.tmp / "dev1.pem",
                                  "-newkey", new, "-certout", peer.tmp / "x.pem")  # fmt: skip
        assert rc != 0 and "wrongIntegrity" in said, said
        rc, said = await _openssl(peer, label, "-cmd", "rr", *auth, "-oldcert", peer.tmp / "dev2.pem")
        assert rc != 0 and "wrongIntegrity" in said, said
        return
    rc, said = await _openssl(peer, label, "-cmd", "kur", *dev1, "-srvcert", ra_pem, "-newkey", new,
                              "-certout", peer.tmp / "dev1-new.pem")  # fmt: skip
    assert rc == 0 and "sending CERTCONF" in said, said
    renewed = x509.load_pem_x509_certificate((peer.tmp / "dev1-new.pem").read_bytes())
    assert peer.state(renewed)[0] == "confirmed" and peer.state(renewed)[1] is not None
    rc, said = await _openssl(peer, label, "-cmd", "rr", *_device(peer, 2), "-oldcert", peer.tmp / "dev2.pem",
                              "-srvcert", ra_pem, "-revreason", "4")  # fmt: skip
    assert rc == 0, said
    assert peer.revoked(x509.load_pem_x509_certificate((peer.tmp / "dev2.pem").read_bytes())) == "superseded"


def _device(peer: Peer, n: int) -> list[str | Path]:
    return ["-cert", peer.tmp / f"dev{n}.pem", "-key", peer.tmp / f"dev{n}.key"]
