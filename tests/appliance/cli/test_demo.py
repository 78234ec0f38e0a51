"""`birthline demo` and the CLI, run as a user would: as subprocesses on a fresh state directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


def birthline(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", *map(str, args)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_demo_from_scratch_then_again(tmp_path: Path) -> None:
    state = tmp_path / "demo"
    first = birthline("demo", "--state", state, "--devices", "5")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "issued 5 birth certificates" in first.stdout
    assert "openssl verify -x509_strict: OK" in first.stdout
    assert "same certificate, byte for byte" in first.stdout
    chain = x509.load_pem_x509_certificates((state / "ca-chain.pem").read_bytes())
    assert [c.subject == c.issuer for c in chain] == [False, True]  # issuing first, then root
    issued = sorted((state / "issued").glob("*.pem"))
    assert len(issued) == 5
    cert = x509.load_pem_x509_certificate(issued[0].read_bytes())
    cert.verify_directly_issued_by(chain[0])
    # The demo profile is the IDevID profile with hardwareModuleName.
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [o.type_id.dotted_string for o in san.get_values_for_type(x509.OtherName)] == ["1.3.6.1.5.5.7.8.4"]
    assert cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)[0].value == issued[0].stem
    # The PIN is in a file only root can read, never in the config.
    toml = (state / "birthline.toml").read_text()
    pin = (state / "softhsm" / "user.pin").read_text().strip()
    assert pin not in toml and (state / "softhsm" / "user.pin").stat().st_mode & 0o077 == 0

    second = birthline("demo", "--state", state, "--devices", "3")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "run 2: issued 3" in second.stdout
    assert len(list((state / "issued").glob("*.pem"))) == 8

    cfg = state / "birthline.toml"
    listing = birthline("ca", "list", "--config", cfg, "--json")
    assert listing.returncode == 0, listing.stderr
    cas = {c["name"]: c for c in json.loads(listing.stdout)}
    assert cas["issuing"]["parent"] == "root" and cas["management"]["path_len"] == 0
    stats = birthline("journal", "stats", "--config", cfg)
    assert json.loads(stats.stdout)["states"] == {"confirmed": 8}  # every station confirmed what it stored
    stations = json.loads(birthline("station", "list", "--config", cfg, "--json").stdout)
    assert {(s["name"], s["kind"]) for s in stations} == {
        ("demo-serial", "serial"),
        ("demo-lan", "lan"),
        ("demo-cmp", "lan"),  # the station the CMP label acts as
    }

    # One more device through `birthline issue`, as a fixture script would.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    (tmp_path / "d.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    # Outside every work order: refused (and audited).
    outside = birthline(
        "issue", "--config", cfg, "--station", "demo-lan", "--serial", "CLI-1", "--csr", tmp_path / "d.csr"
    )
    assert outside.returncode == 2 and "not_authorised" in outside.stderr
    out = birthline("issue", "--config", cfg, "--station", "demo-lan", "--serial", "MYDEV-0099",
                    "--csr", tmp_path / "d.csr", "--out", tmp_path / "d.pem")  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert len(x509.load_pem_x509_certificates((tmp_path / "d.pem").read_bytes())) == 3
    refused = birthline(
        "issue",
        "--config",
        cfg,
        "--station",
        "demo-lan",
        "--serial",
        "CLI\x1b[2J",
        "--csr",
        tmp_path / "d.csr",
    )
    assert refused.returncode == 2 and "bad_device_serial" in refused.stderr
    assert "\x1b" not in refused.stderr  # terminal escapes never reach the operator's screen raw

    # Reconciliation and the audit log agree with what the stations did.
    report = json.loads(birthline("report", "workorder", "WO-0001", "--config", cfg, "--json").stdout)
    assert (report["planned"], report["issued"], report["confirmed"], report["remaining"]) == (5, 5, 5, 0)
    verify = birthline("audit", "verify", "--config", cfg)
    assert verify.returncode == 0 and "INTACT" in verify.stdout, verify.stdout + verify.stderr


def test_config_check_lists_problems_and_exits_2(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text('[hsm]\nmodule = "/x.so"\npin = "1234"\n[journal]\nbatch_max = -1\n')
    out = birthline("config", "check", "--config", cfg)
    assert out.returncode == 2
    for where in ("hsm.token_label", "hsm.pin", "journal.batch_max"):
        assert where in out.stderr


def test_served_demo_answers_stations_by_hand(tmp_path: Path) -> None:
    """`demo --serve`, then a fixture on each line as the README shows, then Ctrl-C."""
    import signal
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = tmp_path / "served"
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "demo", "--serve", "--state", str(state), "--devices", "2",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (state / "demo.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "demo.json never appeared"
            time.sleep(0.2)
        info = json.loads((state / "demo.json").read_text())
        assert info["listener"] == {**info["listener"], "host": "127.0.0.1", "port": port}
        by_name = {s["name"]: s for s in info["stations"]}
        serial, lan = by_name["demo-serial"], by_name["demo-lan"]
        out = tmp_path / "dev"
        first, last = info["device_serials"]["accepted"].split(" .. ")
        a = birthline("station-client", "enroll", "--port", serial["pty"], "--credentials", serial["credentials"],
                      "--serial", first, "--keygen", "--out", out)  # fmt: skip
        assert a.returncode == 0, a.stderr
        b = birthline("station-client", "enroll", "--host", lan["host"], "--credentials", lan["credentials"],
                      "--serial", last, "--keygen", "--out", out)  # fmt: skip
        c = birthline("station-client", "enroll", "--host", lan["host"], "--credentials", lan["credentials"],
                      "--serial", "NOT-ORDERED-1", "--keygen", "--out", out)  # fmt: skip
        assert c.returncode != 0 and "not" in c.stderr.lower()
        assert b.returncode == 0, b.stderr
        # A CMP device enrols over the demo's label with the real openssl cmp client (MAC, then certConf).
        cmp = info["cmp"]
        subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                        str(tmp_path / "c.key")], check=True)  # fmt: skip
        mid = f"{first[:-4]}{int(first[-4:]) + 1:04d}"
        enrolled = subprocess.run(
            ["openssl", "cmp", "-config", "", "-cmd", "ir", "-server", cmp["server"], "-path", cmp["path"],
             "-ref", cmp["kid"], "-secret", f"file:{cmp['secret_file']}", "-mac", cmp["mac"],
             "-recipient", "/CN=Birthline", "-newkey", str(tmp_path / "c.key"), "-subject", f"/serialNumber={mid}",
             "-certout", str(tmp_path / "c.pem")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
        got = x509.load_pem_x509_certificate((tmp_path / "c.pem").read_bytes())
        assert got.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value == mid

        # OCSP on the served VA, with the real openssl client, before and after a supervisor revokes.
        ocsp = ["openssl", "ocsp", "-issuer", str(state / "issuing.pem"), "-cert", str(out / f"{first}.pem"),
                "-url", info["ocsp_url"], "-CAfile", str(state / "root.pem")]  # fmt: skip
        good = subprocess.run(ocsp, capture_output=True, text=True, check=False)
        assert f"{first}.pem: good" in good.stdout and "Response verify OK" in good.stderr, (
            good.stdout + good.stderr
        )
        secret = info["supervisor"]["password_file"]
        with open(secret) as pw:
            revoked = subprocess.run(
                [sys.executable, "-m", "appliance.cli.main", "revoke", "--device", first, "--reason",
                 "keyCompromise", "--config", str(state / "birthline.toml"), "--user", "demo-supervisor",
                 "--password-stdin"], stdin=pw, capture_output=True, text=True, check=False,
            )  # fmt: skip
        assert revoked.returncode == 0, revoked.stderr
        deadline = time.monotonic() + 15
        while True:  # the daemon's responder sees another process's revocation within its poll interval
            answer = subprocess.run(ocsp, capture_output=True, text=True, check=False)
            if f"{first}.pem: revoked" in answer.stdout or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert f"{first}.pem: revoked" in answer.stdout, answer.stdout + answer.stderr
        chain = x509.load_pem_x509_certificates(Path(info["ca_chain"]).read_bytes())
        for name in (first, last):
            leaf = x509.load_pem_x509_certificates((out / f"{name}.pem").read_bytes())[0]
            leaf.verify_directly_issued_by(chain[0])
            assert (out / f"{name}.key").stat().st_mode & 0o077 == 0
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stdout + stderr


def test_served_demo_lists_its_console_and_keeps_fixtures_enrolling_gently(tmp_path: Path) -> None:
    """`demo --serve --gentle-rate`: demo.json names the control socket and the metrics URL; the simulated
    fixtures keep enrolling on both stations; a console pauses one (they are refused STATION_PAUSED while the
    other goes on) and resumes it."""
    import asyncio
    import signal
    import socket
    import stat
    import time
    import urllib.request

    from console.client import ControlClient

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    state = tmp_path / "gentle"
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "demo", "--serve", "--state", str(state), "--devices", "2",
         "--port", str(port), "--gentle-rate", "4"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        while not (state / "demo.json").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "demo.json never appeared"
            time.sleep(0.2)
        info = json.loads((state / "demo.json").read_text())
        sock = Path(info["control"]["socket"])
        assert (
            sock.is_absolute()
            and stat.S_ISSOCK(sock.stat().st_mode)
            and stat.S_IMODE(sock.stat().st_mode) == 0o660
        )
        with urllib.request.urlopen(info["metrics"]["url"], timeout=30) as r:  # noqa: S310 - our own loopback URL
            assert "# TYPE birthline_issued_total counter" in r.read().decode()
        password = Path(info["supervisor"]["password_file"]).read_text()

        async def console() -> dict[str, list[dict[str, object]]]:
            seen: dict[str, list[dict[str, object]]] = {"demo-serial": [], "demo-lan": []}
            async with ControlClient(sock) as api:
                await api.login(info["supervisor"]["user"], password)
                phase = "running"
                async with asyncio.timeout(120):
                    async for event in api.events():
                        station = str(event.get("station", ""))
                        if event["type"] in ("issued", "refused") and station in seen:
                            seen[station].append({**event, "phase": phase})
                        issued = {k: sum(1 for e in v if e["type"] == "issued" and e["phase"] == phase)
                                  for k, v in seen.items()}  # fmt: skip
                        if phase == "running" and min(issued.values()) >= 2:
                            await api.pause_station("demo-lan", "test")
                            phase = "paused"
                        elif (
                            phase == "paused"
                            and issued["demo-serial"] >= 3
                            and any(e["type"] == "refused" for e in seen["demo-lan"])
                        ):
                            await api.resume_station("demo-lan")
                            phase = "resumed"
                        elif phase == "resumed" and issued["demo-lan"] >= 2:
                            return seen
            raise AssertionError("the event stream ended")

        seen = asyncio.run(console())
        lan_paused = [e for e in seen["demo-lan"] if e["phase"] == "paused"]
        # A request already past the check when the pause was recorded may still be issued; after the first
        # refusal, every answer to the paused station is STATION_PAUSED until it is resumed.
        first = next(i for i, e in enumerate(lan_paused) if e["type"] == "refused")
        assert all(e["type"] == "refused" and e["code"] == "STATION_PAUSED" for e in lan_paused[first:])
        assert all(e["type"] == "issued" for e in seen["demo-serial"])
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    assert "enrol 4 device(s)/s" in stdout
