"""A daemon with [est] for the EST tests, and `curl` and `openssl` as the EST client (RFC 7030's own examples)."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs7

from appliance.config import Config, EstLabelSection, EstSection
from appliance.daemon import Daemon

PASSWORD = "fixture password"
USER = "fixture"


def est_config(cfg: Config, tmp_path: Path, **section: object) -> Config:
    """`cfg` with an EST listener on any free port: label "line1" (the default) acts as station fixture-1 with
    HTTP Basic; label "st" as station est-st (registered by the test) with its TLS client certificate."""
    secret = tmp_path / "est.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.write(fd, PASSWORD.encode() + b"\n")
    os.close(fd)
    labels = {
        "line1": EstLabelSection(station="fixture-1", username=USER, password_file=secret),
        "st": EstLabelSection(station="est-st", station_certificate=True),
        "cb": EstLabelSection(
            station="fixture-1", username=USER, password_file=secret, channel_binding="required"
        ),
        "kg": EstLabelSection(station="fixture-1", username=USER, password_file=secret, serverkeygen=True),
    }
    est = EstSection(listen="127.0.0.1:0", default_label="line1", labels=labels)
    return dataclasses.replace(cfg, est=dataclasses.replace(est, **section))  # type: ignore[arg-type]


@dataclass
class Answer:
    status: int
    body: bytes
    headers: str

    def certificates(self) -> list[x509.Certificate]:
        """The certs-only PKCS#7 of the body (base64 of DER), as `openssl pkcs7 -print_certs` reads it."""
        der = base64.b64decode(self.body)
        out = subprocess.run(["openssl", "pkcs7", "-inform", "DER", "-print_certs"], input=der,
                             capture_output=True, check=True).stdout  # fmt: skip
        assert pkcs7.load_der_pkcs7_certificates(der)
        return x509.load_pem_x509_certificates(out)

    @property
    def text(self) -> str:
        return self.body.decode()


class Curl:
    """curl against the daemon's EST listener, verifying the server against the management CA."""

    def __init__(self, d: Daemon, work: Path) -> None:
        assert d.est_server is not None
        self.base = f"{d.est_server.url}/.well-known/est"
        self.work = work
        self.ca = d.config.stations.tls_dir / "management-ca.crt"
        self.n = 0

    async def __call__(self, path: str, *args: str, body: bytes | None = None) -> Answer:
        self.n += 1
        out, head = self.work / f"out{self.n}", self.work / f"head{self.n}"
        argv = ["curl", "-sS", "--cacert", str(self.ca), "-o", str(out), "-D", str(head), "-w", "%{http_code}",
                *args]  # fmt: skip
        if body is not None:
            data = self.work / f"body{self.n}"
            data.write_bytes(body)
            argv += ["--data-binary", f"@{data}"]
            if not any(a.startswith("Content-Type") for a in args):
                argv += ["-H", "Content-Type: application/pkcs10"]
        proc = await asyncio.create_subprocess_exec(*argv, f"{self.base}/{path}", stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.PIPE)  # fmt: skip
        status, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        return Answer(int(status), out.read_bytes() if out.exists() else b"", head.read_text())

    def basic(self, user: str = USER, password: str = PASSWORD) -> tuple[str, str]:
        return ("-u", f"{user}:{password}")


def openssl_csr(work: Path, name: str, subject: str, key: Path | None = None) -> tuple[Path, bytes]:
    """A new key (or `key`) and its CSR from `openssl req`, as the base64 of DER an EST body carries."""
    key_path = key or work / f"{name}.key"
    argv = ["openssl", "req", "-new", "-subj", subject, "-outform", "DER", "-out", str(work / f"{name}.csr")]
    if key is None:
        argv += ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(key_path)]
    else:
        argv += ["-key", str(key)]
    subprocess.run(argv, check=True, capture_output=True)
    return key_path, base64.encodebytes((work / f"{name}.csr").read_bytes())


def write_pem(path: Path, cert: x509.Certificate) -> Path:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


async def station_status(d: Daemon, name: str) -> dict[str, Any]:
    """The station `name` as the control API's status document shows it (the daemon's own hub and journal)."""
    from appliance.control.status import StatusBuilder, StatusSources

    assert d.control is not None and d.core is not None
    c = d.control
    sources = StatusSources(
        d.config, d.journal, c.hub, d.core.alarms, c.service.pauses, c.sessions, c.snapshots
    )
    doc = await StatusBuilder(sources).document()
    everywhere = doc["unassigned_stations"] + [st for line in doc["lines"] for st in line["stations"]]
    (station,) = [st for st in everywhere if st["name"] == name]
    return dict(station)
