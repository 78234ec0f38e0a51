"""appliance.files: files written exclusively and never through a link, secret directories refused when others
could swap their files, and state refused when group or others can reach it; on real files in tmp_path."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from appliance.files import (
    FileRefused,
    refuse_shared_files,
    secret_directory,
    secure_state_dir,
    write_file,
    write_private,
    write_public,
)


def _mode(p: Path) -> int:
    return stat.S_IMODE(os.lstat(p).st_mode)


def test_a_planted_symlink_is_replaced_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    victim.chmod(0o644)
    out = tmp_path / "out"
    out.mkdir(mode=0o700)
    (out / "station.key").symlink_to(victim)
    with pytest.raises(FileRefused, match="symbolic link"):
        write_private(out / "station.key", b"secret\n")
    assert victim.read_bytes() == b"precious\n" and _mode(victim) == 0o644
    assert [p.name for p in out.iterdir()] == ["station.key"]  # no temporary file left behind


def test_write_replaces_a_regular_file_with_exactly_the_mode_asked_for(tmp_path: Path) -> None:
    target = tmp_path / "k"
    target.write_bytes(b"old")
    target.chmod(0o666)
    old = os.umask(0o077)
    try:
        write_public(tmp_path / "cert.pem", b"public")
    finally:
        os.umask(old)
    write_private(target, b"new")
    assert target.read_bytes() == b"new" and _mode(target) == 0o600
    assert _mode(tmp_path / "cert.pem") == 0o644  # not narrowed by the umask either


def test_a_directory_or_device_target_is_refused(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(FileRefused, match="not a regular file"):
        write_public(tmp_path / "d", b"x")
    with pytest.raises(FileRefused, match="not a regular file"):
        write_public(Path("/dev/null"), b"x")


def test_secret_directory_refuses_links_shared_and_foreign_directories(tmp_path: Path) -> None:
    made = secret_directory(tmp_path / "new" / "bundle")
    assert _mode(made) == 0o700
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(FileRefused, match="symbolic link"):
        secret_directory(tmp_path / "link")
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    with pytest.raises(FileRefused, match=r"writable by group or others \(mode 777\).*chmod go-w"):
        secret_directory(shared)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o700)
    os.chown(foreign, 65534, 65534)
    with pytest.raises(FileRefused, match="belongs to uid 65534"):
        secret_directory(foreign)
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileRefused, match="not a directory"):
        secret_directory(tmp_path / "file")


def test_state_directory_and_files_others_can_reach_are_refused_with_the_fix(tmp_path: Path) -> None:
    state = tmp_path / "state"
    assert _mode(secure_state_dir(state, "secrets")) == 0o700  # made private
    state.chmod(0o755)  # an existing directory keeps its mode: checked every time
    with pytest.raises(FileRefused) as exc:
        secure_state_dir(state, "secrets")
    assert f"{state} is mode 755" in str(exc.value) and f"chmod 700 {state}" in str(exc.value)
    state.chmod(0o700)
    db, wal = state / "journal.sqlite", state / "journal.sqlite-wal"
    db.write_bytes(b"")
    wal.write_bytes(b"")
    db.chmod(0o600)
    wal.chmod(0o640)
    refuse_shared_files([state / "missing"], "x")  # absent files are fine
    with pytest.raises(FileRefused) as exc:
        refuse_shared_files([db, wal], "the station keys")
    assert f"{wal} (mode 640)" in str(exc.value) and str(exc.value).endswith(f"chmod 600 {wal}")


def test_create_only_never_replaces_and_leaves_no_temporary_file(tmp_path: Path) -> None:
    """replace=False (a password shown once): created when nothing is there; otherwise FileExistsError, the file
    as it was (a symlink too, never followed), and no temporary file left behind."""
    target = tmp_path / "secret.txt"
    write_file(target, b"first\n", mode=0o600, replace=False)
    assert target.read_bytes() == b"first\n" and stat.S_IMODE(target.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        write_file(target, b"second\n", mode=0o600, replace=False)
    assert target.read_bytes() == b"first\n"
    dangling = tmp_path / "link.txt"
    dangling.symlink_to(tmp_path / "elsewhere.txt")
    with pytest.raises((FileExistsError, FileRefused)):
        write_file(dangling, b"x\n", mode=0o600, replace=False)
    assert not (tmp_path / "elsewhere.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.txt", "secret.txt"]
