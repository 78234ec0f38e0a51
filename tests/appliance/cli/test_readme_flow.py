"""The README's "Setting up an appliance", run step by step on a fresh state (no demo), so the documented flow
cannot drift from the code: its configuration file (paths and ports moved into the test's directory, the
SoftHSM module of this machine), then its commands one by one (passwords on standard input), with `birthline
run` started as a daemon where the README starts it. A device is enrolled over each station kind the README
registers (serial over a socat pty pair standing in for the USB adapter, LAN over TLS); each certificate carries
the profile's CRL and OCSP URLs, verifies with `openssl verify` against `birthline ca chain`, and the CRL is
served at the URL it names."""

from __future__ import annotations

import json
import os
import pwd
import re
import shlex
import signal
import socket
import subprocess
import sys
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.x509.oid import AuthorityInformationAccessOID

from hsm.softhsm import find_softhsm_module
from stations.simulator import PtyPair

README = Path(__file__).resolve().parents[3] / "README.md"
PASSWORDS = {"alice": "alice password 1", "sam": "sam password 1"}
SECTION = re.compile(r"## Setting up an appliance\n(.*?)\n## ", re.S)


def _section() -> str:
    m = SECTION.search(README.read_text())
    assert m is not None
    return m.group(1)


def _block(lang: str) -> str:
    m = re.search(rf"```{lang}\n(.*?)```", _section(), re.S)
    assert m is not None, lang
    return m.group(1)


def _commands(paths: dict[str, str]) -> list[list[str]]:
    text = _block("sh").replace("\\\n", " ")
    commands = []
    for raw in text.splitlines():
        line = raw.split("  #", 1)[0].strip()
        for old, new in paths.items():
            line = line.replace(old, new)
        if line:
            commands.append(shlex.split(line))
    return commands


def _toml(doc: dict[str, Any]) -> str:
    """The few shapes the README's file has: tables (and one level of sub-tables) of strings and lists of them."""
    out = []

    def table(name: str, body: dict[str, Any]) -> None:
        out.append(f"[{name}]")
        out.extend(f"{k} = {json.dumps(v)}" for k, v in body.items() if not isinstance(v, dict))
        for k, v in body.items():
            if isinstance(v, dict):
                table(f"{name}.{k}", v)

    for name, body in doc.items():
        table(name, body)
    return "\n".join(out) + "\n"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _stdin(argv: list[str]) -> str:
    """What a person types: their own password, then a new user's password when one is created."""
    lines = []
    if "--user" in argv:
        lines.append(PASSWORDS[argv[argv.index("--user") + 1]])
    if argv[:2] == ["user", "add"]:
        lines.append(PASSWORDS[argv[2]])
    return "".join(f"{x}\n" for x in lines)


def _birthline(
    args: list[str], config: Path, cwd: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    if "--user" in args or args[:2] == ["user", "add"]:
        args = [*args, "--password-stdin"]
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", *args, "--config", str(config)],
        input=_stdin(args), capture_output=True, text=True, cwd=cwd, timeout=timeout, check=False,
    )  # fmt: skip


def _configuration(tmp_path: Path, lan_port: int, va_port: int) -> dict[str, Any]:
    """The README's file with this test's paths and loopback ports; everything else as written."""
    doc = tomllib.loads(_block("toml"))
    names = doc["appliance"]["names"]
    assert names and doc["profiles"]["sensor"]["base"] == "idevid"
    doc["appliance"]["state_dir"] = str(tmp_path / "state")
    doc["hsm"].update(
        module=find_softhsm_module(),
        pin_file=str(tmp_path / "hsm.pin"),
        softhsm_conf=str(tmp_path / "softhsm" / "softhsm2.conf"),  # SoftHSM's own file: this test's tokens
    )
    doc["stations"]["lan_listen"] = f"127.0.0.1:{lan_port}"
    doc["va"]["listen"] = f"127.0.0.1:{va_port}"
    sensor = doc["profiles"]["sensor"]
    readme_va = re.escape(f"http://{names[0]}:") + r"\d+"
    sensor["crl_urls"] = [re.sub(readme_va, f"http://127.0.0.1:{va_port}", u) for u in sensor["crl_urls"]]
    sensor["ocsp_url"] = re.sub(readme_va, f"http://127.0.0.1:{va_port}", sensor["ocsp_url"])
    return doc


def test_the_readme_setup_commissions_a_line_that_enrols_over_each_station_kind(tmp_path: Path) -> None:
    lan_port, va_port = _free_port(), _free_port()
    doc = _configuration(tmp_path, lan_port, va_port)
    config = tmp_path / "birthline.toml"
    config.write_text(_toml(doc))
    (tmp_path / "root").mkdir()
    serial_link, fixture_link = tmp_path / "L1-st1.appliance", tmp_path / "L1-st1.fixture"
    commands = _commands({
        "/dev/serial/by-path/pci-0000:00:14.0-usb-0:2:1.0-port0": str(serial_link),
        "/root/": f"{tmp_path / 'root'}/",
        # The daemon's user is this test's own: the check runs as it, the token is given to it.
        "sudo -u birthline birthline": "birthline",
        "--owner birthline": f"--owner {pwd.getpwuid(os.geteuid()).pw_name}",
    })  # fmt: skip
    assert [c[1] for c in commands[:3]] == ["hsm", "config", "init"]
    assert not (tmp_path / "state").exists()  # a fresh state: nothing of the demo

    daemon: subprocess.Popen[bytes] | None = None
    log = tmp_path / "daemon.log"
    out = ""
    with PtyPair(serial_link, fixture_link).start():
        try:
            for argv in commands:
                assert argv[0] == "birthline"
                args = [a for a in argv[1:] if a != "$C"]
                if args[0] == "run":
                    with log.open("w") as sink:
                        daemon = subprocess.Popen(
                            [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(config)],
                            cwd=tmp_path, stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT,
                        )  # fmt: skip
                    _enrol_over_each_kind(tmp_path, fixture_link, lan_port, doc)
                    daemon.send_signal(signal.SIGTERM)
                    daemon.wait(timeout=120)
                    assert daemon.returncode == 0, log.read_text()
                    continue
                proc = _birthline(args, config, tmp_path)
                assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
                out += proc.stdout
        finally:
            if daemon is not None and daemon.poll() is None:
                daemon.kill()
                daemon.wait()
    assert daemon is not None, "the README's block starts no daemon"
    # The report of the work order the block created: its two devices, one per station kind.
    report = _birthline(["report", "workorder", "WO-1001", "--json"], config, tmp_path)
    assert report.returncode == 0, report.stderr
    counts = json.loads(report.stdout)
    assert (counts["planned"], counts["issued"], counts["confirmed"], counts["revoked"]) == (500, 2, 2, 0), (
        counts
    )
    assert "INTACT" in out  # the auditor's verify with the pinned key


def _enrol_over_each_kind(tmp: Path, fixture_port: Path, lan_port: int, doc: dict[str, Any]) -> None:
    sensor = doc["profiles"]["sensor"]
    devices = tmp / "devices"
    enrolments = {
        "ACME-000001": ["--port", str(fixture_port), "--credentials", str(tmp / "root" / "L1-st1")],
        # The bundle points at the first of [appliance] names, a name only a LAN resolver knows; here the loopback
        # address the TLS certificate also carries (tests/appliance/test_network_names.py connects by the name).
        # So the bundle's station.json is pointed there, and the client (given neither --port nor --host) goes
        # where the bundle says, as the README has it.
        "ACME-000002": ["--credentials", str(tmp / "root" / "L1-st2")],
    }
    station_json = tmp / "root" / "L1-st2" / "station.json"
    bundle = json.loads(station_json.read_text())
    assert bundle["host"] == f"{doc['appliance']['names'][0]}:{lan_port}"
    bundle["host"] = f"127.0.0.1:{lan_port}"
    station_json.write_text(json.dumps(bundle))
    for serial, where in enrolments.items():
        proc = subprocess.run(
            [sys.executable, "-m", "appliance.cli.main", "station-client", "enroll", *where, "--serial", serial,
             "--keygen", "--out", str(devices), "--timeout", "120"],
            capture_output=True, text=True, timeout=200, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, (serial, proc.stdout, proc.stderr)
        cert = x509.load_pem_x509_certificates((devices / f"{serial}.pem").read_bytes())[0]
        # The profile's URLs are in the certificate, and they answer.
        dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
        assert [n.value for dp in dps for n in dp.full_name or ()] == sensor["crl_urls"]
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
        assert [
            d.access_location.value for d in aia if d.access_method == AuthorityInformationAccessOID.OCSP
        ] == [sensor["ocsp_url"]]
        verify = subprocess.run(
            ["openssl", "verify", "-CAfile", str(tmp / "chain.pem"), str(devices / f"{serial}.pem")],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert verify.returncode == 0 and ": OK" in verify.stdout, verify.stdout + verify.stderr
    with urllib.request.urlopen(sensor["crl_urls"][0], timeout=60) as r:  # noqa: S310 (loopback, the test's VA)
        crl = x509.load_der_x509_crl(r.read())
    issuing = x509.load_pem_x509_certificates((tmp / "chain.pem").read_bytes())[0]
    assert crl.issuer == issuing.subject
