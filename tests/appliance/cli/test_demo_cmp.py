"""The served demo for CMP devices, as README shows it, with the real `openssl cmp`: a served demo starts on its
own state however many certificates in it are unconfirmed (issue 11 item 5), a device re-keys with kur signed by
its current certificate, and a device enrolled on the line gets its operational certificate by signing its ir
with its birth certificate (greenfield)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509

from tests.appliance.cli.test_demo import birthline
from tests.ports import free_ports


@contextmanager
def served(state: Path, port: int) -> Iterator[dict[str, Any]]:
    (state / "demo.json").unlink(missing_ok=True)
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "demo", "--serve", "--state", str(state), "--devices", "1",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not (state / "demo.json").exists():
            assert proc.poll() is None, proc.communicate()[0][-2000:]
            assert time.monotonic() < deadline, "demo.json never appeared"
            time.sleep(0.2)
        yield json.loads((state / "demo.json").read_text())
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, out[-2000:]


def _status(sock: Path) -> dict[str, Any]:
    import asyncio

    from console.client import ControlClient

    async def get() -> dict[str, Any]:
        async with ControlClient(sock) as api:
            return await api.status()

    return asyncio.run(get())


def _key(path: Path) -> Path:
    subprocess.run(
        ["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", str(path)], check=True
    )
    return path


def _cmp(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", "cmp", "-config", "", *map(str, args)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip


def test_served_demo_for_cmp_devices(tmp_path: Path) -> None:
    port = free_ports()  # the served demo binds port .. port + 5
    state = tmp_path / "demo"
    with served(state, port) as info:
        cmp = info["cmp"]
        mac = ["-server", cmp["server"], "-path", cmp["path"], "-ref", cmp["kid"], "-secret",
               f"file:{cmp['secret_file']}", "-mac", cmp["mac"], "-recipient", "/CN=Birthline"]  # fmt: skip
        # a client that never confirms leaves its certificate unconfirmed in the journal
        left = _cmp("-cmd", "ir", *mac, "-newkey", _key(tmp_path / "u.key"), "-subject", "/serialNumber=MYDEV-0090",
                    "-certout", tmp_path / "u.pem", "-disable_confirm")  # fmt: skip
        assert left.returncode == 0, left.stderr
        # The station the label acts as has no link: the console sees its kind and its answers, never
        # "disconnected".
        status = _status(Path(info["control"]["socket"]))
        everywhere = status["unassigned_stations"] + [
            st for line in status["lines"] for st in line["stations"]
        ]
        (station,) = [st for st in everywhere if st["name"] == "demo-cmp"]
        assert station["kind"] == "cmp" and station["state"] in ("issuing", "idle"), station
        assert station["last_issued_at"] is not None and station["issued"] >= 1, station
    # ... and the served demo starts on that state again (it refused before: "not every certificate was confirmed")
    with served(state, port) as info:
        cmp, field = info["cmp"], info["greenfield"]
        signed = ["-server", cmp["server"], "-path", cmp["path"], "-srvcert", cmp["ra_cert"]]
        # a device on the line, as README shows, with its birth certificate and key
        out = tmp_path / "dev"
        lan = {s["name"]: s for s in info["stations"]}["demo-lan"]
        enrolled = birthline("station-client", "enroll", "--host", lan["host"], "--credentials", lan["credentials"],
                             "--serial", "MYDEV-0001", "--keygen", "--out", out)  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
        idevid, idevid_key = out / "MYDEV-0001.pem", out / "MYDEV-0001.key"
        # greenfield: its operational certificate, signed with the birth certificate
        op = _cmp("-cmd", "ir", "-server", field["server"], "-path", field["path"], "-srvcert", cmp["ra_cert"],
                  "-cert", idevid, "-key", idevid_key, "-newkey", _key(tmp_path / "op.key"),
                  "-subject", "/serialNumber=MYDEV-0001", "-certout", tmp_path / "op.pem")  # fmt: skip
        assert op.returncode == 0, op.stderr
        operational = x509.load_pem_x509_certificate((tmp_path / "op.pem").read_bytes())
        assert "Operational CA" in operational.issuer.rfc4514_string()
        assert operational.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value == "MYDEV-0001"
        # ... issued by the operational CA's own issuance service, and seen by the console all the same
        status = _status(Path(info["control"]["socket"]))
        everywhere = status["unassigned_stations"] + [
            st for line in status["lines"] for st in line["stations"]
        ]
        (station,) = [st for st in everywhere if st["name"] == "demo-field"]
        assert station["issued"] >= 1 and station["last_device_serial"] == "MYDEV-0001", station
        # kur of the birth certificate, signed by it
        kur = _cmp("-cmd", "kur", *signed, "-cert", idevid, "-key", idevid_key, "-oldcert", idevid,
                   "-newkey", _key(tmp_path / "k2.key"), "-certout", tmp_path / "k2.pem")  # fmt: skip
        assert kur.returncode == 0, kur.stderr
        renewed = x509.load_pem_x509_certificate((tmp_path / "k2.pem").read_bytes())
        first = x509.load_pem_x509_certificates(idevid.read_bytes())[0]
        assert renewed.subject == first.subject and renewed.serial_number != first.serial_number
        # the old birth certificate is not the device's current one any more: it cannot update again
        again = _cmp("-cmd", "kur", *signed, "-cert", idevid, "-key", idevid_key, "-oldcert", idevid,
                     "-newkey", _key(tmp_path / "k3.key"), "-certout", tmp_path / "k3.pem")  # fmt: skip
        assert again.returncode != 0 and "notAuthorized" in again.stdout + again.stderr
