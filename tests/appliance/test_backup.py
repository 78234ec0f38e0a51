"""`birthline backup` and `birthline restore` (appliance/backup.py), run as an administrator would: subprocesses on
a real demo state, a real daemon issuing while the backup is taken, real SoftHSM, real SQLite files."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import pwd
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest
from cryptography import x509

from appliance.daemon_lock import DaemonLock, running
from stations.client import StationClient, client_ssl_context, generate_device_key, make_csr, read_station_key
from tests.ports import free_ports


def birthline(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli.main", *map(str, args)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip


def _wait_for(
    what: str,
    ok: object,
    proc: subprocess.Popen[str] | None = None,
    timeout_s: float = 120,
    failed: list[str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not ok():  # type: ignore[operator]
        assert not [f for f in failed or () if f.startswith("station failed")], failed
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what}: the process exited: {proc.communicate()}")
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.1)


def _listening(port: int) -> bool:
    with closing(socket.socket()) as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _stop(proc: subprocess.Popen[str], sig: int = signal.SIGINT) -> None:
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _enrol(
    bundle: Path, port: int, serials: Iterator[str], stop: threading.Event, done: list[str]
) -> None:
    client = await StationClient.connect_tcp(
        "127.0.0.1", port, station_id=bundle.name, key=read_station_key(bundle / "station.key"),
        ssl_context=client_ssl_context(bundle / "tls-client.crt", bundle / "tls-client.key", bundle / "ca.crt"),
        server_hostname="localhost",
    )  # fmt: skip
    try:
        for serial in serials:
            if stop.is_set():
                break
            chain = await client.enroll(serial, make_csr(generate_device_key(), serial))
            assert chain
            done.append(serial)
    except BaseException as exc:  # the waits below show why the station stopped, not only that it did
        done.append(f"station failed: {exc!r}")
        raise
    finally:
        await client.close()


def _certificates(journal: Path) -> dict[str, bytes]:
    with closing(sqlite3.connect(f"file:{journal}?mode=ro", uri=True)) as db:
        rows = db.execute("SELECT cert_serial, cert_der FROM issuance WHERE cert_der IS NOT NULL").fetchall()
    return {serial: bytes(der) for serial, der in rows}


@pytest.mark.slow
def test_a_backup_taken_while_the_daemon_issues_restores_elsewhere_verifies_and_issues(
    tmp_path: Path,
) -> None:
    port = free_ports()  # the served demo binds port .. port + 5
    live = tmp_path / "live"
    demo = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "demo", "--serve", "--state", str(live), "--devices", "2",
         "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    enrolled: list[str] = []
    stop = threading.Event()
    try:
        _wait_for("demo.json", (live / "demo.json").exists, demo)
        serials = (f"MYDEV-{i:04d}" for i in range(1, 80))
        station = threading.Thread(
            target=lambda: asyncio.run(_enrol(live / "stations" / "demo-lan", port, serials, stop, enrolled))
        )
        station.start()
        _wait_for("three enrolments", lambda: len(enrolled) >= 3, demo, failed=enrolled)
        before = len(enrolled)
        assert running(live) is not None  # the daemon holds its lock: the backup is of a live state
        taken = birthline("backup", "--config", live / "birthline.toml", "--out", tmp_path / "live.tgz")
        after = len(enrolled)
        assert taken.returncode == 0, taken.stderr
        assert "state/journal.sqlite: online snapshot" in taken.stdout
        # The station went on enrolling across the backup: nothing waited for it.
        # (or on to its last serial: on a quiet machine it can enrol all 79 while the backup runs)
        _wait_for("two more enrolments", lambda: len(enrolled) >= min(after + 2, 79), demo, failed=enrolled)
        stop.set()
        station.join(60)
        assert not station.is_alive()
    finally:
        stop.set()
        _stop(demo)
    assert demo.returncode == 0, demo.communicate()

    # Nothing secret of the PIN kind went into the archive: not as a file, not as bytes in any file.
    pin = (live / "softhsm" / "user.pin").read_text().strip()
    so_pin = (live / "softhsm" / "so.pin").read_text().strip()
    with tarfile.open(tmp_path / "live.tgz") as tar:
        names = tar.getnames()
        blobs = [tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()]  # type: ignore[union-attr]
    assert names[0] == "MANIFEST.json" and "state/journal.sqlite" in names
    assert not [n for n in names if n.endswith((".pin", "-wal", "-shm", "daemon.lock"))]
    assert not [b for b in blobs if pin.encode() in b or so_pin.encode() in b]
    assert (tmp_path / "live.tgz").stat().st_mode & 0o777 == 0o600

    # Restored onto a fresh state directory at another path: the configuration and softhsm2.conf follow it.
    fresh = tmp_path / "restored"
    got = birthline(
        "restore", tmp_path / "live.tgz", "--config", fresh / "birthline.toml", "--state-dir", fresh
    )
    assert got.returncode == 0, got.stderr
    assert f"put it in {fresh}/softhsm/user.pin" in got.stdout
    config = fresh / "birthline.toml"
    assert (
        str(live) not in config.read_text()
        and str(live) not in (fresh / "softhsm" / "softhsm2.conf").read_text()
    )
    assert not (fresh / "softhsm" / "user.pin").exists()
    shutil.copy(live / "softhsm" / "user.pin", fresh / "softhsm" / "user.pin")

    # A snapshot of a live log ends, as the live log did at that instant, in entries the daemon had not signed
    # yet (it checkpoints every N entries or T seconds): no problem, within the log's own stated bound. The
    # restored daemon signs them when it starts (a `start` checkpoint), below.
    verified = birthline("audit", "verify", "--config", config, "--json")
    audit = json.loads(verified.stdout)
    assert verified.returncode in (0, 3) and audit["ok"] is True, verified.stdout + verified.stderr
    assert audit["status"] in ("intact", "unsigned-tail")
    # The snapshot is one instant of the journal: every enrolment finished before the backup started is in it,
    # none that started after it ended, and each certificate it holds is the original's, byte for byte.
    report = json.loads(birthline("report", "workorder", "WO-HAND", "--config", config, "--json").stdout)
    assert before <= report["issued"] <= after + 1, (before, report, after)
    assert report["consistent"] is True and report["planned"] == 100, report  # the reconciliation agrees
    restored, original = _certificates(fresh / "journal.sqlite"), _certificates(live / "journal.sqlite")
    assert restored.items() <= original.items()
    # Fewer than the live journal's, unless the station had enrolled its last serial before the snapshot.
    assert len(restored) < len(original) or (len(enrolled) == 79 and report["issued"] == 79), report
    # An issuance in flight at that instant is an intent in the copy (no certificate): the restored daemon burns it
    # when it starts, as after a crash, and its serial is never used again.
    states = json.loads(birthline("journal", "stats", "--config", config).stdout)["states"]
    assert sum(n for state, n in states.items() if state not in ("intent", "burned")) == len(restored)

    # The restored appliance starts and issues the next device.
    daemon = subprocess.Popen(
        [sys.executable, "-m", "appliance.cli.main", "run", "--config", str(config)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    more: list[str] = []
    try:
        _wait_for("the restored daemon's LAN listener", lambda: _listening(port), daemon)
        asyncio.run(
            _enrol(fresh / "stations" / "demo-lan", port, iter(["MYDEV-0099"]), threading.Event(), more)
        )
    finally:
        _stop(daemon, signal.SIGTERM)
    assert more == ["MYDEV-0099"], daemon.communicate()
    assert "intent" not in json.loads(birthline("journal", "stats", "--config", config).stdout)["states"]
    after_run = json.loads(birthline("report", "workorder", "WO-HAND", "--config", config, "--json").stdout)
    assert after_run["issued"] == report["issued"] + 1
    issuing = x509.load_pem_x509_certificates((fresh / "ca-chain.pem").read_bytes())[0]
    new = [der for serial, der in _certificates(fresh / "journal.sqlite").items() if serial not in restored]
    assert len(new) == 1
    x509.load_der_x509_certificate(new[0]).verify_directly_issued_by(issuing)
    verified = birthline("audit", "verify", "--config", config)
    assert verified.returncode == 0 and "INTACT" in verified.stdout, verified.stdout + verified.stderr


@pytest.fixture(scope="module")
def demo_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    state = tmp_path_factory.mktemp("backup") / "state"
    made = birthline("demo", "--state", state, "--devices", "3")
    assert made.returncode == 0, made.stdout + made.stderr
    return state


@pytest.fixture(scope="module")
def archive(demo_state: Path) -> Path:
    out = demo_state.parent / "state.tgz"
    taken = birthline("backup", "--config", demo_state / "birthline.toml", "--out", out)
    assert taken.returncode == 0, taken.stderr
    return out


def test_backup_refuses_a_bad_target_and_writes_nothing(
    demo_state: Path, archive: Path, tmp_path: Path
) -> None:
    config = demo_state / "birthline.toml"
    for out, says in (
        (archive, "exists: give a new file name"),
        (demo_state / "inside.tgz", "keep the archive outside the state"),
        (demo_state / "softhsm" / "tokens" / "x.tgz", "keep the archive outside the state"),
        (tmp_path / "no" / "such" / "dir.tgz", "is not a directory"),
    ):
        before = archive.read_bytes()
        refused = birthline("backup", "--config", config, "--out", out)
        assert refused.returncode == 2 and says in refused.stderr, (out, refused.stderr)
        assert archive.read_bytes() == before and not (demo_state / "inside.tgz").exists()
    assert not list(demo_state.parent.glob(".*staging*"))
    bad = tmp_path / "bad.toml"
    bad.write_text(
        f'[appliance]\nstate_dir = "{tmp_path / "none"}"\n[hsm]\nmodule = "/x.so"\ntoken_label = "t"\n'
        'pin_credential = "pin"\n'
    )
    refused = birthline("backup", "--config", bad, "--out", tmp_path / "x.tgz")
    assert refused.returncode == 2 and "does not exist: nothing to back up" in refused.stderr


def test_restore_refuses_a_live_or_non_empty_state_unless_forced(
    demo_state: Path, archive: Path, tmp_path: Path
) -> None:
    target = tmp_path / "target"
    target.mkdir(mode=0o700)
    (target / "journal.sqlite").write_bytes(b"precious")
    config = target / "birthline.toml"
    refused = birthline("restore", archive, "--config", config, "--state-dir", target)
    assert refused.returncode == 2 and "is not empty" in refused.stderr
    assert [p.name for p in target.iterdir()] == ["journal.sqlite"]
    # Forced, but a daemon holds the state's lock: still refused.
    with DaemonLock(target, "the daemon (test)"):
        refused = birthline("restore", archive, "--config", config, "--state-dir", target, "--force")
    assert refused.returncode == 2 and "in use" in refused.stderr and "the daemon (test)" in refused.stderr
    # Forced with nobody running: the old state is moved aside, not deleted.
    forced = birthline("restore", archive, "--config", config, "--state-dir", target, "--force")
    assert forced.returncode == 0, forced.stderr
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("target.before-restore-")]
    assert len(aside) == 1 and (aside[0] / "journal.sqlite").read_bytes() == b"precious"
    assert (target / "journal.sqlite").read_bytes()[:16] == b"SQLite format 3\x00"
    assert target.stat().st_mode & 0o777 == 0o700
    # Taken with the daemon stopped: every audit entry is signed, the restored log verifies INTACT at once.
    verified = birthline("audit", "verify", "--config", config)
    assert verified.returncode == 0 and "INTACT" in verified.stdout, verified.stdout + verified.stderr
    # A configuration file outside the state that exists is not replaced without --force.
    elsewhere = tmp_path / "etc.toml"
    elsewhere.write_text("# mine\n")
    refused = birthline("restore", archive, "--config", elsewhere, "--state-dir", tmp_path / "t2")
    assert refused.returncode == 2 and "exists" in refused.stderr and elsewhere.read_text() == "# mine\n"
    assert not (tmp_path / "t2").exists()


def _rewrite(archive: Path, out: Path, change: object) -> None:
    """A copy of `archive` whose members pass through change(info, data) -> list of (info, data)."""
    with tarfile.open(archive) as src, tarfile.open(out, "w:gz") as dst:
        for info in src.getmembers():
            data = src.extractfile(info).read() if info.isfile() else b""  # type: ignore[union-attr]
            for new_info, new_data in change(info, data):  # type: ignore[operator]
                new_info.size = len(new_data)
                dst.addfile(new_info, io.BytesIO(new_data))


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("flipped byte", "sha256 differs from the manifest"),
        ("extra file", "which its manifest does not list"),
        ("escape", "which is no path a Birthline backup writes"),
        ("missing file", r"lacks 1 file\(s\) its manifest lists"),
        ("not a backup", "not a Birthline backup"),
        ("truncated", "damaged|lacks"),  # cut inside a member, or at a member's boundary
    ],
)
def test_restore_checks_the_manifest_before_writing_anything(
    archive: Path, tmp_path: Path, case: str, says: str
) -> None:
    bad = tmp_path / "bad.tgz"
    if case == "truncated":
        bad.write_bytes(gzip.compress(gzip.decompress(archive.read_bytes())[:-20000]))
    else:

        def change(info: tarfile.TarInfo, data: bytes) -> list[tuple[tarfile.TarInfo, bytes]]:
            if case == "flipped byte" and info.name == "state/journal.sqlite":
                return [(info, data[:-1] + bytes([data[-1] ^ 1]))]
            if case == "extra file" and info.name == "state/journal.sqlite":
                extra = tarfile.TarInfo("state/planted")
                return [(info, data), (extra, b"x")]
            if case == "escape" and info.name == "state/ca-chain.pem":
                info.name = "state/../../escaped"
            if case == "missing file" and info.name == "state/ca-chain.pem":
                return []
            if case == "not a backup" and info.name == "MANIFEST.json":
                return []
            return [(info, data)]

        _rewrite(archive, bad, change)
    target = tmp_path / "target"
    checked = birthline("restore", bad, "--check")
    assert checked.returncode == 2 and re.search(says, checked.stderr), checked.stderr
    refused = birthline("restore", bad, "--config", target / "birthline.toml", "--state-dir", target)
    assert refused.returncode == 2 and re.search(says, refused.stderr), refused.stderr
    assert not target.exists() and not (tmp_path.parent / "escaped").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tgz"]  # no staging directory left behind


def test_restore_check_reads_the_manifest(archive: Path) -> None:
    checked = birthline("restore", archive, "--check", "--json")
    assert checked.returncode == 0, checked.stderr
    manifest = json.loads(checked.stdout)
    assert manifest["format"] == "birthline-backup/1" and manifest["journal_schema"] >= 1
    kinds = {f["path"]: f["kind"] for f in manifest["files"]}
    assert kinds["state/journal.sqlite"] == "sqlite" and kinds["config/birthline.toml"] == "file"
    assert any(p.startswith("state/softhsm/tokens/") for p in kinds)
    assert {e["why"] for e in manifest["excluded"]} >= {"the HSM user PIN is never backed up"}


def test_a_configuration_and_token_outside_the_state_are_restored_inside_the_new_one(
    demo_state: Path, tmp_path: Path
) -> None:
    """The appliance's layout: the configuration and the SoftHSM token under /etc, the state elsewhere."""
    etc, state = tmp_path / "etc", tmp_path / "var"
    shutil.copytree(demo_state, state, ignore=shutil.ignore_patterns("daemon.lock", "pty", "*.sock"))
    etc.mkdir()
    shutil.move(state / "softhsm", etc / "softhsm")
    conf = etc / "softhsm" / "softhsm2.conf"
    conf.write_text(conf.read_text().replace(str(demo_state / "softhsm"), str(etc / "softhsm")))
    text = (
        (demo_state / "birthline.toml").read_text().replace(str(demo_state / "softhsm"), str(etc / "softhsm"))
    )
    text = text.replace(str(demo_state), str(state)).replace(
        'tls_dir = "tls"', f'tls_dir = "{state / "tls"}"'
    )
    (etc / "birthline.toml").write_text(text)
    assert birthline("config", "check", "--config", etc / "birthline.toml").returncode == 0

    taken = birthline("backup", "--config", etc / "birthline.toml", "--out", tmp_path / "a.tgz")
    assert taken.returncode == 0, taken.stderr
    new_etc, new_state = tmp_path / "etc2", tmp_path / "var2"
    got = birthline(
        "restore", tmp_path / "a.tgz", "--config", new_etc / "birthline.toml", "--state-dir", new_state
    )
    assert got.returncode == 0, got.stderr
    restored = (new_etc / "birthline.toml").read_text()
    assert f'softhsm_conf = "{new_state}/softhsm/softhsm2.conf"' in restored
    assert f'state_dir = "{new_state}"' in restored and f'"{state}/' not in restored
    # The PIN file stays where the configuration put it, outside the state: it was never in the backup.
    assert f'pin_file = "{etc}/softhsm/user.pin"' in restored
    softhsm = (new_state / "softhsm" / "softhsm2.conf").read_text()
    assert f"directories.tokendir = {new_state}/softhsm/tokens" in softhsm
    shutil.rmtree(etc)  # the old token and configuration are gone: only the restored ones can answer
    (etc / "softhsm").mkdir(parents=True)
    shutil.copy(demo_state / "softhsm" / "user.pin", etc / "softhsm" / "user.pin")
    checked = birthline("config", "check", "--config", new_etc / "birthline.toml")
    assert checked.returncode == 0 and "the PIN logs in" in checked.stdout, checked.stdout + checked.stderr
    verified = birthline("audit", "verify", "--config", new_etc / "birthline.toml")
    assert verified.returncode == 0 and "INTACT" in verified.stdout, verified.stdout + verified.stderr


def test_relocation_rewrites_whole_path_components_only() -> None:
    from appliance.backup import _relocate

    text = 'a = "/var/lib/birthline"\nb = "/var/lib/birthline/tls"\nc = "/var/lib/birthline2/x"\nd = /var/lib/birthline\n'
    assert _relocate(text, [("/var/lib/birthline", "/srv/bl")]) == (
        'a = "/srv/bl"\nb = "/srv/bl/tls"\nc = "/var/lib/birthline2/x"\nd = /srv/bl\n'
    )


@pytest.mark.skipif(os.geteuid() != 0, reason="giving files to another user takes root")
def test_restore_gives_the_files_to_the_daemons_user(archive: Path, tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    target, config = tmp_path / "state", tmp_path / "etc" / "birthline.toml"
    got = birthline("restore", archive, "--config", config, "--state-dir", target, "--owner", "nobody")
    assert got.returncode == 0, got.stderr
    owners = {(p.lstat().st_uid, p.lstat().st_gid) for p in (target, config, *target.rglob("*"))}
    assert owners == {(nobody.pw_uid, nobody.pw_gid)}
    refused = birthline("restore", archive, "--config", tmp_path / "c.toml", "--state-dir", tmp_path / "s2",
                        "--owner", "no-such-user-here")  # fmt: skip
    assert refused.returncode == 2 and "no such user" in refused.stderr and not (tmp_path / "s2").exists()


def test_every_database_in_the_state_is_snapshotted_with_what_its_wal_holds(
    demo_state: Path, tmp_path: Path
) -> None:
    """A copy of the file alone would miss what a writer has committed to the WAL but not checkpointed: the
    online backup API reads through it."""
    state = tmp_path / "state"
    shutil.copytree(demo_state, state, ignore=shutil.ignore_patterns("daemon.lock", "pty", "*.sock"))
    config = tmp_path / "birthline.toml"
    config.write_text((demo_state / "birthline.toml").read_text().replace(str(demo_state), str(state)))
    writer = sqlite3.connect(state / "extra.sqlite")
    try:
        writer.execute("PRAGMA journal_mode=WAL")
        writer.execute("PRAGMA wal_autocheckpoint=0")
        writer.execute("CREATE TABLE t (x TEXT)")
        writer.execute("INSERT INTO t VALUES ('committed, in the WAL only')")
        writer.commit()
        assert (state / "extra.sqlite-wal").stat().st_size > 0
        taken = birthline("backup", "--config", config, "--out", tmp_path / "a.tgz")
    finally:
        writer.close()
    assert taken.returncode == 0, taken.stderr
    assert "state/extra.sqlite: online snapshot" in taken.stdout
    got = birthline(
        "restore", tmp_path / "a.tgz", "--config", tmp_path / "r.toml", "--state-dir", tmp_path / "r"
    )
    assert got.returncode == 0, got.stderr
    assert not (tmp_path / "r" / "extra.sqlite-wal").exists()
    with closing(sqlite3.connect(tmp_path / "r" / "extra.sqlite")) as db:
        assert db.execute("SELECT x FROM t").fetchall() == [("committed, in the WAL only",)]


def test_an_archive_on_another_file_system_restores(archive: Path, tmp_path: Path) -> None:
    """The image keeps the state on its own partition: the archive comes from elsewhere (here a tmpfs), and the
    restore still renames its files into place on the state's file system."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("no second file system (/dev/shm) beside the test's temporary directory")
    elsewhere = shm / f"birthline-test-{os.getpid()}-{tmp_path.name}.tgz"
    shutil.copy(archive, elsewhere)
    try:
        got = birthline("restore", elsewhere, "--config", tmp_path / "s" / "birthline.toml", "--state-dir",
                        tmp_path / "s")  # fmt: skip
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "s" / "journal.sqlite").is_file()
        assert not [p for p in shm.iterdir() if "staging" in p.name]
    finally:
        elsewhere.unlink()


def _tampered(archive: Path, out: Path, change: object) -> None:
    """A copy of `archive` whose members pass through change(name, data, entry) and whose manifest is re-hashed
    to match: what a deliberate alteration looks like (the manifest is not signed)."""
    with tarfile.open(archive) as src:
        members = [(i, src.extractfile(i).read()) for i in src.getmembers() if i.isfile()]  # type: ignore[union-attr]
    manifest = json.loads(members[0][1])
    entries = {e["path"]: e for e in manifest["files"]}
    changed = []
    for info, original in members[1:]:
        data = change(info.name, original, entries[info.name])  # type: ignore[operator]
        entries[info.name].update(sha256=hashlib.sha256(data).hexdigest(), size=len(data))
        info.mode = entries[info.name]["mode"]
        changed.append((info, data))
    blob = json.dumps(manifest).encode()
    head = members[0][0]
    with tarfile.open(out, "w:gz") as dst:
        for info, data in [(head, blob), *changed]:
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def test_a_database_that_is_not_sqlite_is_refused_without_a_traceback(archive: Path, tmp_path: Path) -> None:
    def garble(name: str, data: bytes, entry: dict[str, object]) -> bytes:
        return b"not a database at all " * 100 if name == "state/journal.sqlite" else data

    bad = tmp_path / "bad.tgz"
    _tampered(archive, bad, garble)
    checked = birthline("restore", bad, "--check")
    assert checked.returncode == 2 and "Traceback" not in checked.stderr, checked.stderr
    assert "state/journal.sqlite: not a readable SQLite database" in checked.stderr
    target = tmp_path / "target"
    refused = birthline("restore", bad, "--config", target / "birthline.toml", "--state-dir", target)
    assert refused.returncode == 2 and "not a readable SQLite database" in refused.stderr, refused.stderr
    assert not target.exists()


def test_restore_never_applies_setuid_or_world_writable_modes(archive: Path, tmp_path: Path) -> None:
    def widen(name: str, data: bytes, entry: dict[str, object]) -> bytes:
        entry["mode"] = 0o7777
        return data

    bad = tmp_path / "modes.tgz"
    _tampered(archive, bad, widen)
    target = tmp_path / "target"
    got = birthline("restore", bad, "--config", target / "birthline.toml", "--state-dir", target)
    assert got.returncode == 0, got.stderr
    modes = {p: p.stat().st_mode & 0o7777 for p in target.rglob("*") if p.is_file()}
    assert modes and set(modes.values()) == {0o700}, modes


def test_secret_files_are_never_backed_up(demo_state: Path, tmp_path: Path) -> None:
    """The image's first boot leaves etc/admin.password and etc/hsm.pin in the state: credentials of people and of
    the HSM, never in an archive."""
    state = tmp_path / "state"
    shutil.copytree(demo_state, state, ignore=shutil.ignore_patterns("daemon.lock", "pty", "*.sock"))
    config = tmp_path / "birthline.toml"
    config.write_text((demo_state / "birthline.toml").read_text().replace(str(demo_state), str(state)))
    (state / "etc").mkdir()
    for name in ("admin.password", "so.pin", "hsm.pin"):
        (state / "etc" / name).write_text("hunter2\n")
    (state / "etc" / "keep.toml").write_text("# not a secret\n")
    taken = birthline("backup", "--config", config, "--out", tmp_path / "a.tgz")
    assert taken.returncode == 0, taken.stderr
    with tarfile.open(tmp_path / "a.tgz") as tar:
        names = tar.getnames()
        assert all(b"hunter2" not in tar.extractfile(i).read() for i in tar if i.isfile())  # type: ignore[union-attr]
    assert "state/etc/keep.toml" in names and not [n for n in names if n.endswith((".pin", ".password"))]
    assert "left out: " + str(state / "etc" / "admin.password") + " (a password file" in taken.stdout
    # The stations' authenticators are kept: the line cannot run without them (the journal holds station keys).
    assert "state/cmp-demo.secret" in names and "state/est-demo.secret" in names


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs takes root")
def test_restore_onto_a_mount_point_stages_inside_it(archive: Path, tmp_path: Path) -> None:
    """The appliance's state directory is its state disk's mount point: it cannot be renamed, and nothing beside
    it is on its file system."""
    from tests.real_faults import small_tmpfs

    target, config = tmp_path / "mnt", tmp_path / "mnt" / "birthline.toml"
    with small_tmpfs(target, "64m"):
        (target / "lost+found").mkdir()
        got = birthline("restore", archive, "--config", config, "--state-dir", target)
        assert got.returncode == 0, got.stderr
        assert (target / "journal.sqlite").read_bytes()[:16] == b"SQLite format 3\x00"
        assert target.stat().st_mode & 0o777 == 0o700 and (target / "lost+found").is_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["mnt"]  # nothing staged beside it
        assert not [p for p in target.iterdir() if p.name.startswith(".restore-staging-")]
        verified = birthline("audit", "verify", "--config", config)
        assert verified.returncode == 0 and "INTACT" in verified.stdout, verified.stdout + verified.stderr
        # Forced onto the now non-empty mount point: the old files go aside inside it, never deleted.
        (target / "journal.sqlite").write_bytes(b"precious")
        refused = birthline("restore", archive, "--config", config, "--state-dir", target)
        assert refused.returncode == 2 and "is not empty" in refused.stderr
        forced = birthline("restore", archive, "--config", config, "--state-dir", target, "--force")
        assert forced.returncode == 0, forced.stderr
        aside = [p for p in target.iterdir() if p.name.startswith(".before-restore-")]
        assert len(aside) == 1 and (aside[0] / "journal.sqlite").read_bytes() == b"precious"
        assert (target / "journal.sqlite").read_bytes()[:16] == b"SQLite format 3\x00"
        # The next backup leaves the set-aside state (and lost+found) out.
        taken = birthline("backup", "--config", config, "--out", tmp_path / "again.tgz")
        assert taken.returncode == 0, taken.stderr
        with tarfile.open(tmp_path / "again.tgz") as tar:
            assert not [n for n in tar.getnames() if "before-restore" in n or "lost+found" in n]
        # The appliance's way: --config through /etc/birthline, a link into the state disk, and --owner.
        link = tmp_path / "etc-link"
        link.symlink_to(target / "etc")
        nobody = pwd.getpwnam("nobody")
        again = birthline("restore", archive, "--config", link / "birthline.toml", "--state-dir", target,
                          "--force", "--owner", "nobody")  # fmt: skip
        assert again.returncode == 0, again.stderr
        # The second forced restore set aside what was there, the first one's aside included, under a name of its
        # own even within the same second as the first (it once failed there: "File exists").
        (newest,) = [p for p in target.iterdir() if p.name.startswith(".before-restore-")]
        (older,) = [p for p in newest.iterdir() if p.name.startswith(".before-restore-")]
        assert (older / "journal.sqlite").read_bytes() == b"precious"
        assert (
            target / "etc" / "birthline.toml"
        ).is_file()  # written in the new state: nothing set aside beside it
        assert not list(target.glob("etc/*.before-restore-*"))
        assert {(p.lstat().st_uid, p.lstat().st_gid) for p in (target, *target.glob("*")) if ".before" not in p.name
                and p.name != "lost+found"} == {(nobody.pw_uid, nobody.pw_gid)}  # fmt: skip
        verified = birthline("audit", "verify", "--config", link / "birthline.toml")
        assert verified.returncode == 0 and "INTACT" in verified.stdout, verified.stdout + verified.stderr


def test_a_name_to_set_aside_is_never_one_already_taken(tmp_path: Path) -> None:
    """Two forced restores in one second share a time stamp: the second's aside name gets -2 (-3, ...), so the
    move does not fail on the first one's directory, nor replace the first one's set-aside configuration file."""
    from appliance.backup import _unused

    base = tmp_path / ".before-restore-20261206T014931Z"
    assert _unused(base) == base
    base.mkdir()
    assert _unused(base) == tmp_path / ".before-restore-20261206T014931Z-2"
    (tmp_path / ".before-restore-20261206T014931Z-2").write_text("first restore's config")
    (tmp_path / ".before-restore-20261206T014931Z-3").symlink_to("nowhere")  # a dangling link is taken too
    assert _unused(base) == tmp_path / ".before-restore-20261206T014931Z-4"
