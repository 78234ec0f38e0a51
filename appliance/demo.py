"""`birthline demo`: the whole appliance on embedded defaults, in one directory.

A SoftHSM2 token, a root and an issuing CA (plus the management CA), a journal, and N devices enrolling with
P-256 keys they generate themselves. Every certificate is verified against the chain, and `openssl verify
-x509_strict` checks them all once more as an outside verifier would. Running it again adds N more devices and
shows that a retried request gets the stored certificate byte for byte.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance import ca as ca_mod
from appliance.config import load_config
from appliance.errors import BirthlineError
from appliance.issuance.policy import IssueRequest
from appliance.issuance.service import IssueResult
from appliance.runtime import open_core, running_issuer
from hsm.softhsm import create_softhsm_token

DEMO_ORG = "Birthline Demo"
# A private-enterprise arc for the demo's hwType; a manufacturer puts its own OID here.
DEMO_HW_TYPE = "1.3.6.1.4.1.59999.1.1"

CONFIG_TEMPLATE = """\
# Written by `birthline demo`. Every key is documented in docs/configuration.md.
[appliance]
state_dir = "{state}"

[hsm]
module = "{module}"
token_label = "{label}"
pin_file = "{pin_file}"
softhsm_conf = "{softhsm_conf}"

[journal]
path = "journal.sqlite"
batch_max = 128

[issuance]
issuing_ca = "issuing"
default_profile = "demo-idevid"

[profiles.demo-idevid]
base = "idevid"
subject_o = "{org}"
hardware_module_name = "{hw_type}"
"""


def _write_config(state: Path) -> Path:
    token = create_softhsm_token(state / "softhsm", label="birthline-demo")
    path = state / "birthline.toml"
    if not path.exists():
        path.write_text(
            CONFIG_TEMPLATE.format(
                state=state,
                module=token.module,
                label=token.label,
                pin_file=token.pin_file,
                softhsm_conf=token.conf_path,
                org=DEMO_ORG,
                hw_type=DEMO_HW_TYPE,
            )
        )
    return path


def _device_csr(serial: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.SERIAL_NUMBER, serial)]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.DER)


def _next_run(state: Path) -> int:
    marker = state / "demo-runs"
    run = int(marker.read_text()) + 1 if marker.exists() else 1
    marker.write_text(str(run))
    return run


def run_demo(state: Path, devices: int) -> int:
    state = state.resolve()
    state.mkdir(parents=True, exist_ok=True, mode=0o700)
    config = load_config(_write_config(state))
    with open_core(config) as core:
        names = {r.name for r in ca_mod.list_cas(core.journal)}
        if "root" not in names:
            ca_mod.create_root(core.journal, core.token, "root", f"O={DEMO_ORG},CN={DEMO_ORG} Root CA")
        if "issuing" not in names:
            ca_mod.create_issuing(
                core.journal,
                core.token,
                "issuing",
                f"O={DEMO_ORG},CN={DEMO_ORG} Birth Certificate CA",
                "root",
            )
        if "management" not in names:
            ca_mod.create_management(
                core.journal, core.token, "management", f"O={DEMO_ORG},CN={DEMO_ORG} Management CA"
            )
        issuing = core.issuing_ca()
        chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in issuing.chain)
        (state / "ca-chain.pem").write_bytes(chain_pem)

        run = _next_run(state)
        serials = [f"BLD{run:04d}{n:06d}" for n in range(1, devices + 1)]
        requests = []
        for s in serials:
            _key, csr = _device_csr(s)
            requests.append(IssueRequest(s, csr, station="demo", request_id=f"demo-{s}"))

        async def issue_all() -> tuple[list[IssueResult], float, IssueResult | None]:
            async with running_issuer(core) as service:
                t0 = time.perf_counter()
                results = await asyncio.gather(*(service.issue(r) for r in requests))
                elapsed = time.perf_counter() - t0
                retry = await service.issue(requests[0]) if requests else None
            return list(results), elapsed, retry

        try:
            results, elapsed, retry = asyncio.run(issue_all())
        except BirthlineError as exc:
            print(f"demo: issuance failed: {exc}")
            return 1

    issued_dir = state / "issued"
    issued_dir.mkdir(exist_ok=True)
    issuing_cert, *_ = issuing.chain
    files = []
    for res in results:
        cert = x509.load_der_x509_certificate(res.certificate)
        cert.verify_directly_issued_by(issuing_cert)
        f = issued_dir / f"{res.device_serial}.pem"
        f.write_bytes(res.certificate_pem)
        files.append(f)
    ok = _openssl_verify(state / "ca-chain.pem", files)
    same = retry is not None and retry.reused and retry.certificate == results[0].certificate
    rate = len(results) / elapsed if elapsed > 0 else 0.0
    print(
        f"Birthline demo, run {run}: issued {len(results)} birth certificates in {elapsed:.2f} s ({rate:.0f}/s)"
    )
    print(f"  CA chain:      {state / 'ca-chain.pem'} (issuing CA, then root)")
    print(
        f"  certificates:  {issued_dir}/<device-serial>.pem ({serials[0]} .. {serials[-1]})"
        if serials
        else ""
    )
    print(f"  journal:       {config.journal.path}")
    print(f"  verified:      {len(files)} against the chain in-process; openssl verify -x509_strict: {ok}")
    print(
        f"  retry of {serials[0] if serials else '-'}: {'same certificate, byte for byte' if same else 'MISMATCH'}"
    )
    return 0 if ok == "OK" and same else 1


def _openssl_verify(chain: Path, files: list[Path]) -> str:
    if not files:
        return "OK"
    openssl = shutil.which("openssl")
    if openssl is None:
        return "skipped (openssl not installed)"
    certs = x509.load_pem_x509_certificates(chain.read_bytes())
    root = chain.with_name("root.pem")
    untrusted = chain.with_name("issuing.pem")
    root.write_bytes(certs[-1].public_bytes(serialization.Encoding.PEM))
    untrusted.write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs[:-1]))
    proc = subprocess.run(
        [
            openssl,
            "verify",
            "-x509_strict",
            "-CAfile",
            str(root),
            "-untrusted",
            str(untrusted),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    good = sum(1 for line in proc.stdout.splitlines() if line.endswith(": OK"))
    return (
        "OK"
        if proc.returncode == 0 and good == len(files)
        else f"FAILED ({proc.stdout[-300:]}{proc.stderr[-300:]})"
    )
