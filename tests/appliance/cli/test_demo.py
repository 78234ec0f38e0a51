"""`birthline demo` and the CLI, run as a user would: as subprocesses on a fresh state directory."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.ports import free_ports


def birthline(*args: str | Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", *map(str, args)],
        input=stdin, capture_output=True, text=True, timeout=120, check=False,
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
    # The journal holds station keys and password hashes: it and its WAL files are the owner's only.
    _assert_private(state)

    # A demo state left by an older version (journal 0644, directory 0755): the demo makes its own state private.
    (state / "journal.sqlite").chmod(0o644)
    state.chmod(0o755)
    second = birthline("demo", "--state", state, "--devices", "3")
    _assert_private(state)
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
        ("demo-field", "lan"),  # the station the greenfield CMP label acts as
        ("demo-scep", "lan"),  # the station the SCEP labels act as
        ("demo-est", "lan"),  # the station the EST label acts as
    }

    # One more device through `birthline issue`: a person (the demo's supervisor) acting as a station.
    key = ec.generate_private_key(ec.SECP256R1())
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())
    (tmp_path / "d.csr").write_bytes(csr.public_bytes(serialization.Encoding.PEM))
    secret = (state / "demo-users.secret").read_text()

    def issue(
        serial: str, *more: str | Path, user: str = "demo-supervisor"
    ) -> subprocess.CompletedProcess[str]:
        return birthline("issue", "--config", cfg, "--station", "demo-lan", "--serial", serial,
                         "--csr", tmp_path / "d.csr", *more, "--user", user, "--password-stdin",
                         stdin=secret + "\n")  # fmt: skip

    # Nobody, or a person whose role does not run the line, mints nothing.
    nobody = birthline("issue", "--config", cfg, "--station", "demo-lan", "--serial", "MYDEV-0098",
                       "--csr", tmp_path / "d.csr", stdin="")  # fmt: skip
    assert nobody.returncode == 2 and "--user" in nobody.stderr
    admin = issue("MYDEV-0098", user="demo-admin")
    assert admin.returncode == 2 and "may not issue" in admin.stderr, admin.stderr
    # Outside every work order: refused (and audited).
    outside = issue("CLI-1")
    assert outside.returncode == 2 and "not_authorised" in outside.stderr
    out = issue("MYDEV-0099", "--out", tmp_path / "d.pem")
    assert out.returncode == 0, out.stderr
    assert len(x509.load_pem_x509_certificates((tmp_path / "d.pem").read_bytes())) == 3
    refused = issue("CLI\x1b[2J")
    assert refused.returncode == 2 and "argument --serial: device serial" in refused.stderr
    assert "\x1b" not in refused.stderr  # terminal escapes never reach the operator's screen raw

    # Reconciliation and the audit log agree with what the stations did.
    report = json.loads(birthline("report", "workorder", "WO-0001", "--config", cfg, "--json").stdout)
    assert (report["planned"], report["issued"], report["confirmed"], report["remaining"]) == (5, 5, 5, 0)
    verify = birthline("audit", "verify", "--config", cfg)
    assert verify.returncode == 0 and "INTACT" in verify.stdout, verify.stdout + verify.stderr


def _assert_private(state: Path) -> None:
    modes = {p.name: p.stat().st_mode & 0o777 for p in state.glob("journal.sqlite*")}
    assert "journal.sqlite" in modes and set(modes.values()) == {0o600}, modes
    secrets = [state / "demo-users.secret", state / "softhsm" / "user.pin", *state.glob("stations/*/*.key")]
    assert {p.stat().st_mode & 0o777 for p in secrets} == {0o600}
    assert state.stat().st_mode & 0o777 == 0o700


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
    import time

    port = free_ports()  # the served demo binds port .. port + 5
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
        # Serving: SQLite keeps journal.sqlite-wal and -shm open beside the journal, all three private.
        assert {p.name for p in state.glob("journal.sqlite*")} >= {"journal.sqlite-wal", "journal.sqlite-shm"}
        _assert_private(state)
        assert info["listener"] == {**info["listener"], "host": "127.0.0.1", "port": port}
        by_name = {s["name"]: s for s in info["stations"]}
        serial, lan = by_name["demo-serial"], by_name["demo-lan"]
        # The configuration file and the bundles describe the appliance being served, not a default port, so a
        # fixture reading its bundle and an administrator using the file reach this demo.
        import tomllib

        cfg = tomllib.loads((state / "birthline.toml").read_text())
        assert cfg["stations"]["lan_listen"] == f"127.0.0.1:{port}"
        assert (
            cfg["va"]["listen"] == f"127.0.0.1:{port + 1}" and cfg["cmp"]["listen"] == f"127.0.0.1:{port + 2}"
        )
        assert cfg["profiles"]["demo-idevid"]["ocsp_url"] == info["ocsp_url"]
        for name in ("demo-lan", "demo-cmp"):
            bundle = json.loads((state / "stations" / name / "station.json").read_text())
            assert bundle["host"] == f"127.0.0.1:{port}"
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

        # EST as docs/est.md shows it, the commands as written (the demo's state, port and a scratch directory
        # put in): cacerts, csrattrs, simpleenroll with HTTP Basic and with the station's TLS certificate, then
        # simplereenroll, and the renewed certificate verifies against the chain.
        est = info["est"]
        assert (
            est["url"] == f"https://127.0.0.1:{port + 4}/.well-known/est"
            and cfg["est"]["listen"] == est["server"]
        )
        assert all(
            Path(est[k]).is_file() for k in ("tls_ca", "password_file", "station_tls_cert", "station_tls_key")
        )
        doc = (Path(__file__).parents[3] / "docs" / "est.md").read_text()
        script = doc.split("## Try it", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
        script = script.replace("/tmp/", f"{tmp_path}/")  # first: the state directory is under /tmp too
        script = script.replace("demo-state", str(state)).replace("7454", str(port + 4))
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=300,
                             check=False)  # fmt: skip
        assert ran.returncode == 0, ran.stdout + ran.stderr
        assert (
            "Birthline Demo Birth Certificate CA" in ran.stdout
            and f"{tmp_path}/est1-new.pem: OK" in ran.stdout
        )
        renewed = x509.load_pem_x509_certificates((tmp_path / "est1-new.pem").read_bytes())[0]
        assert renewed.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value == "MYDEV-0011"
        assert (tmp_path / "est2.pem").exists()
        readme = (Path(__file__).parents[3] / "README.md").read_text()
        script = readme.split("speaks EST", 1)[1].split("```sh\n", 1)[1].split("```", 1)[0]
        script = script.replace("/tmp/", f"{tmp_path}/")
        script = script.replace("demo-state", str(state)).replace("7454", str(port + 4))
        ran = subprocess.run(["bash", "-euo", "pipefail", "-c", script], capture_output=True, text=True, timeout=300,
                             check=False)  # fmt: skip
        assert ran.returncode == 0 and "Birthline Demo Birth Certificate CA" in ran.stdout, (
            ran.stdout + ran.stderr
        )
        readme_cert = x509.load_pem_x509_certificates((tmp_path / "est3.pem").read_bytes())[0]
        assert readme_cert.subject.get_attributes_for_oid(x509.NameOID.SERIAL_NUMBER)[0].value == "MYDEV-0013"

        # Greenfield as the README shows it: the birth certificate signs an ir on label "field" for an operational
        # certificate; an operational certificate is no birth certificate there (review finding 3: the label's
        # idevid_roots is the birth certificates' issuing CA, not the root that also certifies the operational
        # CA); the birth certificate updates its key there with its chain in extraCerts (review finding 1).
        green = info["greenfield"]
        assert green["idevid_roots"] == str(state / "issuing.pem")

        def field(*args: str | Path) -> subprocess.CompletedProcess[str]:
            return subprocess.run(["openssl", "cmp", "-config", "", "-server", green["server"], "-path", green["path"],
                                   "-srvcert", cmp["ra_cert"], *map(str, args)],
                                  capture_output=True, text=True, check=False)  # fmt: skip

        for name in ("op", "op2", "new"):
            subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                            str(tmp_path / f"{name}.key")], check=True)  # fmt: skip
        birth, birth_key = out / f"{last}.pem", out / f"{last}.key"
        op = field("-cmd", "ir", "-cert", birth, "-key", birth_key, "-newkey", tmp_path / "op.key",
                   "-subject", f"/serialNumber={last}", "-certout", tmp_path / "op.pem", "-chainout",
                   tmp_path / "op-chain.pem")  # fmt: skip
        assert op.returncode == 0, op.stdout + op.stderr
        again = field("-cmd", "ir", "-cert", tmp_path / "op.pem", "-key", tmp_path / "op.key", "-extracerts",
                      tmp_path / "op-chain.pem", "-newkey", tmp_path / "op2.key", "-subject", f"/serialNumber={last}",
                      "-certout", tmp_path / "op2.pem")  # fmt: skip
        assert again.returncode != 0 and "signerNotTrusted" in again.stdout + again.stderr, again.stdout
        kur = field("-cmd", "kur", "-cert", birth, "-key", birth_key, "-oldcert", birth, "-extracerts",
                    state / "issuing.pem", "-newkey", tmp_path / "new.key", "-certout", tmp_path / "new.pem")  # fmt: skip
        assert kur.returncode == 0, kur.stdout + kur.stderr

        # OCSP on the served VA, with the real openssl client, before and after a supervisor revokes.
        ocsp = ["openssl", "ocsp", "-issuer", str(state / "issuing.pem"), "-cert", str(out / f"{first}.pem"),
                "-url", info["ocsp_url"], "-CAfile", str(state / "root.pem")]  # fmt: skip
        good = subprocess.run(ocsp, capture_output=True, text=True, check=False)
        assert f"{first}.pem: good" in good.stdout and "Response verify OK" in good.stderr, (
            good.stdout + good.stderr
        )
        # Nobody mints a certificate from the command line without logging in as a person with the role, and
        # the daemon's own jobs are refused while it runs (the served demo holds the daemon lock).
        (tmp_path / "k.csr").write_bytes(
            x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .sign(ec.generate_private_key(ec.SECP256R1()), hashes.SHA256())
            .public_bytes(serialization.Encoding.PEM)
        )  # fmt: skip
        cfg = state / "birthline.toml"
        for who in ([], ["--user", "demo-supervisor"]):
            minted = subprocess.run(
                [sys.executable, "-m", "appliance.cli.main", "issue", "--station", "demo-lan", "--serial",
                 "MYDEV-0077", "--csr", str(tmp_path / "k.csr"), "--config", str(cfg), *who],
                stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120, check=False,
            )  # fmt: skip
            assert minted.returncode == 2 and "Traceback" not in minted.stderr, minted.stderr
        with closing(sqlite3.connect(f"file:{state / 'journal.sqlite'}?mode=ro", uri=True)) as db:
            assert db.execute(
                "SELECT COUNT(*) FROM issuance WHERE device_serial='MYDEV-0077'"
            ).fetchone() == (0,)
        for job in (["crl", "generate"], ["upstream", "sync", "--once"], ["init"]):
            refused = birthline(*job, "--config", cfg)
            assert refused.returncode == 2, refused.stderr
            assert "refused while the daemon runs" in refused.stderr
            # Which process holds the state: its command line and pid.
            assert (
                "the daemon `" in refused.stderr
                and " demo --serve " in refused.stderr
                and "(pid " in refused.stderr
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
    import stat
    import time
    import urllib.request

    from console.client import ControlClient

    port = free_ports()  # the served demo binds port .. port + 5
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


def test_a_paused_station_stays_paused_across_demo_runs_and_the_cli_resumes_it(tmp_path: Path) -> None:
    """A station left paused is the daemon's state: the next demo run keeps it paused and enrols through the other
    station; `station pause|resume` (no daemon running) is audited under the person; a run that fails leaves no
    new active work order behind."""
    import socket

    from appliance.daemon_lock import DaemonLock

    state = tmp_path / "demo"
    assert birthline("demo", "--state", state, "--devices", "2").returncode == 0
    cfg = state / "birthline.toml"
    pw = (state / "demo-users.secret").read_text() + "\n"
    login = ("--config", cfg, "--user", "demo-supervisor", "--password-stdin")
    paused = birthline(
        "station", "pause", "--name", "demo-lan", "--reason", "after restart", *login, stdin=pw
    )
    assert paused.returncode == 0, paused.stdout + paused.stderr
    again = birthline("station", "pause", "--name", "demo-lan", *login, stdin=pw)
    assert again.returncode != 0 and "already paused" in again.stdout + again.stderr

    second = birthline("demo", "--state", state, "--devices", "3")
    assert second.returncode == 0, second.stdout + second.stderr
    assert "station demo-lan is paused" in second.stdout and "run 2: issued 3" in second.stdout
    with closing(sqlite3.connect(state / "journal.sqlite")) as db:
        stations = db.execute("SELECT DISTINCT station FROM issuance WHERE device_serial LIKE 'BLD0002%'")
        assert stations.fetchall() == [
            ("demo-serial",)
        ]  # the devices and the retry, all on the one not paused
        assert db.execute("SELECT paused_by, reason FROM station_pause").fetchall() == [
            ("demo-supervisor", "after restart")
        ]

    # While a daemon runs, the pause is its state: the CLI sends the person to the console.
    with DaemonLock(state, "a test daemon"):
        busy = birthline("station", "resume", "--name", "demo-lan", *login, stdin=pw)
    assert busy.returncode != 0 and "console" in busy.stdout + busy.stderr
    resumed = birthline("station", "resume", "--name", "demo-lan", *login, stdin=pw)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr

    # A served run that cannot start (its port is taken) closes the work orders it made.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        failed = birthline("demo", "--state", state, "--devices", "2", "--serve", "--gentle-rate", "1",
                           "--port", port)  # fmt: skip
    assert failed.returncode == 1, failed.stdout + failed.stderr
    with closing(sqlite3.connect(state / "journal.sqlite")) as db:
        assert db.execute("SELECT id, state FROM work_order WHERE id LIKE '%0003'").fetchall() == [
            ("WO-0003", "closed"), ("WO-GENTLE-0003", "closed")
        ]  # fmt: skip
        events = db.execute("SELECT actor, event FROM audit WHERE event LIKE 'station.%'").fetchall()
    assert ("demo-supervisor", "station.pause") in events and ("demo-supervisor", "station.resume") in events
