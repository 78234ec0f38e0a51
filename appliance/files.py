"""Files the appliance writes, and the modes of the state it keeps.

Writing: every file is made the same way, whatever it holds. A new file with a random name is created next to
the target with O_CREAT|O_EXCL|O_NOFOLLOW, filled, fsynced and renamed over the target. Nothing planted at either
name is ever written through: the temporary name cannot exist yet, and rename() replaces a symlink at the target
itself instead of following it. A target that is anything but a regular file (a symlink, a device, a
directory) is refused before anything is written, so `--out /dev/stdout` or a link left by someone else fails
loudly instead of replacing it.

Directories that receive secrets (credential bundles) are refused when they are a symlink, not a directory,
owned by another user, or writable by group or others: whoever can write the directory can swap the files in
it after they are written.

Modes: the state directory, the journal and the other secret files the daemon reads are refused when group or
others can reach them, with the path, the mode and the chmod that fixes it (secure_state_dir,
refuse_shared_files).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import Final

from appliance.errors import BirthlineError, ReasonCode

PRIVATE: Final = 0o600  # secrets: keys, PINs, passwords, the journal
PUBLIC: Final = 0o644  # certificates, exports, descriptions
PRIVATE_DIR: Final = 0o700


class FileRefused(BirthlineError):
    """A file or directory the appliance will not write to, or state whose mode exposes secrets."""

    def __init__(self, message: str, path: Path | str) -> None:
        super().__init__(message, ReasonCode.BAD_REQUEST, {"path": str(path)})

    def __str__(self) -> str:
        return self.message


def _mode(st: os.stat_result) -> str:
    return f"{stat.S_IMODE(st.st_mode):o}"


def _refuse_target(st: os.stat_result, path: Path) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise FileRefused(f"{path} is a symbolic link; refusing to write through it", path)
    if not stat.S_ISREG(st.st_mode):
        raise FileRefused(f"{path} exists and is not a regular file; refusing to replace it", path)


def check_write_target(path: Path) -> None:
    """Refuse, before any work, a target that write_file would refuse (for writers that stream into a temporary
    file of their own and rename it into place, such as the audit export)."""
    with contextlib.suppress(FileNotFoundError):
        _refuse_target(os.lstat(path), Path(path))


def write_file(path: Path, data: bytes, *, mode: int = PRIVATE, replace: bool = True) -> Path:
    """Create or replace `path` with `data` and exactly `mode`, never through a link (see the module doc).
    `replace=False`: create only; FileExistsError if anything is at `path` (a secret shown once must not take the
    place of another)."""
    path = Path(path)
    parent = path.parent
    dfd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            st = os.stat(path.name, dir_fd=dfd, follow_symlinks=False)
        except FileNotFoundError:
            pass
        else:
            _refuse_target(st, path)
        tmp = f".{path.name}.{secrets.token_hex(8)}.tmp"
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dfd
        )
        try:
            try:
                os.fchmod(fd, mode)  # the umask may have taken bits away from a public file
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            if replace:
                os.replace(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
            else:
                # link() never replaces what is there: the check and the creation are one step.
                os.link(tmp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd, follow_symlinks=False)
                os.unlink(tmp, dir_fd=dfd)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=dfd)
            raise
        os.fsync(dfd)  # the rename itself survives a power loss
    finally:
        os.close(dfd)
    return path


def write_private(path: Path, data: bytes) -> Path:
    """A secret (key, PIN, password, station secret): mode 0600."""
    return write_file(path, data, mode=PRIVATE)


def write_public(path: Path, data: bytes) -> Path:
    """A certificate, an export or a description: mode 0644."""
    return write_file(path, data, mode=PUBLIC)


def secret_directory(path: Path) -> Path:
    """A directory to receive secrets: created 0700 if missing; refused if it is a symlink, not a directory,
    owned by another user or writable by group or others."""
    path = Path(path)
    with contextlib.suppress(FileExistsError):
        path.mkdir(parents=True, mode=PRIVATE_DIR)
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        raise FileRefused(f"{path} is a symbolic link; give the real directory", path)
    if not stat.S_ISDIR(st.st_mode):
        raise FileRefused(f"{path} exists and is not a directory", path)
    if st.st_uid != os.geteuid():
        raise FileRefused(f"{path} belongs to uid {st.st_uid}, who could replace what is written there", path)
    if st.st_mode & 0o022:
        raise FileRefused(
            f"{path} is writable by group or others (mode {_mode(st)}), who could replace what is written"
            f" there; run: chmod go-w {path}",
            path,
        )
    return path


def secure_state_dir(path: Path, holds: str) -> Path:
    """The state directory: created 0700 if missing; refused when others have any access to it, or its group
    more than traverse (an existing directory keeps the mode it was given, so it is checked every time).

    Group traverse alone (0710) is allowed: it is how `[control] group` reaches the control socket by name
    (appliance/control/unix.py open_for_group). It lists nothing and opens only what a file's own mode allows,
    and the secret files are 0600, which refuse_shared_files checks."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=PRIVATE_DIR)
    st = os.stat(path)
    if stat.S_IMODE(st.st_mode) & 0o067:
        raise FileRefused(
            f"state directory {path} is mode {_mode(st)}: group and others can reach {holds}; run: chmod 700"
            f" {path} (or 710 to let the console group reach the control socket)",
            path,
        )
    return path


def refuse_shared_files(paths: Iterable[Path], holds: str) -> None:
    """Refuse when any existing file of `paths` can be read or written by group or others."""
    shared = []
    for p in paths:
        try:
            st = os.stat(p)
        except FileNotFoundError:
            continue
        if stat.S_IMODE(st.st_mode) & 0o077:
            shared.append((Path(p), _mode(st)))
    if shared:
        listed = ", ".join(f"{p} (mode {m})" for p, m in shared)
        raise FileRefused(
            f"{listed}: group or others can reach {holds}; run: chmod 600 {' '.join(str(p) for p, _ in shared)}",
            shared[0][0],
        )


def tighten(paths: Iterable[Path], mode: int) -> list[Path]:
    """chmod the existing `paths` that allow more than `mode`; returns those changed. Only for state this
    process made itself (the demo's), never to hide an administrator's mistake."""
    changed = []
    for p in paths:
        with contextlib.suppress(FileNotFoundError):
            st = os.lstat(p)
            if not stat.S_ISLNK(st.st_mode) and stat.S_IMODE(st.st_mode) & ~mode:
                os.chmod(p, stat.S_IMODE(st.st_mode) & mode)
                changed.append(Path(p))
    return changed
