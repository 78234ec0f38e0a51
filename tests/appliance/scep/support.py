"""A daemon serving SCEP on loopback, challenges made as a supervisor would, and the real clients run against it:
micromdm's scepclient (Debian package scep) and certmonger's SCEP helper through certmonger itself on a private
D-Bus session (its helper submits only what the daemon built)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from appliance.audit.log import AuditLog
from appliance.config import ScepLabelSection, ScepSection
from appliance.daemon import Daemon
from appliance.production.users import Role, User
from appliance.scep import challenges
from hsm.softhsm import SoftHsmToken
from tests.appliance.test_daemon import _config

SCEPCLIENT = shutil.which("scepclient")
SUPERVISOR = User("alice", Role.ADMINISTRATOR)


@dataclass
class Served:
    daemon: Daemon
    url: str  # http://127.0.0.1:PORT/scep/<label>
    tmp: Path

    @property
    def port(self) -> int:
        assert self.daemon.scep_server is not None
        return self.daemon.scep_server.address[1]

    def challenge(self, label: str = "line1", **kw: object) -> str:
        journal = self.daemon.journal
        _, secret = challenges.add(journal, AuditLog(journal), SUPERVISOR, label, **kw)  # type: ignore[arg-type]
        return secret

    @property
    def ra_cert(self) -> x509.Certificate:
        assert self.daemon.scep is not None
        return self.daemon.scep.ra.certificate


def scep_config(
    softhsm_token: SoftHsmToken, template: Path, tmp: Path, labels: dict[str, ScepLabelSection] | None = None
) -> object:
    cfg = _config(tmp / "state", softhsm_token, template)
    labels = labels or {"line1": ScepLabelSection(station="fixture-1")}
    return dataclasses.replace(cfg, scep=ScepSection(listen="127.0.0.1:0", labels=labels))


@asynccontextmanager
async def served(
    softhsm_token: SoftHsmToken, template: Path, tmp: Path, labels: dict[str, ScepLabelSection] | None = None,
    **replace: object,
) -> AsyncIterator[Served]:  # fmt: skip
    cfg = scep_config(softhsm_token, template, tmp, labels)
    if replace:
        cfg = dataclasses.replace(cfg, **replace)  # type: ignore[type-var]
    async with Daemon(cfg) as d:  # type: ignore[arg-type]
        assert d.scep_server is not None
        yield Served(d, f"{d.scep_server.url}/scep/line1", tmp)


def rsa_key_file(path: Path, bits: int = 2048) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                       serialization.NoEncryption()))  # fmt: skip
    return key


async def run(argv: Sequence[str], *, timeout: float = 120.0, cwd: Path | None = None) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=cwd
    )
    out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    return proc.returncode or 0, out.decode(errors="replace")


async def scepclient(
    url: str, workdir: Path, *, challenge: str = "", cn: str = "scepclient", fingerprint: str | None = None,
    certificate: Path | None = None, key: Path | None = None, extra: Sequence[str] = (),
) -> tuple[int, str]:  # fmt: skip
    """Run micromdm's scepclient as a fixture vendor would: its key, CSR and certificate files in `workdir`."""
    assert SCEPCLIENT is not None
    workdir.mkdir(parents=True, exist_ok=True)
    argv = [SCEPCLIENT, "-server-url", url, "-private-key", str(key or workdir / "device.key"), "-cn", cn]
    if challenge:
        argv += ["-challenge", challenge]
    if fingerprint:
        argv += ["-ca-fingerprint", fingerprint]
    if certificate is not None:
        argv += ["-certificate", str(certificate)]
    return await run([*argv, *extra])


def ra_fingerprint(cert: x509.Certificate) -> str:
    from cryptography.hazmat.primitives import hashes

    return cert.fingerprint(hashes.SHA256()).hex()


def env_with(**values: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(values)
    return env


CERTMONGER = shutil.which("certmonger")
DBUS_RUN_SESSION = shutil.which("dbus-run-session")


async def certmonger(script: str, workdir: Path, *, timeout: float = 180.0) -> tuple[int, str]:
    """Run `script` (sh, with getcert -s commands) inside certmonger on a D-Bus session of its own, with every
    file certmonger keeps under `workdir` (its CERTMONGER_* directories): nothing of the machine's own
    certmonger is touched. certmonger exits when the script does."""
    assert CERTMONGER is not None and DBUS_RUN_SESSION is not None
    dirs = {name: workdir / name.lower() for name in ("REQUESTS", "CAS", "LOCAL_CA", "TMP", "CONFIG")}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    env = env_with(
        CERTMONGER_REQUESTS_DIR=str(dirs["REQUESTS"]), CERTMONGER_CAS_DIR=str(dirs["CAS"]),
        CERTMONGER_LOCAL_CA_DIR=str(dirs["LOCAL_CA"]), CERTMONGER_TMPDIR=str(dirs["TMP"]),
        CERTMONGER_CONFIG_DIR=str(dirs["CONFIG"]), CERTMONGER_SYSTEM_LOCK_FILE=str(workdir / "lock"),
        XDG_CONFIG_HOME=str(workdir / "xdg"), XDG_DATA_HOME=str(workdir / "xdg"), HOME=str(workdir),
    )  # fmt: skip
    (workdir / "script.sh").write_text("set -x\n" + script)
    proc = await asyncio.create_subprocess_exec(
        DBUS_RUN_SESSION, "--", CERTMONGER, "-s", "-n", "-c", f"/bin/sh {workdir / 'script.sh'}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        os.killpg(proc.pid, 9)  # the session we started: dbus-daemon, certmonger, its helpers
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")
