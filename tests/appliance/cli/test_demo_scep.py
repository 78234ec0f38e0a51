"""The README's SCEP commands against a served demo, exactly as written (only the port and the /tmp folders
moved into the test's own): GetCACaps with curl, one device enrolled with micromdm's scepclient and one with
certmonger, which then re-keys it."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from appliance.issuance.journal import Journal
from tests.appliance.cli.test_demo_cmp import served
from tests.ports import free_ports

README = Path(__file__).resolve().parents[3] / "README.md"

pytestmark = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("scepclient", "certmonger", "dbus-run-session", "curl")),
    reason="scep, certmonger, dbus or curl not installed",
)


def _serial(path: Path) -> str:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return str(cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value)


def test_readme_scep_commands_on_the_served_demo(tmp_path: Path) -> None:
    block = re.search(r"<!-- scep-by-hand -->\n```sh\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    port = free_ports()  # the served demo binds port .. port + 5
    script = block.group(1).replace("7455", str(port + 5)).replace("/tmp/scep-", f"{tmp_path}/scep-")
    with served(tmp_path / "demo-state", port) as info:
        assert info["scep"]["url"] == f"http://127.0.0.1:{port + 5}/scep/scep"
        run = subprocess.run(["bash", "-e", "-c", script], cwd=tmp_path, capture_output=True, text=True,
                             timeout=300, check=False)  # fmt: skip
        out = run.stdout + run.stderr
        assert run.returncode == 0, out
    assert "AES" in run.stdout and "SHA-256" in run.stdout  # GetCACaps
    assert _serial(tmp_path / "scep-dev" / "client.pem") == "MYDEV-0030"
    assert (tmp_path / "scep-dev" / "dev.key").stat().st_mode & 0o077 == 0  # the device key is private
    assert (tmp_path / "scep-dev").stat().st_mode & 0o077 == 0
    assert _serial(tmp_path / "scep-cm" / "dev.pem") == "MYDEV-0031"
    assert "status: MONITORING" in run.stdout, out
    with Journal(tmp_path / "demo-state" / "journal.sqlite") as journal:
        rows = journal.call(lambda: journal.conn.execute(
            "SELECT device_serial, station, state, updates IS NOT NULL FROM issuance"
            " WHERE device_serial IN ('MYDEV-0030', 'MYDEV-0031') ORDER BY id").fetchall())  # fmt: skip
    # One certificate by scepclient, and certmonger's first and its re-key, linked to the first.
    assert [tuple(r) for r in rows] == [
        ("MYDEV-0030", "demo-scep", "confirmed", 0),
        ("MYDEV-0031", "demo-scep", "confirmed", 0),
        ("MYDEV-0031", "demo-scep", "confirmed", 1),
    ]
