"""The crash campaign's EST and SCEP clients (bench/chaos.py runs them beside the stations and CMP clients).

- EST: stations/est.py (the project's fixture client, Python's http.client over TLS) on label `chaos-est`, HTTP
  Basic with the label's password: simpleenroll for a new device; for every fourth device, once it holds its
  certificate, simplereenroll with a new key, authenticated by that certificate as the TLS client certificate.
  A request a kill interrupted is sent again, the same CSR (simpleenroll) or a CSR for the same new key with the
  same old certificate (simplereenroll): it must get the certificate the journal stored, never a second one.
- SCEP: micromdm's `scepclient` (Debian package scep) on label `chaos-scep` with a work-order challenge, the
  device serial in the CN; scepclient keeps the device's RSA key in a file, so a run a kill interrupted is run
  again with the same key (and so the same SCEP transactionID): the stored certificate comes back.
Each certificate received goes through Campaign.received (the same byte-for-byte checks as every client's).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from stations.client import generate_device_key, key_pem
from stations.errors import StationError
from stations.est import EstClient, EstRefused

if TYPE_CHECKING:
    from bench.chaos import Campaign, Device

EST_LABEL = "chaos-est"
EST_STATION = "est-st"
SCEP_LABEL = "chaos-scep"
SCEP_STATION = "scep-st"
DER = serialization.Encoding.DER
PEM = serialization.Encoding.PEM


def _renews(dev: Device) -> bool:
    return int(dev.serial[-8:]) % 4 == 0


async def est_client(c: Campaign) -> None:
    """simpleenroll new devices; simplereenroll every fourth one once; interrupted requests sent again first."""
    work = c.root / "est"
    work.mkdir(exist_ok=True)
    url = f"https://127.0.0.1:{c.est}/.well-known/est/{EST_LABEL}"
    password = c.est_password.read_bytes().strip()
    mine = c.owned("est")
    while not c.stopping:
        enrol = next((d for d in c.devices.values() if d.serial in mine and d.cert is None), None)
        renew = next((d for d in c.devices.values() if d.serial in mine and d.cert is not None and _renews(d)
                      and d.serial not in c.renewed), None)  # fmt: skip
        if enrol is None and renew is None and c.finishing:
            return
        dev = enrol or renew
        if dev is None:
            dev = c.new_device()
            mine.add(dev.serial)
        c.in_flight += 1
        try:
            if dev.cert is None:
                client = EstClient(
                    url, cafile=c.management_pem, username=EST_LABEL, password=password, timeout_s=20
                )
                with client:
                    der = (await asyncio.to_thread(client.simpleenroll, dev.csr)).public_bytes(DER)
                c.received(dev, der, "est simpleenroll")
                c.tally.ops["est-enroll"] += 1
                c.completed += 1
            else:
                new_key = c.renew_keys.setdefault(dev.serial, generate_device_key())
                cert_file, key_file = work / f"{dev.serial}.crt", work / f"{dev.serial}.key"
                cert_file.write_bytes(x509.load_der_x509_certificate(dev.cert).public_bytes(PEM))
                key_file.write_bytes(key_pem(dev.key))
                client = EstClient(url, cafile=c.management_pem, cert=cert_file, key=key_file, timeout_s=20)
                current = x509.load_der_x509_certificate(dev.cert)
                with client:
                    der = (await asyncio.to_thread(client.reenroll, new_key, current)).public_bytes(DER)
                c.renewal(dev, der, new_key)
                c.tally.ops["est-reenroll"] += 1
                c.completed += 1
        except EstRefused as exc:
            c.tally.ops["est-refused"] += 1
            c.last_cmp_failure = f"est: {exc}"
            await asyncio.sleep(0.2)
        except (StationError, OSError) as exc:  # the daemon killed under it, most likely
            c.last_cmp_failure = f"est: {exc}"
            await asyncio.sleep(0.2)
        finally:
            c.in_flight -= 1


async def scep_client(c: Campaign) -> None:
    """scepclient for a new device (its RSA key made by scepclient and kept); an interrupted one run again."""
    work = c.root / "scep"
    work.mkdir(exist_ok=True)
    mine = c.owned("scep")
    fingerprint = ""
    while not c.stopping:
        if not fingerprint:
            # The SCEP RA certificate the daemon made at its first start (in the token, kept across restarts).
            ra = c.state / "tls" / "scep-ra.pem"
            if ra.exists():
                fingerprint = hashlib.sha256(x509.load_pem_x509_certificate(ra.read_bytes()).public_bytes(DER)
                                             ).hexdigest()  # fmt: skip
            else:
                await asyncio.sleep(0.2)
                continue
        dev = next((d for d in c.devices.values() if d.serial in mine and d.cert is None), None)
        if dev is None and c.finishing:
            return
        if dev is None:
            dev = c.new_device()
            mine.add(dev.serial)
        folder = work / dev.serial
        folder.mkdir(exist_ok=True)
        key = folder / "device.key"
        if not key.exists():
            # Made here and renamed into place: scepclient writes its own key in place, and a kill during that
            # leaves an empty file it cannot read again (so the retry would never send the same key).
            draft = folder / "device.key.new"
            draft.write_bytes(await asyncio.to_thread(_rsa_key_pem))  # off the loop the other clients share
            draft.rename(key)
        for name in (
            "client.pem",
            "csr.pem",
            "self.pem",
        ):  # whatever a killed run left: made again from the key
            (folder / name).unlink(missing_ok=True)
        out = folder / "client.pem"
        c.in_flight += 1
        try:
            rc, said = await _run(
                "scepclient", "-server-url", f"http://127.0.0.1:{c.scep}/scep/{SCEP_LABEL}", "-private-key",
                str(key), "-cn", dev.serial, "-challenge", c.scep_challenge,
                "-ca-fingerprint", fingerprint, cwd=folder,
            )  # fmt: skip
        finally:
            c.in_flight -= 1
        if rc != 0 or not out.exists():
            if "badRequest" in said or "badAlg" in said:
                c.tally.ops["scep-refused"] += 1
            c.last_cmp_failure = f"scep: {said[-300:]}"
            await asyncio.sleep(0.2)
            continue
        cert = x509.load_pem_x509_certificate(out.read_bytes())
        c.received(dev, cert.public_bytes(DER), "scepclient")
        dev.confirmed = True
        c.tally.ops["scep"] += 1
        c.completed += 1


async def _run(*argv: str, cwd: Path, timeout: float = 60.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except (TimeoutError, asyncio.CancelledError):
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


def _rsa_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(
        PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
    )
