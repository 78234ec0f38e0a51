"""`birthline backup` and `birthline restore`: the appliance's state in one archive, and back (docs/operations.md
"Backup and restore").

What a backup holds: the configuration file; every file of the state directory, with each SQLite database in it
(the journal, wherever the configuration puts it, and any other) copied through SQLite's online backup API, so a
backup taken while the daemon issues is a consistent snapshot of each database; the SoftHSM configuration and
token directory when `[hsm] softhsm_conf` is set (wherever they are). What it never holds: a credential that unlocks the HSM or an
administrator account: `[hsm] pin_file` and every `*.pin` or `*.password` file (the image's first-boot PINs and
administrator password; see _secret_files for what is kept, and why); SQLite's -wal/-shm sidecars (the snapshot has their content), the control socket, the
daemon's lock file, and a restore's staging or set-aside directories.

The journal is copied first and the token after it: a key made between the two is then in the token but unknown
to the journal (harmless), never known to the journal but missing from the token.

The archive is a gzip'd tar with MANIFEST.json first: the format, where each part came from, and the sha256 and
size of every other member. `restore` checks all of it into a staging directory on the target's file system (beside
the target, or inside it when it is a mount point) before it puts anything in place, and moves paths that named the old state directory to the new one (the configuration's and
softhsm2.conf's), so a state restored elsewhere is complete but for the PIN.

The archive holds station keys in clear (the journal keeps them) and the token's encrypted key files: it is
written 0600 and is to be kept as safely as the SO PIN.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import sqlite3
import stat
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from appliance.config import load_config
from appliance.daemon_lock import LOCK_FILE, running
from appliance.errors import BirthlineError, ReasonCode

FORMAT: Final = "birthline-backup/1"
MANIFEST: Final = "MANIFEST.json"
_SQLITE_MAGIC: Final = b"SQLite format 3\x00"
_SIDECARS: Final = ("-wal", "-shm", "-journal")
_CHUNK: Final = 1 << 20
# A restore onto a mount point (the appliance's state disk) cannot rename the directory itself: it stages in a
# hidden directory inside it and moves the children; --force moves the old children into a hidden directory
# there too. A later backup leaves both out.
_STAGING_PREFIX: Final = ".restore-staging-"
_ASIDE_PREFIX: Final = ".before-restore-"
# fsck's directory on an ext4 state disk: not ours to move aside.
_MOUNT_LEFT_ALONE: Final = frozenset({"lost+found"})
# Files restore writes keep at most the owner's rwx (the daemon's user owns the state): never setuid, setgid or
# sticky bits, nor any access for group or others, whatever the (unsigned) manifest says.
_MODE_MASK: Final = 0o700


def _unused(path: Path) -> Path:
    """`path`, or `path`-2, -3, ... if taken: two forced restores within one second must not meet at one name
    (a directory there fails the move; a file there would be replaced, losing what the first one set aside)."""
    candidate, n = path, 1
    while candidate.exists() or candidate.is_symlink():
        n += 1
        candidate = path.with_name(f"{path.name}-{n}")
    return candidate


class BackupError(BirthlineError):
    """A backup or restore refused: a bad path, a target in use, an archive that does not check."""

    def __init__(self, message: str) -> None:
        super().__init__(message, ReasonCode.BAD_REQUEST)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Member:
    path: str  # inside the archive: config/..., state/..., journal/..., softhsm/...
    sha256: str
    size: int
    mode: int
    kind: str  # "sqlite" (an online-backup snapshot) or "file"


@dataclass(frozen=True)
class BackupResult:
    archive: Path
    members: tuple[Member, ...]
    excluded: tuple[tuple[str, str], ...]  # (path, why)


@dataclass(frozen=True)
class RestoreResult:
    state_dir: Path
    config: Path
    members: int
    pin_file: Path | None
    pin_credential: str | None
    moved_aside: tuple[Path, ...]


# -- backup ----------------------------------------------------------------------------------------------------------


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _tokendir(softhsm_conf: Path) -> Path | None:
    for line in softhsm_conf.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key.strip() == "directories.tokendir":
            return Path(value.strip())
    return None


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(len(_SQLITE_MAGIC)) == _SQLITE_MAGIC


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _snapshot_sqlite(source: Path, target: Path) -> None:
    """A consistent copy of a live database: the online backup API copies every page within one read
    transaction, which in WAL mode never blocks the daemon's writers."""
    src = sqlite3.connect(f"file:{source}?mode=ro", uri=True)
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.close(fd)
        dst = sqlite3.connect(target)
        try:
            src.backup(dst)
            # The copy is in WAL mode like its source: back to a single file so the archive needs no sidecar.
            dst.execute("PRAGMA journal_mode=DELETE")
            (check,) = dst.execute("PRAGMA integrity_check").fetchone()
            if check != "ok":
                raise BackupError(f"{source}: the snapshot fails SQLite's integrity check ({check})")
        finally:
            dst.close()
    finally:
        src.close()


def _stable_copy(source: Path, target: Path) -> None:
    """Copy a file that another process may rewrite (a token file while the daemon runs): read until two
    reads agree, so the copy is one whole version of the file."""
    for _ in range(5):
        first = source.read_bytes()
        if source.read_bytes() == first:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(first)
            return
    raise BackupError(f"{source} kept changing while it was read; try again (or stop the daemon)")


@contextlib.contextmanager
def _staging(beside: Path, *, inside: bool = False) -> Iterator[Path]:
    """A private scratch directory next to `beside`, or in it when `inside` (a mount point: nothing beside it is
    on its file system). Either way on the target's file system: restore renames out of it."""
    if inside:
        path = beside / f"{_STAGING_PREFIX}{secrets.token_hex(6)}"
    else:
        path = beside.parent / f".{beside.name}.staging-{secrets.token_hex(6)}"
    path.mkdir(mode=0o700)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _check_output(out: Path, keep_out: list[Path]) -> None:
    if out.exists() or out.is_symlink():
        raise BackupError(f"{out} exists: give a new file name (a backup never replaces a file)")
    if not out.parent.is_dir():
        raise BackupError(
            f"{out.parent} is not a directory: give the archive's path in an existing directory"
        )
    if not os.access(out.parent, os.W_OK):
        raise BackupError(f"{out.parent}: not writable by this user")
    for directory in keep_out:
        if _inside(out.resolve(), directory.resolve()):
            raise BackupError(
                f"{out} is inside {directory}, which the backup copies: keep the archive outside the state"
                " (it would be lost with it)"
            )


def _secret_files(config: Any) -> dict[Path, str]:
    """The credentials that unlock the HSM or an administrator account are never backed up: `[hsm] pin_file` here,
    and by name every `*.pin` and `*.password` file (the image's first-boot PIN and administrator password). The
    stations' authenticators (their keys in the journal, the CMP MAC secrets and EST passwords the configuration
    names) are: the line cannot run without them, and the archive already holds station keys in clear."""
    named: dict[Path, str] = {}
    if config.hsm.pin_file:
        named[Path(config.hsm.pin_file).resolve()] = "the HSM user PIN is never backed up"
    return named


def _secret_by_name(name: str) -> str | None:
    if name.endswith(".pin"):
        return "a PIN file is never backed up"
    if name.endswith(".password"):
        return "a password file is never backed up"
    return None


def backup(config_path: Path, out: Path) -> BackupResult:
    config_path = Path(config_path).resolve()
    config = load_config(config_path)
    out = Path(out).absolute()
    state_dir = config.appliance.state_dir.resolve()
    journal = config.journal.path.resolve()
    if not state_dir.is_dir():
        raise BackupError(f"state directory {state_dir} does not exist: nothing to back up")
    if not journal.is_file():
        raise BackupError(
            f"journal {journal} does not exist: is {config_path} the appliance's configuration?"
        )
    softhsm_conf = Path(config.hsm.softhsm_conf).resolve() if config.hsm.softhsm_conf else None
    tokendir = _tokendir(softhsm_conf) if softhsm_conf is not None and softhsm_conf.is_file() else None
    if softhsm_conf is not None and tokendir is None:
        raise BackupError(
            f"[hsm] softhsm_conf {softhsm_conf} names no directories.tokendir: no token to back up"
        )
    tokendir = tokendir.resolve() if tokendir is not None else None
    _check_output(out, [state_dir] + ([tokendir] if tokendir else []))

    never = _secret_files(config)
    never[state_dir / LOCK_FILE] = "the daemon's lock"
    never[config.control_socket.resolve()] = "the control socket"
    excluded: list[tuple[str, str]] = []

    # (archive path, source, kind), in the order they are read: the journal, the other databases, the
    # configuration and the state's other files, then the token.
    databases: list[tuple[str, Path, str]] = []
    files: list[tuple[str, Path, str]] = [(f"config/{config_path.name}", config_path, "file")]
    if not _inside(journal, state_dir):
        databases.append((f"journal/{journal.name}", journal, "sqlite"))
    for path in sorted(state_dir.rglob("*")):
        rel = path.relative_to(state_dir).as_posix()
        if tokendir is not None and _inside(path, tokendir):
            continue  # with the token, below, after the journal
        top = rel.split("/", 1)[0]
        if top.startswith((_STAGING_PREFIX, _ASIDE_PREFIX)) or top in _MOUNT_LEFT_ALONE:
            if top == rel:
                excluded.append((str(path), "a restore's staging or set-aside state, or lost+found"))
            continue
        why = never.get(path.resolve()) or never.get(path)
        if why is None:
            why = _secret_by_name(path.name)
        if why is None and (path.is_symlink() or not (path.is_file() or path.is_dir())):
            why = "not a regular file"
        if why is not None:
            excluded.append((str(path), why))
            continue
        if path.is_dir() or (path.name.endswith(_SIDECARS) and Path(str(path).rsplit("-", 1)[0]).is_file()):
            continue  # directories come with their files; SQLite's -wal/-shm: their content is in the snapshot
        if _is_sqlite(path):
            databases.append((f"state/{rel}", path, "sqlite"))
        else:
            files.append((f"state/{rel}", path, "file"))
    databases.sort(key=lambda p: (p[1].resolve() != journal, p[0]))
    plan = databases + files
    if not databases or databases[0][1].resolve() != journal:
        raise BackupError(f"journal {journal} is not an SQLite database: is {config_path} the appliance's?")
    if softhsm_conf is not None and tokendir is not None:
        if not _inside(softhsm_conf, state_dir):
            plan.append((f"softhsm/{softhsm_conf.name}", softhsm_conf, "file"))
        token_prefix = (
            f"state/{tokendir.relative_to(state_dir).as_posix()}"
            if _inside(tokendir, state_dir)
            else "softhsm/tokens"
        )
        for path in sorted(tokendir.rglob("*")):
            if path.is_file() and not path.is_symlink():
                if (why := never.get(path.resolve()) or _secret_by_name(path.name)) is not None:
                    excluded.append((str(path), why))
                    continue
                plan.append((f"{token_prefix}/{path.relative_to(tokendir).as_posix()}", path, "token"))

    members: list[Member] = []
    with _staging(out) as stage:
        for i, (name, source, kind) in enumerate(plan):
            staged = stage / f"{i:06d}"
            if kind == "sqlite":
                _snapshot_sqlite(source, staged)
            else:
                _stable_copy(source, staged)
            mode = stat.S_IMODE(source.stat().st_mode)
            members.append(
                Member(
                    name,
                    _sha256_file(staged),
                    staged.stat().st_size,
                    mode,
                    "sqlite" if kind == "sqlite" else "file",
                )
            )
        manifest = {
            "format": FORMAT,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "journal_schema": _schema_of(stage / f"{0:06d}"),  # the journal is read first
            "source": {
                "config": str(config_path),
                "state_dir": str(state_dir),
                # As the configuration wrote it, when that differs (a symlink on the way): relocated too.
                "state_dir_as_configured": str(config.appliance.state_dir),
                "journal": str(journal),
                "softhsm_conf": str(softhsm_conf) if softhsm_conf else None,
                "tokendir": str(tokendir) if tokendir else None,
                "pin_file": str(config.hsm.pin_file) if config.hsm.pin_file else None,
            },
            "files": [m.__dict__ for m in members],
            "excluded": [{"path": p, "why": w} for p, w in excluded],
        }
        tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            with os.fdopen(fd, "wb") as raw:
                with tarfile.open(fileobj=raw, mode="w:gz") as tar:
                    data = json.dumps(manifest, indent=2, sort_keys=True).encode()
                    info = tarfile.TarInfo(MANIFEST)
                    info.size, info.mode, info.mtime = len(data), 0o600, int(dt.datetime.now().timestamp())
                    tar.addfile(info, io.BytesIO(data))
                    for i, m in enumerate(members):
                        info = tar.gettarinfo(str(stage / f"{i:06d}"), arcname=m.path)
                        info.mode, info.uid, info.gid, info.uname, info.gname = m.mode, 0, 0, "", ""
                        with (stage / f"{i:06d}").open("rb") as f:
                            tar.addfile(info, f)
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, out)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    return BackupResult(out, tuple(members), tuple(excluded))


def _schema_of(db: Path) -> int | None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else None
    except sqlite3.Error:
        return None
    finally:
        conn.close()


# -- restore ---------------------------------------------------------------------------------------------------------


def _safe_name(name: str) -> PurePosixPath:
    p = PurePosixPath(name)
    if (
        p.is_absolute()
        or ".." in p.parts
        or not p.parts
        or p.parts[0] not in {"config", "state", "journal", "softhsm"}
    ):
        raise BackupError(
            f"the archive holds {name!r}, which is no path a Birthline backup writes: not restored"
        )
    return p


def read_manifest(tar: tarfile.TarFile) -> dict[str, Any]:
    first = tar.next()
    if first is None or first.name != MANIFEST or not first.isfile():
        raise BackupError(f"not a Birthline backup: its first member is not {MANIFEST}")
    f = tar.extractfile(first)
    assert f is not None  # a regular file, checked above
    try:
        manifest: dict[str, Any] = json.loads(f.read())
    except ValueError as exc:
        raise BackupError(f"{MANIFEST} is not JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise BackupError(f"{MANIFEST} says format {manifest.get('format')!r}; this release reads {FORMAT!r}")
    return manifest


def _extract_checked(archive: Path, stage: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """Every member into `stage` under a name of ours, each checked against the manifest; the manifest and the
    archive must list the same files. Nothing outside `stage` is written."""
    try:
        tar = tarfile.open(archive, mode="r:*")  # noqa: SIM115 (closed by the with below, once open)
    except (tarfile.TarError, OSError) as exc:
        raise BackupError(f"{archive}: not a readable archive ({exc})") from None
    with tar:
        manifest = read_manifest(tar)
        expected = {m["path"]: m for m in manifest["files"]}
        placed: dict[str, Path] = {}
        try:
            for info in tar:
                if info.isdir() or (info.name == MANIFEST and info.offset == 0):
                    continue  # the manifest, read above
                if not info.isfile():
                    raise BackupError(
                        f"the archive holds {info.name!r}, which is not a regular file: not restored"
                    )
                _safe_name(info.name)
                want = expected.get(info.name)
                if want is None:
                    raise BackupError(f"the archive holds {info.name!r}, which its manifest does not list")
                if info.name in placed:
                    raise BackupError(f"the archive holds {info.name!r} twice")
                src = tar.extractfile(info)
                assert src is not None
                target = stage / f"{len(placed):06d}"
                h = hashlib.sha256()
                fd = os.open(
                    target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
                )
                with os.fdopen(fd, "wb") as dst:
                    while chunk := src.read(_CHUNK):
                        h.update(chunk)
                        dst.write(chunk)
                if h.hexdigest() != want["sha256"] or info.size != want["size"]:
                    raise BackupError(
                        f"{info.name}: its sha256 differs from the manifest's: the archive is damaged"
                    )
                placed[info.name] = target
        except (tarfile.TarError, EOFError, OSError) as exc:
            raise BackupError(f"{archive}: damaged ({exc})") from None
    missing = sorted(set(expected) - set(placed))
    if missing:
        raise BackupError(
            f"the archive lacks {len(missing)} file(s) its manifest lists, first {missing[0]!r}"
        )
    for name, path in placed.items():
        if expected[name]["kind"] == "sqlite":
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            try:
                (check,) = conn.execute("PRAGMA integrity_check").fetchone()
            except sqlite3.Error as exc:
                # Not an SQLite database at all (its header is gone): SQLite cannot even run the check.
                raise BackupError(f"{name}: not a readable SQLite database ({exc}): not restored") from None
            finally:
                conn.close()
            if check != "ok":
                raise BackupError(f"{name}: fails SQLite's integrity check ({check})")
    return manifest, placed


def verify(archive: Path) -> dict[str, Any]:
    """Check an archive without restoring it: the manifest, every digest, every database's integrity."""
    archive = Path(archive).absolute()
    if not archive.is_file():
        raise BackupError(f"{archive}: no such archive")
    # In the temporary directory, not beside the archive: it may be on read-only media.
    with tempfile.TemporaryDirectory(prefix="birthline-check-") as stage:
        manifest, _ = _extract_checked(archive, Path(stage))
    return manifest


def _peek_manifest(archive: Path) -> dict[str, Any]:
    try:
        with tarfile.open(archive, mode="r:*") as tar:
            return read_manifest(tar)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise BackupError(f"{archive}: not a readable archive ({exc})") from None


def _relocate(text: str, moves: list[tuple[str, str]]) -> str:
    """Replace each old path by its new one where it stands as a whole path or a path's leading directories
    (followed by a quote, a slash or the end of a line), so /var/lib/birthline never rewrites
    /var/lib/birthline2."""
    for old, new in moves:
        if old != new:
            text = re.sub(re.escape(old) + r"(?=[\"'/]|$)", new.replace("\\", "\\\\"), text, flags=re.M)
    return text


def _write_new(path: Path, text: str, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _is_mount(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and os.path.ismount(path)


def _children(state: Path, in_place: bool) -> list[Path]:
    """The state's present entries, but for this restore's staging (and lost+found on a mount point)."""
    if not state.is_dir() or state.is_symlink():
        return [state] if state.exists() or state.is_symlink() else []
    return [
        p
        for p in state.iterdir()
        if not p.name.startswith(_STAGING_PREFIX) and not (in_place and p.name in _MOUNT_LEFT_ALONE)
    ]


def restore(
    archive: Path,
    config_out: Path,
    state_dir: Path | None = None,
    *,
    force: bool = False,
    owner: tuple[int, int] | None = None,
) -> RestoreResult:
    """`owner` (uid, gid): the daemon's user gets every restored file and directory and the configuration, as
    `hsm init-token --owner` gives it the token; otherwise they belong to the user restoring."""
    archive = Path(archive).absolute()
    if not archive.is_file():
        raise BackupError(f"{archive}: no such archive")
    config_out = Path(config_out).absolute()
    # Through its directory's links (the image's /etc/birthline is a link into the state disk): a configuration
    # that lives in the new state is written into it.
    config_out = config_out.parent.resolve() / config_out.name
    peeked = _peek_manifest(archive)
    new_state = Path(state_dir) if state_dir is not None else Path(peeked["source"]["state_dir"])
    new_state = new_state.resolve()
    if not new_state.parent.is_dir():
        raise BackupError(f"{new_state.parent} is not a directory: create it first")
    # A mount point (the appliance's state disk) cannot be renamed: stage inside it and move its children.
    in_place = _is_mount(new_state)
    # Checked on the new state's file system, not beside the archive: the files are then renamed into place on
    # one file system (the archive is often elsewhere: another partition, a USB stick).
    with _staging(new_state, inside=in_place) as checked:
        manifest, placed = _extract_checked(archive, checked)
        source = manifest["source"]
        # Refusals before anything is moved: a live state is never replaced unless asked, never while it runs.
        moved_aside: list[Path] = []
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        if _children(new_state, in_place):
            if not force:
                raise BackupError(
                    f"{new_state} is not empty: restore goes onto a fresh state directory (--force moves the"
                    " present one aside, never while its daemon runs)"
                )
            holder = running(new_state) if new_state.is_dir() else None
            if holder is not None:
                raise BackupError(
                    f"{new_state} is in use ({holder} holds its daemon lock): stop the daemon first"
                )
        if (config_out.exists() or config_out.is_symlink()) and not (force or _inside(config_out, new_state)):
            raise BackupError(f"{config_out} exists: give --config a new path, or --force to move it aside")

        old_state = source["state_dir"]
        moves: list[tuple[str, str]] = [(old_state, str(new_state))]
        if source.get("state_dir_as_configured", old_state) != old_state:
            moves.append((source["state_dir_as_configured"], str(new_state)))
        if not _inside(Path(source["journal"]), Path(old_state)):
            moves.append((source["journal"], str(new_state / Path(source["journal"]).name)))
        if source.get("softhsm_conf") and not _inside(Path(source["softhsm_conf"]), Path(old_state)):
            moves.append(
                (source["softhsm_conf"], str(new_state / "softhsm" / Path(source["softhsm_conf"]).name))
            )
        if source.get("tokendir") and not _inside(Path(source["tokendir"]), Path(old_state)):
            moves.append((source["tokendir"], str(new_state / "softhsm" / "tokens")))
        # Longest first: a tokendir inside an old softhsm directory moves with its own rule.
        moves.sort(key=lambda m: len(m[0]), reverse=True)

        # The new state directory is built whole in a staging directory beside it, then renamed into place.
        with _staging(new_state, inside=in_place) as build:
            build.chmod(0o700)
            config_text = None
            modes = {m["path"]: int(m["mode"]) for m in manifest["files"]}
            for name, staged in placed.items():
                parts = PurePosixPath(name).parts
                if parts[0] == "config":
                    config_text = staged.read_text()
                    config_mode = modes[name] & _MODE_MASK
                    continue
                if parts[0] == "state":
                    target = build.joinpath(*parts[1:])
                elif parts[0] == "journal":
                    target = build / parts[1]
                else:  # softhsm/<conf> and softhsm/tokens/...: kept outside the old state, brought inside
                    target = build.joinpath("softhsm", *parts[1:])
                target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                os.replace(staged, target)
                target.chmod(modes[name] & _MODE_MASK)
            if config_text is None:
                raise BackupError("the archive holds no configuration file")
            for conf in build.rglob("softhsm2.conf"):
                conf.write_text(_relocate(conf.read_text(), moves))
            if _inside(config_out, new_state):
                # The configuration lives in the state directory (as the demo's does): written there, in the
                # new state, replacing the copy the state's files brought.
                inner = build / config_out.relative_to(new_state)
                inner.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                inner.unlink(missing_ok=True)
                _write_new(inner, _relocate(config_text, moves), config_mode)
            if owner is not None:
                for path in (build, *build.rglob("*")):
                    os.chown(path, *owner, follow_symlinks=False)
            if in_place:
                old = _children(new_state, in_place)
                if old:
                    aside = _unused(new_state / f"{_ASIDE_PREFIX}{stamp}")
                    aside.mkdir(mode=0o700)
                    for child in old:
                        child.rename(aside / child.name)
                    moved_aside.append(aside)
                for child in list(build.iterdir()):
                    child.rename(new_state / child.name)
                new_state.chmod(0o700)
                if owner is not None:
                    os.chown(new_state, *owner)
            else:
                if new_state.exists():
                    if any(new_state.iterdir()):
                        aside = _unused(new_state.with_name(f"{new_state.name}{_ASIDE_PREFIX}{stamp}"))
                        new_state.rename(aside)
                        moved_aside.append(aside)
                    else:
                        new_state.rmdir()
                build.rename(new_state)
                build.mkdir(mode=0o700)  # for the staging context's clean-up
        if not _inside(config_out, new_state):
            if config_out.exists() or config_out.is_symlink():
                aside = _unused(config_out.with_name(f"{config_out.name}.before-restore-{stamp}"))
                config_out.rename(aside)
                moved_aside.append(aside)
            config_out.parent.mkdir(parents=True, exist_ok=True)
            _write_new(config_out, _relocate(config_text, moves), config_mode)
            if owner is not None:
                os.chown(config_out, *owner)
    restored = load_config(config_out)
    if restored.appliance.state_dir.resolve() != new_state.resolve() or not restored.journal.path.is_file():
        raise BackupError(
            f"restored, but {config_out} names state directory {restored.appliance.state_dir} and journal"
            f" {restored.journal.path} (was the original configuration's state_dir a relative path?): edit it"
            f" to name {new_state}"
        )
    return RestoreResult(
        new_state,
        config_out,
        len(placed),
        Path(restored.hsm.pin_file) if restored.hsm.pin_file else None,
        restored.hsm.pin_credential,
        tuple(moved_aside),
    )
