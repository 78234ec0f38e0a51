"""Real faults for tests, as a machine produces them: a full filesystem, an immutable journal, an HSM token gone.

The filesystems are mounted for the test and unmounted after it. `make test` runs as root (in CI too), and
there a mount that fails fails the test with the kernel's reason: the fault is never faked, and a machine that
cannot produce it is noticed rather than skipped. Only a run as another user skips these tests.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hsm.softhsm import SoftHsmToken


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, check=False)


def _require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a filesystem for a real fault needs root (make test runs as root)")


def _mounted(done: subprocess.CompletedProcess[str], what: str) -> None:
    assert done.returncode == 0, (
        f"cannot mount {what} (root with CAP_SYS_ADMIN needed): {done.stderr.strip()}"
    )


def _unmount(where: Path) -> None:
    # Lazy: a file the test left open (the journal of a failed test) must not keep the mount alive for ever.
    if _run("umount", str(where)).returncode != 0:
        _run("umount", "-l", str(where))


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str = "16m") -> Iterator[Path]:
    """A tmpfs of `size` at `where`: a filesystem that fills up for real (ENOSPC)."""
    _require_root()
    where.mkdir(parents=True, exist_ok=True)
    _mounted(_run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)), "a tmpfs")
    try:
        yield where
    finally:
        _unmount(where)


@contextlib.contextmanager
def ext4_loop(where: Path, size_mb: int = 32) -> Iterator[Path]:
    """An ext4 filesystem in a loop-mounted image file next to `where`: it supports `chattr +i`, and ext4
    enforces the immutable flag on files that are already open (EPERM on write)."""
    _require_root()
    assert shutil.which("mkfs.ext4") and shutil.which("chattr"), (
        "mkfs.ext4 or chattr missing: make deps installs them"
    )
    image = where.with_name(where.name + ".img")
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    made = _run("mkfs.ext4", "-q", "-F", str(image))
    assert made.returncode == 0, made.stderr
    where.mkdir(parents=True, exist_ok=True)
    _mounted(_run("mount", "-o", "loop", str(image), str(where)), "an ext4 loop image")
    where.chmod(0o700)  # a fresh ext4 root is 0755; the appliance refuses a state directory others can reach
    try:
        yield where
    finally:
        # Never leave an immutable file behind: the tmp directory could not be removed.
        for path in where.rglob("*"):
            _run("chattr", "-i", str(path))
        _unmount(where)
        image.unlink(missing_ok=True)


def fill(directory: Path) -> Path:
    """Fill the filesystem of `directory` to the last byte; returns the filler file (delete it to free)."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (1 << 20, 1 << 12, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    assert shutil.disk_usage(directory).free < 4096, "the filesystem did not fill up"
    return filler


def set_immutable(*paths: Path, on: bool = True) -> None:
    for path in paths:
        done = _run("chattr", "+i" if on else "-i", str(path))
        assert done.returncode == 0, done.stderr


@contextlib.contextmanager
def hsm_token_removed(token: SoftHsmToken) -> Iterator[None]:
    """The token disappears from under the open PKCS#11 session, as a pulled USB HSM does: SoftHSM's token
    directory is moved away, and moved back on exit."""
    (tokens,) = [p for p in (token.directory / "tokens").iterdir() if p.is_dir()]
    away = token.directory / "token-removed"
    tokens.rename(away)
    try:
        yield
    finally:
        away.rename(tokens)
