"""The daemon starts the CMP server from [cmp] and `openssl cmp` enrols against it; the config checks labels."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.config import CmpLabelSection, CmpSection, parse_config
from appliance.daemon import Daemon
from appliance.errors import ConfigError
from hsm.softhsm import SoftHsmToken
from tests.appliance.test_daemon import _config

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")


async def test_daemon_serves_cmp_on_its_label(
    softhsm_token: SoftHsmToken, production_journal_template: Path, tmp_path: Path
) -> None:
    secret = tmp_path / "line1.secret"
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"daemon secret\n")
    os.close(fd)
    cfg = _config(tmp_path / "state", softhsm_token, production_journal_template)
    label = CmpLabelSection(station="fixture-1", secret_file=secret)
    cfg = dataclasses.replace(cfg, cmp=CmpSection(listen="127.0.0.1:0", labels={"line1": label}))
    key = tmp_path / "dev.key"
    key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))  # fmt: skip
    async with Daemon(cfg) as d:
        assert d.cmp_server is not None
        port = d.cmp_server.address[1]
        proc = await asyncio.create_subprocess_exec(
            "openssl", "cmp", "-config", "", "-cmd", "ir", "-server", f"127.0.0.1:{port}",
            "-path", ".well-known/cmp/p/line1", "-ref", "line1", "-secret", "pass:daemon secret",
            "-mac", "hmacWithSHA256", "-recipient", "/CN=x", "-newkey", str(key), "-subject", "/serialNumber=SN-0007",
            "-certout", str(tmp_path / "out.pem"), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, (out + err).decode()
        cert = x509.load_pem_x509_certificate((tmp_path / "out.pem").read_bytes())
        rows = d.journal.rows("device_serial=?", ("SN-0007",))
        assert rows[0].state == "confirmed" and rows[0].cert_der == cert.public_bytes(
            serialization.Encoding.DER
        )
        assert (tmp_path / "state" / "tls" / "cmp-ra.pem").exists()


def test_cmp_config_is_checked(tmp_path: Path) -> None:
    base = {"hsm": {"module": "m", "token_label": "t", "pin_file": "p"}}
    wide = tmp_path / "wide.secret"
    wide.write_bytes(b"s")
    wide.chmod(0o644)
    with pytest.raises(ConfigError) as info:
        parse_config({**base, "cmp": {"listen": "nowhere", "default_label": "zz", "labels": {
            "a": {"station": "s1", "secret": "inline"},
            "b": {"station": "s2", "secret_file": str(wide), "allow_rr": "yes"},
            "c": {"profile": "nope", "station_signature": True},
        }}})  # fmt: skip
    where = {p.where for p in info.value.problems}
    assert {"cmp.listen", "cmp.default_label", "cmp.labels.a.secret", "cmp.labels.a", "cmp.labels.b.secret_file",
            "cmp.labels.b.allow_rr", "cmp.labels.c.station", "cmp.labels.c.profile"} <= where, where  # fmt: skip
    good = tmp_path / "good.secret"
    good.write_bytes(b"s")
    good.chmod(0o600)
    cfg = parse_config({**base, "cmp": {"listen": "127.0.0.1:7452", "labels": {
        "line1": {"station": "s1", "secret_file": str(good), "allow_nested": True}}}})  # fmt: skip
    assert cfg.cmp.address == ("127.0.0.1", 7452) and cfg.cmp.labels["line1"].allow_nested
